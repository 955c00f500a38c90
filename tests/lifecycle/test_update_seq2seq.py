"""`largo update` on a seq2seq model: its pairs plus corrected generations, fine-tuned, gated on chrF."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

import largo
from largo.config import ConfigError
from largo.data.samples import chinese_number, english_number
from largo.lifecycle.feedback import export_lm_feedback
from largo.lifecycle.registry import Registry
from largo.lifecycle.store import Store
from largo.lifecycle.update import UpdateConfig, UpdateError, in_holdout, update

pytestmark = pytest.mark.usefixtures("one_thread")
THOUSANDS = [1000 + 37 * i for i in range(80)]  # numbers the base model never saw: it has no 千


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An encoder-decoder trained on the numbers below 1,000 only."""
    root = tmp_path_factory.mktemp("seq2seq-update")
    data = root / "pairs.tsv"
    rows = [f"{english_number(n)}\t{chinese_number(n)}" for n in range(1000)]
    data.write_text("english\tchinese\n" + "\n".join(rows) + "\n", encoding="utf-8")
    cfg = {
        "task": "seq2seq",
        "name": "numbers",
        "runs_dir": str(root / "runs"),
        "data": {"train": str(data), "source": "english", "target": "chinese", "valid": 0.1, "test": 0.1},
        "tokenizer": {"vocab_size": 300, "max_source_length": 24, "max_target_length": 16},
        "model": {"dim": 64, "encoder_layers": 2, "decoder_layers": 2, "heads": 4, "dropout": 0.0},
        "train": {
            "epochs": 12, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 2e-3},
            "schedule": {"name": "cosine", "warmup": 0.15}, "clip_grad_norm": 1.0, "eval_generate": 0,
            "progress": False,
        },
        "decode": {"beams": 2},
    }  # fmt: skip
    return largo.train(cfg).path


def _registry(base: Path, tmp_path: Path) -> Registry:
    runs = tmp_path / "runs"
    shutil.copytree(base.parent.parent, runs)
    registry = Registry(Store(str(tmp_path / "registry.db")))
    registry.register("numbers", runs / base.parent.name / base.name)
    registry.promote("numbers", 1)
    return registry


def _corrections(store: Store, numbers: list[int]) -> list[str]:
    """Logged generations of v1 for `numbers`, each corrected to the right numerals."""
    ids = [f"gen-{n}" for n in numbers]
    now = time.time()
    store.add_predictions(
        [
            {"id": pid, "model": "numbers", "version": 1, "time": now + i, "latency_ms": 5.0,
             "input": {"prompt": english_number(n)}, "output": {"text": "一百", "tokens": 2}}
            for i, (pid, n) in enumerate(zip(ids, numbers, strict=True))
        ]
    )  # fmt: skip
    store.add_feedback(
        [
            {"prediction_id": pid, "model": "numbers", "output": "text", "time": now + i, "source": "api",
             "label": {"rating": "bad", "completion": chinese_number(n)}, "predicted": "一百", "input": None}
            for i, (pid, n) in enumerate(zip(ids, numbers, strict=True))
        ]
    )  # fmt: skip
    return ids


def test_an_update_learns_the_corrections_and_a_strict_gate_blocks_the_next(
    base: Path, tmp_path: Path
) -> None:
    registry = _registry(base, tmp_path)
    ids = _corrections(registry.store, THOUSANDS)
    held = [n for n in THOUSANDS if in_holdout(english_number(n), 0.2)]  # the coin is tossed per source
    assert 0 < len(held) < len(ids)
    cfg = UpdateConfig.model_validate(
        {"epochs": 8, "lr": 2e-3, "feedback_weight": 5, "gate": {"min_gain": 5.0, "max_regression": 5.0}}
    )
    first = update(registry, "numbers", cfg)
    assert first.promoted and first.version == 2, first.table()
    assert registry.lookup("numbers").version == 2 and registry.lookup("numbers@candidate").version == 2
    fb = {side: first.scores["feedback"][side]["chinese"] for side in ("old", "new")}
    assert fb["new"]["chrf"] > fb["old"]["chrf"] + 20, first.table()
    assert first.rows["feedback_held_out"] == len(held)
    assert first.rows["train"] == 800 + 5 * (len(ids) - len(held))
    record = json.loads((first.path / "update.json").read_text(encoding="utf-8"))
    assert record["gate"]["passed"] and record["gate"]["metric"] == "chrf"
    assert len(record["feedback_ids"]["held_out"]) == len(held)  # one feedback row per generation here
    assert len(record["feedback_ids"]["train"]) == len(ids) - len(held)
    assert "chrf *" in first.table() and "pairs" in first.table()
    # the new bundle writes the thousands it was taught
    taught = largo.load(first.path).translate([english_number(n) for n in THOUSANDS[:10]])
    assert sum(t.count("千") == 1 for t in taught) >= 8, taught

    # a gate that asks for more than is possible blocks the next update: v3 stays candidate
    strict = UpdateConfig.model_validate({"epochs": 1, "gate": {"min_gain": 1000.0}})
    second = update(registry, "numbers", strict)
    assert not second.promoted and second.version == 3 and "BLOCKED" in second.table()
    assert registry.lookup("numbers").version == 2 and registry.lookup("numbers@candidate").version == 3


