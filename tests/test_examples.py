"""The shipped examples stay valid: every config validates and the quickstart reaches its accuracy."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import pytest

from largo import load_config
from largo.config_lm import read_lm_yaml, validate_lm_config
from largo.config_seq2seq import load_seq2seq_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.inputs and cfg.outputs


@pytest.mark.parametrize("path", sorted((EXAMPLES / "lm").glob("*.yaml")), ids=lambda p: p.name)
def test_example_lm_config_validates(path: Path) -> None:
    cfg = validate_lm_config(read_lm_yaml(path), str(path))
    assert cfg.task == "lm" and cfg.data.paths


@pytest.mark.parametrize("path", sorted((EXAMPLES / "seq2seq").glob("*.yaml")), ids=lambda p: p.name)
def test_example_seq2seq_config_validates(path: Path) -> None:
    cfg = load_seq2seq_config(path)
    assert cfg.task == "seq2seq" and cfg.data.source != cfg.data.target


@pytest.mark.slow
def test_quickstart_reaches_98_percent_with_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    module = runpy.run_path(str(EXAMPLES / "quickstart.py"))
    assert module["main"]() == 0  # main() returns non-zero when test accuracy < 0.98
    bundle = tmp_path / "runs" / "digits" / "v1"
    assert (bundle / "report.html").exists() and (bundle / "model.safetensors").exists()
    assert os.path.getsize(bundle / "confusion_label.png") > 10_000
