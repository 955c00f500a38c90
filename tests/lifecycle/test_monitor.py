"""`largo monitor`: PSI against the training data, predictions, feedback accuracy, latency, HTML report."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from sklearn.datasets import load_iris
from typer.testing import CliRunner

import largo
from largo.cli import app as cli
from largo.config import TextFeatureConfig
from largo.data.features import make_processor
from largo.lifecycle.monitor import input_drift, monitor, number_psi, parse_since
from largo.lifecycle.registry import Registry
from largo.lifecycle.sink import StoreSink
from largo.lifecycle.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")
JAN, JUN = datetime(2026, 1, 1, tzinfo=UTC).timestamp(), datetime(2026, 6, 1, tzinfo=UTC).timestamp()


def _iris_rows(shift: float = 0.0) -> list[dict[str, float]]:
    data = load_iris().data
    return [{f"x{i}": float(v) + shift * data[:, i].std() for i, v in enumerate(row)} for row in data]


def _log(store: Store, name: str, bundle: Path, rows: list[dict], at: float) -> list[tuple[str, str]]:
    """Predict and log like the server does; returns (prediction id, predicted species)."""
    answers = largo.load(bundle).predict(rows)
    ids = [str(uuid.uuid4()) for _ in rows]
    StoreSink(store, name, 1).log_predictions(
        [
            {"id": i, "time": at + n, "inputs": x, "outputs": a, "latency_ms": 1.0 + n % 7}
            for n, (i, x, a) in enumerate(zip(ids, rows, answers, strict=True))
        ]
    )
    return [(i, a["species"]) for i, a in zip(ids, answers, strict=True)]


def test_psi_of_a_shifted_sample_is_high_and_of_the_same_data_low() -> None:
    x = np.random.default_rng(0).normal(size=5000)
    assert number_psi(x, np.random.default_rng(1).normal(size=2000))[0] < 0.05
    assert number_psi(x, np.random.default_rng(1).normal(1.0, size=2000))[0] > 0.25
    with_missing = np.concatenate([x[:1000], np.full(1000, np.nan)])
    assert number_psi(x, with_missing)[0] > 0.25  # half missing is drift too


def number_psi_of(predicted: np.ndarray) -> float:
    """PSI of predicted class counts against iris's 50/50/50 labels (and no unseen class)."""
    share = np.maximum(predicted / predicted.sum(), 1e-4)
    ref = np.array([1 / 3, 1 / 3, 1 / 3, 1e-4])
    return float(np.sum((share - ref) * np.log(share / ref)))


def test_monitor_finds_drift_and_writes_the_report(db_url: str, iris_bundle: Path, tmp_path: Path) -> None:
    store = Store(db_url)
    registry = Registry(store)
    for name in ("iris", "iris-calm"):
        registry.promote(name, registry.register(name, iris_bundle).version)
    _log(store, "iris", iris_bundle, _iris_rows(), JAN)  # before --since: not counted
    served = _log(store, "iris", iris_bundle, _iris_rows(shift=2.0), JUN)
    _log(store, "iris-calm", iris_bundle, _iris_rows(), JUN)
    store.add_feedback(
        [
            {
                "prediction_id": i,
                "model": "iris",
                "output": "species",
                "label": "virginica",
                "predicted": p,
                "time": JUN + 60 * n,
                "source": "api",
            }  # fmt: skip
            for n, (i, p) in enumerate(served[:40])
        ]
    )

    drifted = monitor(registry, "iris", since="2026-05-01", out=tmp_path / "drift.html")
    print(drifted.table())
    assert drifted.rows == 150 and drifted.versions == {1: 150}
    assert all(d.psi > 0.25 and d.status == "drift" for d in drifted.inputs)
    assert [d.name for d in drifted.outputs] == ["species (predicted)", "species (confidence)"]
    assert drifted.latency["p50"] == pytest.approx(4.0)
    assert drifted.accuracy and drifted.accuracy[0]["rows"] == 40
    truth = np.mean([p == "virginica" for _, p in served[:40]])
    assert drifted.accuracy[0]["accuracy"] == pytest.approx(truth)
    html = (tmp_path / "drift.html").read_text()
    assert html.count('src="data:image/png;base64,') >= 7  # PSI, 4 inputs, classes, confidence, accuracy…
    assert "PSI per input" in html and "Accuracy on feedback" in html and "Latency" in html

    calm = monitor(registry, "iris-calm", out=tmp_path / "calm.html")
    assert all(d.psi < 0.1 and d.status == "stable" for d in calm.inputs)
    predicted = calm.outputs[0].plot[2][1]  # the classes the (2-epoch, setosa-happy) model predicted
    assert predicted.sum() == 150 and calm.outputs[0].psi == pytest.approx(number_psi_of(predicted))


def test_monitor_of_text_length_and_unknown_tokens() -> None:
    f = TextFeatureConfig(name="text", tokenizer={"kind": "char", "min_frequency": 1, "vocab_size": 100})
    proc = make_processor(f, False)
    train = ["short words here", "more short words", "words and words"] * 20
    proc.fit(pa.chunked_array([train]))
    same = input_drift(f, proc, train, train[:30])
    assert same.psi < 0.1 and "unk 0.0%" in same.current
    longer = input_drift(f, proc, train, ["zzqq xxyy ÄÖÜ long text with many new letters " * 3] * 30)
    assert longer.psi > 0.25 and longer.status == "drift"
    assert float(longer.current.split("unk ")[1].rstrip("%")) > 10


def test_cli_monitor_and_since(tmp_path: Path, iris_bundle: Path) -> None:
    url = f"sqlite:///{tmp_path / 'largo.db'}"
    registry = Registry(Store(url))
    registry.promote("iris", registry.register("iris", iris_bundle).version)
    _log(registry.store, "iris", iris_bundle, _iris_rows(shift=3.0), JUN)
    out = CliRunner().invoke(cli, ["monitor", "iris", "--db", url, "--out", str(tmp_path / "r.html")])
    assert out.exit_code == 0, out.output
    assert "150 predictions" in out.output and "drift" in out.output and (tmp_path / "r.html").exists()
    bad = CliRunner().invoke(cli, ["monitor", "iris", "--db", url, "--since", "last tuesday"])
    assert bad.exit_code == 2 and "expected a span like 7d" in bad.output
    assert parse_since("7d", now=1_000_000.0) == 1_000_000.0 - 7 * 86400
    assert parse_since("2026-06-01") == JUN and parse_since(12.5) == 12.5