def test_refusals_and_the_feedback_export(base: Path, tmp_path: Path) -> None:
    registry = _registry(base, tmp_path)
    with pytest.raises(UpdateError, match="no feedback pairs"):
        update(registry, "numbers", UpdateConfig())
    with pytest.raises(ConfigError, match="does not apply to a seq2seq model; allowed: chrf"):
        update(registry, "numbers", UpdateConfig.model_validate({"gate": {"metric": "accuracy"}}))
    assert not (tmp_path / "runs" / "numbers" / "v2").exists()  # nothing was written
    _corrections(registry.store, THOUSANDS[:5])
    out = export_lm_feedback(registry, "numbers", tmp_path / "fb.jsonl")
    lines = [json.loads(x) for x in out.path.read_text(encoding="utf-8").splitlines()]
    assert out.corrections == 5 and {line["english"] for line in lines} == {
        english_number(n) for n in THOUSANDS[:5]
    }
    assert {line["chinese"] for line in lines} == {chinese_number(n) for n in THOUSANDS[:5]}


def test_feedback_pairs_never_put_one_source_on_both_sides(base: Path, tmp_path: Path) -> None:
    from largo.data.pairs import load_pairs, texts
    from largo.deploy.translator import Translator
    from largo.lifecycle.update_seq2seq import feedback_pairs

    registry = _registry(base, tmp_path)
    cfg = Translator.load(base).config
    tables, _ = load_pairs(cfg)
    test_source = texts(tables["test"], "english")[0]
    store, now = registry.store, time.time()
    # the same source corrected in many generations, a frozen-test source corrected, an empty correction
    prompts = ["twenty one"] * 12 + [f"twenty  one {i}" for i in range(12)] + [test_source, "five"]
    completions = ["二十一"] * 24 + ["零", "  "]
    store.add_predictions(
        [
            {"id": f"g{i}", "model": "numbers", "version": 1, "time": now + i, "latency_ms": 1.0,
             "input": {"prompt": p}, "output": {"text": "x", "tokens": 1}}
            for i, p in enumerate(prompts)
        ]
    )  # fmt: skip
    store.add_feedback(
        [
            {"prediction_id": f"g{i}", "model": "numbers", "output": "text", "time": now + i, "source": "api",
             "label": {"completion": c}, "predicted": "x", "input": None}
            for i, c in enumerate(completions)
        ]
    )  # fmt: skip
    fb, ids, counts = feedback_pairs(registry, "numbers", cfg, 0.5, tables["train"], tables["test"])
    train, held = set(texts(fb["train"], "english")), set(texts(fb["held_out"], "english"))
    assert not train & held and train | held == set(prompts) - {"five"}
    assert test_source in held and counts["left out"] == 1  # "five" had only spaces to learn
    assert len(ids["train"]) + len(ids["held_out"]) == 25
    assert "twenty one" in train or "twenty one" in held  # all 12 copies on one side
    assert texts(fb["train"], "english").count("twenty one") in (0, 12)


def test_a_failed_update_leaves_no_version_behind(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import largo.lifecycle.update_seq2seq as module

    registry = _registry(base, tmp_path)
    _corrections(registry.store, THOUSANDS)

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError("simulated")

    monkeypatch.setattr(module, "fit_pairs", out_of_memory)
    with pytest.raises(MemoryError):
        update(registry, "numbers", UpdateConfig())
    assert sorted(p.name for p in (tmp_path / "runs" / "numbers").iterdir()) == ["v1"]
    assert [v.version for v in registry.versions("numbers")] == [1]
    with pytest.raises(ConfigError, match="update.steps"):
        update(registry, "numbers", UpdateConfig.model_validate({"steps": 10}))


def test_a_name_holds_models_of_one_task(base: Path, tmp_path: Path) -> None:
    from largo.lifecycle.registry import RegistryError

    registry = _registry(base, tmp_path)
    other = tmp_path / "classifier"
    other.mkdir()
    for name in ("config.yaml", "preprocessors.json", "model.safetensors"):
        (other / name).write_text("{}" if name != "config.yaml" else "name: c\n", encoding="utf-8")
    with pytest.raises(RegistryError, match="a model of input/output features, but numbers@1 is a seq2seq"):
        registry.register("numbers", other)
