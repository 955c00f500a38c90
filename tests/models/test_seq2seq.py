"""The encoder-decoder: padding never leaks, the cached decoder equals the full one, and beam search
finds the best sequence when its beam covers every sequence."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from largo.config_seq2seq import Seq2SeqModelConfig
from largo.models.layers import KVCache
from largo.models.seq2seq import BOS, EOS, PAD, Seq2SeqTransformer, beam_search, greedy, stream_ids


def tiny(vocab: int = 40, context: int = 12, seed: int = 0) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    cfg = Seq2SeqModelConfig(
        dim=16, encoder_layers=2, decoder_layers=2, heads=2, dropout=0.0, vocab_size=vocab, context=context
    )
    model = Seq2SeqTransformer(cfg).eval()
    with torch.no_grad():  # larger weights than the init: distinct, confident next-token distributions
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8.0)
    return model


def test_padding_does_not_change_an_example() -> None:
    model = tiny()
    short = {"source": torch.tensor([[5, 6, EOS]]), "target": torch.tensor([[BOS, 7, 8, EOS]])}
    batch = {
        "source": torch.tensor([[5, 6, EOS, PAD, PAD], [9, 10, 11, 12, EOS]]),
        "target": torch.tensor([[BOS, 7, 8, EOS, PAD, PAD], [BOS, 13, 14, 15, 16, EOS]]),
    }
    alone, together = model(short), model(batch)
    assert together["tokens"].tolist() == [3, 5]
    assert torch.allclose(alone["nll"][0], together["nll"][0], atol=1e-5)
    assert alone["nll"][0] > 0


def test_the_loss_is_label_smoothed_in_training_only_and_padding_adds_nothing() -> None:
    model = tiny()
    model.label_smoothing = 0.2
    batch = {"source": torch.tensor([[5, 6, EOS]]), "target": torch.tensor([[BOS, 7, 8, EOS]])}
    padded = {
        "source": torch.tensor([[5, 6, EOS, PAD]]),
        "target": torch.tensor([[BOS, 7, 8, EOS, PAD, PAD]]),
    }
    kv, mask = model.encode(batch["source"])
    with torch.no_grad():
        logits = model.decode(batch["target"][:, :-1], kv, mask)[0].float()
    labels = batch["target"][0, 1:]
    for train, smoothing in ((False, 0.0), (True, 0.2)):
        model.train(train)
        want = F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="sum")
        for b in (batch, padded):
            with torch.no_grad():
                got = model(b)
            assert torch.allclose(got["nll"][0], want, atol=1e-4), (train, b)
            assert int(got["tokens"][0]) == 3
    model.eval()


def test_kv_cache_reorder_keeps_the_chosen_rows() -> None:
    like = torch.zeros(1)
    cache = KVCache(layers=2, batch=3, heads=1, length=4, head_dim=2, like=like)
    for layer in range(2):
        k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2) + 10 * layer
        cache.update(layer, k, -k)
    cache.pos = 2
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.k[1][:, 0, 0, 0].tolist() == [12.0, 12.0, 10.0]
    assert cache.v[0][:, 0, 1, 1].tolist() == [-2.0, -2.0, 0.0]


def test_a_chunk_after_a_cached_prefix_sees_only_earlier_positions() -> None:
    model = tiny()
    source = torch.tensor([[5, 6, 7, EOS]])
    target = torch.tensor([[BOS, 11, 12, 13, 14]])
    kv, mask = model.encode(source)
    with torch.no_grad():
        full = model.decode(target, kv, mask)
        cache = model.new_cache(1, kv[0][0])
        parts = [model.decode(target[:, a:b], kv, mask, cache) for a, b in ((0, 2), (2, 4), (4, 5))]
    assert torch.allclose(full, torch.cat(parts, dim=1), atol=1e-4)


def test_cached_decoding_equals_full_decoding() -> None:
    model = tiny()
    source = torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, PAD]])
    target = torch.tensor([[BOS, 11, 12, 13, 14], [BOS, 15, 16, 17, 18]])
    kv, mask = model.encode(source)
    with torch.no_grad():
        full = model.decode(target, kv, mask)
        cache = model.new_cache(2, kv[0][0])
        steps = torch.cat([model.decode(target[:, i : i + 1], kv, mask, cache) for i in range(5)], dim=1)
    assert torch.allclose(full, steps, atol=1e-4)


def test_greedy_is_the_argmax_at_every_step() -> None:
    model = tiny()
    source = torch.tensor([[5, 6, 7, EOS]])
    got = greedy(model, source, 8)[0]
    # the same search without a cache: run the whole prefix each step
    kv, mask = model.encode(source)
    ids = [BOS]
    with torch.no_grad():
        for _ in range(8):
            nxt = int(model.decode(torch.tensor([ids]), kv, mask)[0, -1].argmax())
            if nxt == EOS:
                break
            ids.append(nxt)
    assert got == ids[1:]
    assert beam_search(model, source, 8, beams=1) == [got]


def _sequence_logp(model: Seq2SeqTransformer, source: torch.Tensor, body: list[int], ended: bool) -> float:
    kv, mask = model.encode(source)
    ids = [BOS, *body]
    with torch.no_grad():
        logp = model.decode(torch.tensor([ids]), kv, mask)[0].float().log_softmax(-1)
    wanted = [*body, EOS] if ended else body
    return float(sum(logp[i, t] for i, t in enumerate(wanted)))


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_a_beam_as_wide_as_every_sequence_finds_the_best(length_penalty: float) -> None:
    # vocabulary: the 3 special ids and 2 tokens; outputs of at most 3 tokens
    model = tiny(vocab=5, seed=3)
    source = torch.tensor([[3, 4, 3, EOS]])
    steps = 3
    candidates = []
    for n in range(steps + 1):
        for body in itertools.product([3, 4], repeat=n):
            ended = n < steps  # a body of `steps` tokens ends by the length limit, not by EOS
            length = n + 1 if ended else n
            logp = _sequence_logp(model, source, list(body), ended)
            candidates.append((logp / length**length_penalty, body))
    best = max(candidates)[1]
    assert beam_search(model, source, steps, beams=64, length_penalty=length_penalty) == [list(best)]


def test_batched_beam_search_equals_one_source_at_a_time() -> None:
    model = tiny()
    sources = [torch.tensor([[5, 6, 7, 8, EOS]]), torch.tensor([[9, 10, EOS]]), torch.tensor([[11, EOS]])]
    alone = [beam_search(model, s, 10, beams=3)[0] for s in sources]
    batch = torch.full((3, 5), PAD)
    for i, s in enumerate(sources):
        batch[i, : s.shape[1]] = s[0]
    assert beam_search(model, batch, 10, beams=3) == alone
    assert any(alone)  # the model writes something (not EOS at once) for some source


def test_sampled_stream_is_seeded() -> None:
    model = tiny()
    source = torch.tensor([[5, 6, EOS]])

    def draw(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [int(t[0]) for t in stream_ids(model, source, 10, temperature=1.5, generator=g)]

    assert draw(1) == draw(1)
    assert len({tuple(draw(s)) for s in range(6)}) > 1


def _eos_prone(seed: int) -> Seq2SeqTransformer:
    """A random model whose EOS is likely at every step, so beams finish at many different lengths."""
    model = tiny(vocab=12, seed=seed)
    with torch.no_grad():
        model.embed.weight[EOS] *= 1.5
    return model


def test_beam_search_with_the_cache_equals_rerunning_the_whole_prefix() -> None:
    lengths = []
    for seed in range(12):
        model = tiny(vocab=30, seed=seed)
        source = torch.tensor([[5, 6, 7, 8, EOS], [9, 10, EOS, PAD, PAD]])
        cached = beam_search(model, source, 9, beams=3)
        assert cached == beam_search(model, source, 9, beams=3, use_cache=False), seed
        lengths += [len(r) for r in cached]
    assert max(lengths) >= 5  # long enough that surviving beams were reordered many times


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_stopping_early_never_changes_the_answer(length_penalty: float) -> None:
    for seed in range(25):
        model = _eos_prone(seed)
        source = torch.tensor([[3, 4, 5, 6, EOS], [7, 8, EOS, PAD, PAD]])
        early = beam_search(model, source, 8, beams=2, length_penalty=length_penalty)
        full = beam_search(model, source, 8, beams=2, length_penalty=length_penalty, early_stopping=False)
        assert early == full, (seed, early, full)
