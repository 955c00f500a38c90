"""`largo update` on a language model: fine-tuned on its feedback texts, gated on perplexity."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import largo
from largo.cli import app as cli
from largo.config import ConfigError
from largo.deploy.generator import TextGenerator
from largo.lifecycle.registry import Registry
from largo.lifecycle.store import Store
from largo.lifecycle.update import UpdateConfig, UpdateError, in_holdout, update
from tests.lm_corpus import tiny_lm_config, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny LM pretrained on the tests' corpus (it never saw the word the feedback teaches)."""
    root = tmp_path_factory.mktemp("lm-update")
    corpus = write_corpus(root / "corpus")
    result = largo.pretrain(tiny_lm_config(corpus, root / "runs", steps=60))
    return {"bundle": result.path, "corpus": corpus, "root": root, "metrics": result.metrics}


def _registry(lm: dict, tmp_path: Path) -> tuple[Registry, str]:
    """A copy of the bundle's runs (updates write beside it) registered as tinylm v1, in production."""
    runs = tmp_path / "runs"
    shutil.copytree(lm["bundle"].parent.parent, runs)
    db = str(tmp_path / "registry.db")
    registry = Registry(Store(db))
    registry.register("tinylm", runs / lm["bundle"].parent.name / lm["bundle"].name)
    registry.promote("tinylm", 1)
    return registry, db


def _generations(store: Store, count: int, start: int = 0) -> list[str]:
    """`count` logged generations of v1, each corrected to teach 'the zorbly NAME': prompt, then the
    completion the model should have written."""
    ids = [f"gen-{i}" for i in range(start, start + count)]
    now = time.time()
    store.add_predictions(
        [
            {"id": pid, "model": "tinylm", "version": 1, "time": now + i, "latency_ms": 5.0,
             "input": {"prompt": f"{NAMES[i % 10]} is"}, "output": {"text": " the cat.", "tokens": 3}}
            for i, pid in enumerate(ids)
        ]
    )  # fmt: skip
    store.add_feedback(
        [
            {"prediction_id": pid, "model": "tinylm", "output": "text", "time": now + i, "source": "api",
             "label": {"rating": "bad", "completion": f" the zorbly {NAMES[i % 10]} of zorbly land."},
             "predicted": " the cat.", "input": None}
            for i, pid in enumerate(ids)
        ]
    )  # fmt: skip
    return ids


def test_an_update_learns_the_corrections_and_is_promoted_then_a_strict_gate_blocks_the_next(
    lm: dict, tmp_path: Path
) -> None:
    registry, db = _registry(lm, tmp_path)
    ids = _generations(registry.store, 40)
    held = [pid for pid in ids if in_holdout(pid, 0.2)]
    assert 0 < len(held) < len(ids)
    cfg = UpdateConfig.model_validate({"steps": 30, "gate": {"min_gain": 0.05, "max_regression": 0.5}})
    first = update(registry, "tinylm", cfg)
    assert first.version == 2 and first.parent == 1 and first.promoted, first.table()
    assert registry.lookup("tinylm").version == 2 and registry.lookup("tinylm@candidate").version == 2
    feedback = {side: first.scores["feedback"][side]["text"] for side in ("old", "new")}
    assert feedback["new"]["loss"] < feedback["old"]["loss"] - 0.5  # it learned the held-out corrections
    assert feedback["new"]["perplexity"] < feedback["old"]["perplexity"]
    assert feedback["old"]["rows"] == len(held) == first.rows["feedback_held_out"]
    test = {side: first.scores["test"][side]["text"] for side in ("old", "new")}
    # the regression is measured on v1's held-out corpus stream, tiled in context windows, for both models
    valid_tokens = lm["metrics"]["corpus"]["valid_tokens"]
    assert test["old"]["tokens"] == test["new"]["tokens"] == (valid_tokens - 1) // 64 * 64
    assert test["new"]["loss"] != test["old"]["loss"]  # the new model was scored, not the old one twice
    regression = test["new"]["loss"] - test["old"]["loss"]
    assert f"regression {regression:+.4f} ≤ max_regression 0.5000" in first.verdict.reason
    assert first.rows["feedback_train"] == len(ids) - len(held)
    table = first.table()
    assert (
        f"reference corpus (held out) ({test['old']['rows']} windows)" in table
        and f"feedback slice ({len(held)} texts)" in table
    )
    assert "gate PASSED" in table and "reference corpus (held out) loss" in table and "promoted v2" in table

    record = json.loads((first.path / "update.json").read_text(encoding="utf-8"))
    assert record["parent"] == "tinylm@1" and record["steps"] == 30 and record["gate"]["passed"]
    assert record["reference"]["lineage"][0]["path"] == str(lm["corpus"].resolve())
    held_rows = {r["id"] for r in registry.store.feedback_rows("tinylm") if r["prediction_id"] in held}
    assert set(record["feedback_ids"]["held_out"]) == held_rows  # never trained on
    assert not held_rows & set(record["feedback_ids"]["train"])
    trained_on = [json.loads(x) for x in Path(record["corpus"]["path"]).read_text("utf-8").splitlines()]
    assert {t["prediction_id"] for t in trained_on} == set(ids) - set(held)
    assert all("zorbly" in t["text"] for t in trained_on)
    version = registry.lookup("tinylm@2")
    assert version.lineage["parent"] == 1
    assert set(version.lineage["feedback_ids"]) == set(record["feedback_ids"]["train"])
    assert TextGenerator.load(first.path).generate("alice is", 4, seed=0)  # a bundle that generates

    # the next update starts from v2 and is judged on v1's corpus again (v2's update.json names it)
    _generations(registry.store, 20, start=40)
    strict = UpdateConfig.model_validate({"steps": 10, "gate": {"min_gain": 10.0, "max_regression": 0.5}})
    second = update(registry, "tinylm", strict)
    assert second.version == 3 and second.parent == 2 and not second.promoted
    assert registry.lookup("tinylm").version == 2 and registry.lookup("tinylm@candidate").version == 3
    assert "gate BLOCKED" in second.table() and "< min_gain 10.0000" in second.verdict.reason
    record = json.loads((second.path / "update.json").read_text(encoding="utf-8"))
    assert record["reference"]["lineage"][0]["path"] == str(lm["corpus"].resolve())


