"""`largo update`: a full cycle on digits — v1 weak on the digit 3, corrections, v2 gated, rollback."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import yaml
from typer.testing import CliRunner

import largo
from largo.cli import app as cli
from largo.config import ConfigError
from largo.lifecycle.registry import Registry
from largo.lifecycle.sink import StoreSink
from largo.lifecycle.store import Store, feedback
from largo.lifecycle.update import UpdateError, load_update_config, update

pytestmark = pytest.mark.usefixtures("one_thread")
KEPT_THREES = 6  # v1 sees only these few 3s, so it gets most 3s wrong


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """v1 trained on digits with almost no 3s; the other 3s are the traffic it will get wrong."""
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path_factory.mktemp("digits-update")
    rows = [
        {f"p{j}": float(v) for j, v in enumerate(x)} | {"label": int(y)}
        for x, y in zip(d.data, d.target, strict=True)
    ]
    threes = [i for i, r in enumerate(rows) if r["label"] == 3]
    traffic = {i for i in threes[KEPT_THREES:]}
    train = [r for i, r in enumerate(rows) if i not in traffic]
    pacsv.write_csv(pa.Table.from_pylist(train), root / "digits.csv")
    result = largo.train(
        {
            "name": "digits",
            "runs_dir": str(root / "runs"),
            "data": {"train": str(root / "digits.csv"), "valid": 0.15, "test": 0.2},
            "inputs": [{"name": f"p{j}", "type": "number"} for j in range(64)],
            "outputs": [{"name": "label", "type": "category"}],
            "model": {"hidden": [32]},
            "train": {"epochs": 30, "batch_size": 64, "progress": False},
        }
    )
    traffic_rows = [{k: v for k, v in rows[i].items() if k != "label"} for i in sorted(traffic)]
    return {"bundle": result.path, "metrics": result.metrics, "traffic": traffic_rows, "root": root}


def _serve_and_correct(store: Store, digits: dict, bundle: Path | None = None) -> Registry:
    """Register and promote v1, log its predictions on the traffic, correct the wrong ones to '3'."""
    registry = Registry(store)
    v1 = registry.register("digits", bundle or digits["bundle"])
    registry.promote("digits", v1.version)
    answers = largo.load(v1.path).predict(digits["traffic"])
    ids = [str(uuid.uuid4()) for _ in answers]
    StoreSink(store, "digits", 1).log_predictions(
        [
            {"id": i, "time": 1.0e9 + n, "inputs": x, "outputs": a, "latency_ms": 2.0}
            for n, (i, x, a) in enumerate(zip(ids, digits["traffic"], answers, strict=True))
        ]
    )
    wrong = [(i, a["label"]) for i, a in zip(ids, answers, strict=True) if a["label"] != "3"]
    assert len(wrong) > len(answers) // 2, "v1 should get most 3s wrong"
    store.add_feedback(
        [
            {
                "prediction_id": i,
                "model": "digits",
                "output": "label",
                "label": "3",
                "predicted": p,
                "time": 2.0e9,
                "source": "api",
            }  # fmt: skip
            for i, p in wrong
        ]
    )
    imported = [{"prediction_id": None, "model": "digits", "output": "label", "label": "3", "input": x,
                 "time": 2.0e9, "source": "import"} for x in digits["traffic"][:10]]  # fmt: skip
    store.add_feedback(imported)  # new labelled rows, as `largo feedback import` stores them
    return registry


def test_update_promotes_a_better_version_and_rollback_returns_v1(db_url: str, digits: dict) -> None:
    store = Store(db_url)
    registry = _serve_and_correct(store, digits)
    upd = load_update_config(
        {"update": {"feedback_weight": 3, "lr": 0.001, "epochs": 6, "gate": {"max_regression": 0.05}}}
    )
    result = update(registry, "digits", upd)
    print(result.table())
    assert result.promoted and result.version == 2
    assert registry.aliases("digits") == {"candidate": 2, "production": 2}
    # the frozen test split: the very rows v1 was tested on
    assert result.rows["test"] == digits["metrics"]["splits"]["test"]
    assert result.scores["test"]["old"]["label"]["accuracy"] == pytest.approx(
        digits["metrics"]["test"]["label"]["accuracy"]
    )
    fb_old, fb_new = (result.scores["feedback"][k]["label"]["accuracy"] for k in ("old", "new"))
    assert fb_new > fb_old + 0.3
    v2 = registry.get("digits", 2)
    assert v2.lineage["parent"] == 1 and len(v2.lineage["feedback_ids"]) == result.rows["feedback_train"]
    record = json.loads((v2.path / "update.json").read_text())
    held_out = set(record["feedback_ids"]["held_out"])
    trained = set(v2.lineage["feedback_ids"])
    assert held_out and not held_out & trained  # the held-out slice is never trained on
    assert len(held_out) + len(trained) == store.count(feedback) and result.skipped == {}
    assert "gate PASSED" in result.table() and "promoted v2 to production" in result.table()
    assert registry.rollback("digits").version == 1
    assert registry.resolve("digits") == Path(digits["bundle"]).resolve()


def test_a_parent_exported_to_onnx_gets_an_exported_successor(
    tmp_path: Path, digits: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """v1 exported to ONNX and int8 before it was registered (a server may run it on ONNX Runtime): v2 is
    exported and checked the same way before it is registered, so that server can swap it in; an
    export that fails its check blocks the promotion and says why."""
    import shutil

    import largo.api
    from largo.data.readers import DataError
    from largo.deploy.metadata import ParityError

    bundle = tmp_path / "v1"
    shutil.copytree(digits["bundle"], bundle)
    largo.export(bundle, "onnx", "int8")
    registry = _serve_and_correct(Store(f"sqlite:///{tmp_path / 'largo.db'}"), digits, bundle)
    upd = load_update_config(
        {"update": {"feedback_weight": 3, "lr": 0.001, "epochs": 6, "gate": {"max_regression": 0.05}}}
    )
    result = update(registry, "digits", upd)
    assert result.promoted, result.table()
    v2 = registry.get("digits", 2)
    registry.verify(v2)  # exported before it was registered: its hashes hold the ONNX files
    formats = json.loads((v2.path / "export.json").read_text())["formats"]
    assert formats["onnx"]["parity"]["passed"] and formats["onnx-int8"]["parity"]["passed"]
    assert json.loads((v2.path / "update.json").read_text())["export"]["passed"]
    assert largo.api.load(v2.path, runtime="onnx").predict(digits["traffic"][:3])  # it serves on ONNX

    def fail(*args: object, **kwargs: object) -> None:
        raise ParityError("parity check failed for onnx-int8")

    monkeypatch.setattr(largo.api, "export", fail)
    lenient = {"feedback_weight": 3, "lr": 0.001, "epochs": 1, "gate": {"min_gain": -1, "max_regression": 1}}
    result = update(registry, "digits", load_update_config({"update": lenient}))  # a gate that passes
    assert not result.promoted and registry.aliases("digits") == {"candidate": 3, "production": 2}
    assert "parity check failed for onnx-int8" in result.verdict.reason
    record = json.loads((registry.get("digits", 3).path / "update.json").read_text())
    assert record["export"]["passed"] is False and record["gate"]["passed"] is False

    def no_data(*args: object, **kwargs: object) -> None:
        raise DataError("valid split: 3 tokens, fewer than one window")

    monkeypatch.setattr(largo.api, "export", no_data)  # no held-out data: promoted, left unexported
    result = update(registry, "digits", load_update_config({"update": lenient}))
    record = json.loads((registry.get("digits", 4).path / "update.json").read_text())
    assert result.promoted and "no held-out data" in record["export"]["error"], (result.table(), record)


def test_the_gate_blocks_a_version_that_is_not_better_enough(tmp_path: Path, digits: dict) -> None:
    url = f"sqlite:///{tmp_path / 'largo.db'}"
    registry = _serve_and_correct(Store(url), digits)
    out = CliRunner().invoke(
        cli,
        ["update", "digits", "--db", url, "--set", "update.mode=retrain", "--set", "update.gate.min_gain=2"],
    )
    assert out.exit_code == 0, out.output
    assert "gate BLOCKED" in out.output and "< min_gain 2.0000" in out.output
    assert "v2 stays candidate; production stays v1" in out.output
    assert registry.aliases("digits") == {"candidate": 2, "production": 1}


def test_changed_data_stops_the_update(tmp_path: Path, digits: dict) -> None:
    bundle = Path(shutil.copytree(digits["bundle"], tmp_path / "runs" / "digits" / "v1"))
    data = Path(shutil.copy(digits["root"] / "digits.csv", tmp_path / "digits.csv"))
    config = yaml.safe_load((bundle / "config.yaml").read_text())
    config["data"]["train"] = str(data)
    (bundle / "config.yaml").write_text(yaml.safe_dump(config))
    registry = _serve_and_correct(Store(f"sqlite:///{tmp_path / 'largo.db'}"), digits, bundle)
    with data.open("a") as f:
        f.write(",".join(["0"] * 64) + ",3\n")
    with pytest.raises(UpdateError, match=r"digits\.csv changed \(sha256 .* since it was registered"):
        update(registry, "digits", load_update_config())
    assert [p.name for p in bundle.parent.iterdir()] == ["v1"]  # nothing half-written left behind


def test_update_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"update\.mode: .*'finetune' or 'retrain'"):
        load_update_config({"update": {"mode": "magic"}})
    with pytest.raises(ConfigError, match=r"update\.gate\.min_gian: unknown key"):
        load_update_config(None, ["update.gate.min_gian=0.1"])
    with pytest.raises(ConfigError, match=r"update\.holdout: .*less than 1"):
        load_update_config(None, ["update.holdout=1.5"])
    assert load_update_config(None, ["update.mode=retrain"]).mode == "retrain"
    path = tmp_path / "update.yaml"
    path.write_text("update:\n  mode: retrain\n  gate: {metric: f1_macro, min_gain: 0.05}\n")
    upd = load_update_config(path, ["update.feedback_weight=4"])
    assert (upd.mode, upd.gate.metric, upd.gate.min_gain, upd.feedback_weight) == (
        "retrain",
        "f1_macro",
        0.05,
        4,
    )
    path.write_text("mode: retrain\n")
    with pytest.raises(ConfigError, match=r"update\.yaml:\n  mode: unknown key"):
        load_update_config(path)


def test_a_gate_metric_must_fit_the_output(tmp_path: Path, digits: dict) -> None:
    registry = Registry(Store(f"sqlite:///{tmp_path / 'largo.db'}"))
    registry.promote("digits", registry.register("digits", digits["bundle"]).version)
    upd = load_update_config(None, ["update.gate.metric=rmse"])
    with pytest.raises(
        ConfigError, match=r"update\.gate\.metric: 'rmse' does not apply to the category output"
    ):
        update(registry, "digits", upd)
    with pytest.raises(UpdateError, match="no feedback rows to train on"):
        update(registry, "digits", load_update_config())


def test_full_cycle_while_serving(tmp_path: Path, digits: dict) -> None:
    # the cycle end to end over HTTP: serve v1, correct the 3s it gets wrong through
    # POST /feedback, update, and watch the running server move to v2, then back to v1 on rollback
    import httpx

    from largo.deploy.server import serve_in_thread
    from largo.lifecycle.serving import registered_app

    url = f"sqlite:///{tmp_path / 'largo.db'}"
    registry = Registry(Store(url))
    registry.promote("digits", registry.register("digits", digits["bundle"]).version)
    app, watcher = registered_app("digits", db=url, runtime="torch", poll_s=0.1)
    assert watcher is not None

    def served(base: str, client: httpx.Client) -> tuple[int, list[dict]]:
        answers = client.post(f"{base}/predict", json=digits["traffic"]).json()
        return client.get(f"{base}/health").json()["version"], answers

    def wait_for_version(base: str, client: httpx.Client, version: int) -> None:
        for _ in range(300):
            if client.get(f"{base}/health").json()["version"] == version:
                return
            time.sleep(0.05)
        raise AssertionError(f"the server never served v{version}")

    with serve_in_thread(app) as base, httpx.Client(timeout=60) as client:
        watcher.start()
        try:
            version, answers = served(base, client)
            assert version == 1
            wrong = [a for a in answers if a["label"] != "3"]
            assert len(wrong) > len(answers) // 2  # v1 gets most 3s wrong
            for a in wrong:
                r = client.post(f"{base}/feedback", json={"prediction_id": a["id"], "label": "3"})
                assert r.status_code == 200, r.text
            upd = load_update_config(
                {"update": {"feedback_weight": 3, "lr": 0.001, "epochs": 6, "gate": {"max_regression": 0.05}}}
            )
            result = update(registry, "digits", upd)
            assert result.promoted and result.version == 2
            wait_for_version(base, client, 2)  # hot-swapped, no restart
            _, after = served(base, client)
            threes = sum(a["label"] == "3" for a in after)
            assert threes > sum(a["label"] == "3" for a in answers) + len(after) // 4
            registry.rollback("digits")
            wait_for_version(base, client, 1)
            _, back = served(base, client)
            assert [a["label"] for a in back] == [a["label"] for a in answers]  # v1's answers again
        finally:
            watcher.stop()
