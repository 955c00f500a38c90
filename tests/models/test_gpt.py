"""The GPT: shapes, tied weights, causality, KV cache vs full recompute, sampler, presets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from largo.config import ConfigError
from largo.config_lm import GPT_PRESETS, GPTConfig, validate_lm_config
from largo.models.gpt import GPT, IGNORE, generate_ids, sample_next

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(context: int = 32, seed: int = 0, **sizes: int) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(**{"dim": 32, "layers": 2, "heads": 4, "context": context, "vocab_size": 50, **sizes})
    return GPT(cfg).eval()


def test_shapes_tied_embedding_and_parameter_count():
    m = _model()
    ids = torch.randint(0, 50, (3, 7))
    assert m(ids).shape == (3, 7, 50)
    assert m.head.weight is m.embed.weight
    dim, hidden, layers, vocab = 32, 128, 2, 50  # hidden: 8/3 · 32 rounded up to 64s
    per_block = 4 * dim * dim + 3 * dim * hidden + 2 * dim
    assert m.num_parameters() == vocab * dim + layers * per_block + dim


def test_attention_is_causal():
    m = _model()
    ids = torch.randint(0, 50, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    a, b = m(ids), m(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)  # the past never sees the future
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_loss_is_the_summed_token_cross_entropy_without_ignored_targets():
    m = _model()
    ids = torch.randint(0, 50, (2, 10))
    targets = torch.randint(0, 50, (2, 10))
    targets[1, 6:] = IGNORE
    loss_sum, count = m(ids, targets)
    expected = F.cross_entropy(
        m(ids).reshape(-1, 50), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    assert int(count) == 16
    assert torch.allclose(loss_sum, expected, atol=1e-4)


def test_kv_cache_gives_the_same_logits_as_recomputing():
    m = _model()
    ids = torch.randint(0, 50, (2, 20))
    full = m(ids)
    cache = m.new_cache(2)
    pieces = [m(ids[:, :8], cache=cache), m(ids[:, 8:13], cache=cache)]  # prefix, then a chunk
    pieces += [m(ids[:, t : t + 1], cache=cache) for t in range(13, 20)]  # then one token at a time
    assert cache.pos == 20
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_generation_with_and_without_cache_agree_and_is_seeded():
    m = _model(context=64)
    prompt = torch.randint(0, 50, (2, 5))

    def run(use_cache: bool, seed: int, **sampling: float) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        steps = list(generate_ids(m, prompt, 30, generator=g, use_cache=use_cache, **sampling))
        return torch.stack(steps, dim=1).tolist()

    assert run(True, 1, temperature=0) == run(False, 1, temperature=0)  # greedy
    sampled = run(True, 7, temperature=1.0, top_k=20)
    assert sampled == run(False, 7, temperature=1.0, top_k=20)
    assert sampled == run(True, 7, temperature=1.0, top_k=20)  # the same seed, the same text
    assert sampled != run(True, 8, temperature=1.0, top_k=20)


def test_generation_stops_at_the_context_and_on_the_stop_token():
    m = _model(context=16)
    out = list(generate_ids(m, torch.zeros(1, 10, dtype=torch.long), 100, temperature=0))
    assert len(out) == 7  # 10 prompt tokens + 6 cached steps fill the 16 positions, the 7th is sampled last
    first = int(next(generate_ids(m, torch.zeros(1, 3, dtype=torch.long), 5, temperature=0))[0])
    stopped = list(generate_ids(m, torch.zeros(1, 3, dtype=torch.long), 5, temperature=0, stop_id=first))
    assert len(stopped) == 1


def test_sampler_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50)
    g = torch.Generator().manual_seed(0)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), greedy)
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6, generator=g), greedy)
    assert torch.equal(sample_next(logits, 0.0), greedy)
    # top-k 3: only the three likeliest tokens are ever drawn
    draws = torch.stack([sample_next(logits, 2.0, top_k=3, generator=g) for _ in range(200)])
    top3 = logits.topk(3, dim=-1).indices
    assert all(bool((draws[:, r, None] == top3[r]).any(-1).all()) for r in range(4))


def test_presets_fill_sizes_and_bad_sizes_name_the_key():
    cfg = GPTConfig(preset="gpt-14m", context=128)
    assert (cfg.dim, cfg.layers, cfg.heads, cfg.context) == (384, 6, 6, 128)  # given keys win
    m = GPT(GPTConfig(preset="gpt-14m", vocab_size=8192))
    assert 12e6 < m.num_parameters() < 16e6
    base = {"data": {"paths": ["x.txt"]}}
    with pytest.raises(ConfigError, match="model: .*unknown 'gpt-9000'.*gpt-1m"):
        validate_lm_config({**base, "model": {"preset": "gpt-9000"}})
    with pytest.raises(ConfigError, match="even head size"):
        validate_lm_config({**base, "model": {"dim": 30, "heads": 2}})
    with pytest.raises(ConfigError, match="train.stepz: unknown key"):
        validate_lm_config({**base, "train": {"stepz": 3}})
    assert set(GPT_PRESETS) >= {"gpt-1m", "gpt2-124m"}