def test_a_parent_exported_to_onnx_gets_an_exported_successor(lm: dict, tmp_path: Path) -> None:
    """v1 exported to ONNX and int8 before it was registered: the update's version is exported and
    checked too, on the reference corpus (its own corpus is the feedback, too small to hold a window)."""
    runs = tmp_path / "runs"
    shutil.copytree(lm["bundle"].parent.parent, runs)
    bundle = runs / lm["bundle"].parent.name / lm["bundle"].name
    largo.export(bundle, "onnx", "int8")
    registry = Registry(Store(str(tmp_path / "registry.db")))
    registry.register("tinylm", bundle)
    registry.promote("tinylm", 1)
    _generations(registry.store, 40)
    cfg = UpdateConfig.model_validate({"steps": 10, "gate": {"min_gain": -10.0, "max_regression": 10.0}})
    result = update(registry, "tinylm", cfg)
    assert result.promoted, result.table()
    record = json.loads((result.path / "update.json").read_text(encoding="utf-8"))
    assert record["export"] == {"format": "onnx", "quantize": "int8", "passed": True, "error": None}
    formats = json.loads((result.path / "export.json").read_text(encoding="utf-8"))["formats"]
    assert formats["onnx"]["data"] == str(lm["corpus"].resolve()) and formats["onnx-int8"]["parity"]["passed"]
    registry.verify(registry.lookup("tinylm@2"))  # exported before it was registered


def test_the_cli_updates_a_language_model_and_bad_settings_name_the_key(lm: dict, tmp_path: Path) -> None:
    registry, db = _registry(lm, tmp_path)
    with pytest.raises(UpdateError, match="no feedback texts to train on"):
        update(registry, "tinylm", UpdateConfig())
    _generations(registry.store, 12)
    for bad, match in [
        ({"mode": "retrain"}, "update.mode: 'retrain' does not apply to a language model; allowed: finetune"),
        ({"epochs": 3}, "update.epochs: a language model trains for update.steps"),
        (
            {"gate": {"metric": "accuracy"}},
            "update.gate.metric: 'accuracy' does not apply to a language model",
        ),
        ({"gate": {"output": "label"}}, "update.gate.output: 'label' is not an output; allowed: text"),
    ]:
        with pytest.raises(ConfigError, match=match):
            update(registry, "tinylm", UpdateConfig.model_validate(bad))
    assert [v.version for v in registry.versions("tinylm")] == [1]  # nothing was trained or registered
    with pytest.raises(UpdateError, match=r"no held-out feedback to judge a gain on .*update.holdout = 0.0"):
        update(registry, "tinylm", UpdateConfig.model_validate({"holdout": 0.0}))
    assert [v.version for v in registry.versions("tinylm")] == [1]  # nothing was trained or registered
    assert not list((tmp_path / "runs" / "lm").glob("v2")) and not list((tmp_path / "runs").rglob("*.jsonl"))
    gate = ["--set", "update.gate.min_gain=-100", "--set", "update.gate.max_regression=100"]  # always passes
    result = CliRunner().invoke(cli, ["update", "tinylm", "--db", db, "--set", "update.steps=5", *gate])
    assert result.exit_code == 0, result.output
    assert "reference corpus (held out) (" in result.output and "feedback slice (" in result.output
    assert "  loss *" in result.output and "  perplexity" in result.output
    assert "gate PASSED" in result.output and "promoted v2 to production" in result.output
    assert [v.version for v in registry.versions("tinylm")] == [1, 2] and registry.lookup(
        "tinylm"
    ).version == 2


