"""Tests for largo.evaluate.report: files written, PNGs valid, HTML escaped and complete."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from largo.evaluate.metrics import classification_metrics, regression_metrics
from largo.evaluate.report import write_metrics_json, write_report

LABELS = ["正面", "<b>bold</b>", "neutral"]


def _history() -> list[dict]:
    return [
        {
            "epoch": e,
            "step": 10 * e,
            "lr": 1e-3 / e,
            "time_s": 0.5,
            "train.loss": 1.0 / e,
            "valid.loss": 1.2 / e,
            "valid.accuracy": 0.5 + 0.1 * e,
            "valid.f1_macro": 0.45 + 0.1 * e,
        }
        for e in (1, 2, 3)
    ]


def _classification_run() -> dict:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, size=60)
    y_pred = np.where(rng.random(60) < 0.8, y_true, rng.integers(0, 3, size=60))
    probs = rng.dirichlet(np.ones(3), size=60)
    test = {"type": "category", **classification_metrics(y_true, y_pred, LABELS, probs=probs)}
    return {
        "name": "sentiment",
        "version": "v1",
        "history": _history(),
        "test": {"label": test},
        "valid": {"label": test},
        "splits": {"train": 480, "valid": 60, "test": 60},
        "cleaning": {"rows_read": 612, "missing_target": 7, "duplicates": 5, "rows_kept": 600},
        "stopped_early": False,
        "best_epoch": 3,
        "train_time_s": 1.5,
        "config": {"name": "sentiment", "outputs": [{"name": "label", "type": "category"}]},
    }


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 100 and image.size[1] > 100


def test_classification_report_writes_html_and_pngs(tmp_path: Path) -> None:
    metrics = _classification_run()
    html_path = write_report(tmp_path / "out", metrics)
    assert html_path == tmp_path / "out" / "report.html"
    for name in ("loss.png", "metrics.png", "lr.png", "confusion_label.png", "per_class_label.png"):
        _assert_png(tmp_path / "out" / name)

    text = html_path.read_text(encoding="utf-8")
    assert "&lt;b&gt;bold&lt;/b&gt;" in text and "<b>bold</b>" not in text
    assert "正面" in text
    assert "missing_target" in text and ">7<" in text and ">612<" in text
    assert f"{metrics['test']['label']['accuracy']:.4f}" in text
    assert 'src="confusion_label.png"' in text
    assert "<pre>" in text and "sentiment" in text


def test_regression_only_report(tmp_path: Path) -> None:
    y_true = np.linspace(0, 10, 40)
    y_pred = y_true + np.sin(y_true)
    metrics = {
        "name": "price",
        "test": {"price": {"type": "number", **regression_metrics(y_true, y_pred)}},
        "history": [{"epoch": 1, "train.loss": 2.0, "valid.loss": 2.5}],
    }
    html_path = write_report(tmp_path, metrics, predictions={"price": (y_true, y_pred)})
    _assert_png(tmp_path / "residuals_price.png")
    _assert_png(tmp_path / "loss.png")
    assert not (tmp_path / "metrics.png").exists()  # no valid.* metric besides the loss
    assert not list(tmp_path.glob("confusion_*.png"))
    text = html_path.read_text(encoding="utf-8")
    assert f"{metrics['test']['price']['rmse']:.4f}" in text and "r2" in text


def test_missing_history_and_sparse_metrics(tmp_path: Path) -> None:
    html_path = write_report(
        tmp_path, {"valid": {"label": classification_metrics([0, 1], [0, 0], ["a", "b"])}}
    )
    assert html_path.is_file()
    assert not (tmp_path / "loss.png").exists()
    _assert_png(tmp_path / "confusion_label.png")  # falls back to valid when there is no test
    assert write_report(tmp_path / "empty", {}).is_file()


def test_write_metrics_json_handles_nan(tmp_path: Path) -> None:
    path = write_metrics_json(tmp_path, {"a": float("nan"), "b": np.float32(1.5), "c": "中文"})
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == {"a": None, "b": pytest.approx(1.5), "c": "中文"}