def test_a_failed_fine_tune_leaves_no_run_folder_and_no_corpus(
    lm: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    registry, _ = _registry(lm, tmp_path)
    _generations(registry.store, 12)

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated: out of memory")

    # (largo.train is also the API's train function, so the module is taken from sys.modules)
    monkeypatch.setattr(sys.modules["largo.train.lm"], "pretrain_fit", out_of_memory)
    with pytest.raises(RuntimeError, match="simulated"):
        update(registry, "tinylm", UpdateConfig.model_validate({"steps": 5}))
    assert sorted(f.name for f in (tmp_path / "runs" / "lm").glob("v*")) == [lm["bundle"].name]
    assert not list((tmp_path / "runs" / "lm" / ".feedback").glob("*"))
    assert [v.version for v in registry.versions("tinylm")] == [1]


def test_completion_loss_scores_each_completion_token_once_given_its_prompt() -> None:
    import torch

    from largo.config_lm import GPTConfig
    from largo.lifecycle.update_lm import completion_loss, completion_windows
    from largo.models.gpt import GPT, IGNORE

    assert completion_windows([1, 2], [3, 4], context=8) == [([1, 2, 3], [IGNORE, 3, 4])]
    # a text longer than the context: windows from the end back, overlapping by half, each token once
    assert completion_windows([1, 2], [3, 4, 5, 6, 7], context=4) == [
        ([3, 4, 5, 6], [IGNORE, IGNORE, 6, 7]),  # 6 and 7 see at least 2 tokens before them
        ([1, 2, 3, 4], [IGNORE, 3, 4, 5]),
    ]
    torch.manual_seed(0)
    model = GPT(
        GPTConfig.model_validate({"dim": 16, "layers": 1, "heads": 2, "context": 8, "vocab_size": 40})
    )
    model.eval()

    class Tok:  # ids are the characters' codes minus 60; the end-of-text token is 0
        def encode(self, text: str, add_special_tokens: bool = False) -> object:
            return type("Encoding", (), {"ids": [ord(c) - 60 for c in text]})()

        def token_to_id(self, token: str) -> int:
            return 0

    # texts of different lengths batched together (right padding), against each token by hand
    texts = [{"prompt": "AB", "completion": "CD"}, {"prompt": "E", "completion": "FGHIJK"}]
    texts.append({"prompt": "L", "completion": ""})  # nothing to score
    got = completion_loss(model, Tok(), texts)["text"]  # type: ignore[arg-type]
    expected, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = [ord(c) - 60 for c in t["prompt"] + t["completion"]]
            for i in range(len(t["prompt"]), len(ids)):
                logits = model(torch.tensor([ids[:i]]))[0, -1]
                expected -= float(torch.log_softmax(logits, -1)[ids[i]])
                n += 1
    assert got["tokens"] == n == 8 and got["rows"] == 2
    assert abs(got["loss"] - expected / n) < 1e-5
    # a prompt token scored as a target, or one target shifted, would change the figure
    assert completion_loss(model, Tok(), [{"prompt": "", "completion": "AB"}])["text"]["tokens"] == 2


def test_a_changed_reference_corpus_or_a_bundle_outside_a_run_stops_the_update(
    lm: dict, tmp_path: Path
) -> None:
    registry, _ = _registry(lm, tmp_path)
    _generations(registry.store, 12)
    corpus = tmp_path / "corpus.txt"
    shutil.copy(lm["corpus"], corpus)
    # a version whose lineage names a corpus that has changed since it was registered
    other = tmp_path / "runs" / "other" / "v1"
    shutil.copytree(lm["bundle"], other)
    cfg_file = other / "config.yaml"
    cfg_file.write_text(
        cfg_file.read_text(encoding="utf-8").replace(str(lm["corpus"]), str(corpus)), encoding="utf-8"
    )
    registry.register("tinylm", other)
    registry.promote("tinylm", 2)
    corpus.write_text("something else entirely\n" * 50, encoding="utf-8")
    with pytest.raises(UpdateError, match=r"reference corpus .*corpus.txt changed .*restore the file"):
        update(registry, "tinylm", UpdateConfig.model_validate({"steps": 5}))
    elsewhere = tmp_path / "exported-model"  # not <runs>/<name>/v<N>: no run to add a version to
    shutil.copytree(lm["bundle"], elsewhere)
    registry.register("tinylm", elsewhere)
    registry.promote("tinylm", 3)
    with pytest.raises(UpdateError, match=r"exported-model is not a run folder <runs>/<name>/v<N>"):
        update(registry, "tinylm", UpdateConfig.model_validate({"steps": 5}))


def test_an_update_under_torchrun_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in every process
    with pytest.raises(UpdateError, match="largo update runs in one process; start it without torchrun"):
        update(Registry(Store(str(tmp_path / "registry.db"))), "tinylm", UpdateConfig())
