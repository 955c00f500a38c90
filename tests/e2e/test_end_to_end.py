"""End to end through the Python API and the CLI: train → bundle → load → predict → evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch
from typer.testing import CliRunner

import largo
from largo.cli import app

runner = CliRunner()


def _image_config(folder: Path, runs: Path, **train: object) -> dict:
    return {
        "name": "digits",
        "runs_dir": str(runs),
        "data": {"train": str(folder), "valid": 0.1, "test": 0.1},
        "inputs": [{"name": "image", "type": "image", "encoder": "cnn-classic"}],
        "outputs": [{"name": "label", "type": "category"}],
        "model": {"hidden": [64], "dropout": 0.1},
        "train": {
            "epochs": 6,
            "batch_size": 64,
            "optimizer": {"name": "adam", "lr": 3e-3},
            "progress": False,
            **train,
        },
    }


@pytest.fixture(scope="module")
def digits_run(digits_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> largo.TrainResult:
    return largo.train(_image_config(digits_folder, tmp_path_factory.mktemp("runs")))


def test_image_folder_trains_an_accurate_cnn(digits_run: largo.TrainResult) -> None:
    m = digits_run.test["label"]
    assert m["accuracy"] > 0.93
    assert len(m["confusion_matrix"]) == 10 and sum(map(sum, m["confusion_matrix"])) == 180
    assert digits_run.metrics["splits"] == {"train": 1437, "valid": 180, "test": 180}
    assert len(digits_run.metrics["history"]) == 6


def test_bundle_layout_is_safetensors_only(digits_run: largo.TrainResult) -> None:
    files = {p.name for p in digits_run.path.iterdir()}
    assert {"config.yaml", "model.safetensors", "preprocessors.json", "metrics.json", "report.html"} <= files
    assert any(f.startswith("confusion_") and f.endswith(".png") for f in files)
    assert not list(digits_run.path.rglob("*.pt")) and not list(digits_run.path.rglob("*.pkl"))
    assert "checkpoints" not in files  # deleted after a finished run unless checkpoint.keep


def test_load_never_unpickles(digits_run: largo.TrainResult, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must not be used to load a bundle")

    monkeypatch.setattr(torch, "load", refuse)
    assert largo.load(digits_run.path).predict(
        {"image": str(next(digits_run.path.parent.parent.rglob("*.png"), ""))}
    )


def test_reloaded_bundle_predicts_the_same(digits_run: largo.TrainResult, digits_folder: Path) -> None:
    paths = sorted(str(p) for p in digits_folder.rglob("*.png"))[::90]
    a = largo.load(digits_run.path).predict([{"image": p} for p in paths])
    b = largo.load(digits_run.path).predict([{"image": p} for p in paths])
    assert a == b
    first = a[0]
    assert set(first) == {"label", "label_probability", "label_probabilities"}
    assert first["label_probability"] == max(first["label_probabilities"].values())
    assert sum(first["label_probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    truth = [Path(p).parent.name for p in paths]
    assert np.mean([r["label"] == t for r, t in zip(a, truth, strict=True)]) > 0.9


def test_evaluate_on_a_table_of_image_paths(
    digits_run: largo.TrainResult, digits_folder: Path, tmp_path: Path
) -> None:
    paths = sorted(digits_folder.rglob("*.png"))[::7]
    # relative image paths are resolved against the table's folder
    table = pa.table(
        {"image": [str(p.relative_to(digits_folder)) for p in paths], "label": [p.parent.name for p in paths]}
    )
    pacsv.write_csv(table, digits_folder / "subset.csv")
    result = largo.evaluate(digits_run.path, digits_folder / "subset.csv", report_dir=tmp_path / "eval")
    assert result["rows"] == len(paths)
    assert result["test"]["label"]["accuracy"] > 0.9
    assert (tmp_path / "eval" / "report.html").exists()
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]["label"]["support"] == len(
        paths
    )


def test_unseen_label_at_evaluate_is_a_clear_error(
    digits_run: largo.TrainResult, digits_folder: Path, tmp_path: Path
) -> None:
    p = next(digits_folder.rglob("*.png"))
    pacsv.write_csv(pa.table({"image": [str(p)], "label": ["eleven"]}), tmp_path / "bad.csv")
    with pytest.raises(largo.DataError, match="not seen in training: 'eleven'"):
        largo.evaluate(digits_run.path, tmp_path / "bad.csv")


def test_missing_input_field_is_a_clear_error(digits_run: largo.TrainResult) -> None:
    with pytest.raises(largo.DataError, match="missing input 'image'"):
        largo.load(digits_run.path).predict([{"picture": "x.png"}])


def test_regression_on_diabetes(diabetes_csv: Path, tmp_path: Path) -> None:
    cfg, inferred = largo.infer_config(diabetes_csv, "progression")
    assert [f["type"] for f in inferred.outputs] == ["number"]
    assert len(inferred.inputs) == 10
    data = cfg.model_dump(mode="json")
    data["runs_dir"] = str(tmp_path)
    data["train"].update(epochs=60, progress=False)
    result = largo.train(data)
    m = result.test["progression"]
    assert m["r2"] > 0.3 and m["mae"] < 55
    # predictions come back in the target's own units (diabetes progression is ~25..346)
    preds = largo.predict(result.path, diabetes_csv)
    values = np.array([p["progression"] for p in preds])
    assert 100 < values.mean() < 200 and values.std() > 20
    assert (result.path / "report.html").read_text().count("residuals_progression.png") == 1


def test_missing_targets_are_counted_not_silently_dropped(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    label = np.where(x > 0, "pos", "neg").astype(object)
    label[:7] = None
    pacsv.write_csv(pa.table({"x": x, "label": pa.array(list(label), pa.string())}), tmp_path / "d.csv")
    cfg, _ = largo.infer_config(tmp_path / "d.csv", "label")
    data = cfg.model_dump(mode="json") | {"runs_dir": str(tmp_path / "runs")}
    data["train"].update(epochs=3, progress=False)
    result = largo.train(data)
    counts = result.metrics["cleaning"]["train"]
    assert counts["missing_target"] == 7 and counts["rows_kept"] == 293
    assert sum(result.metrics["splits"].values()) == 293
    assert "missing_target" in (result.path / "report.html").read_text()


# ------------------------------------------------------------------------------------------- CLI


def test_cli_train_infers_config_then_predict_evaluate_info(digits_csv: Path, tmp_path: Path) -> None:
    res = runner.invoke(
        app,
        [
            "train",
            str(digits_csv),
            "--target",
            "label",
            "--epochs",
            "8",
            "--runs-dir",
            str(tmp_path),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    bundle = tmp_path / "digits" / "v1"
    assert f"bundle:  {bundle}" in res.output and "report.html" in res.output
    resolved = (bundle / "config.yaml").read_text()
    assert "type: number" in resolved and "type: category" in resolved and "epochs: 8" in resolved

    # re-running the written config gives the next version
    res = runner.invoke(app, ["train", str(bundle / "config.yaml"), "--set", "train.epochs=1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "digits" / "v2" / "model.safetensors").exists()

    out = tmp_path / "preds.csv"
    res = runner.invoke(app, ["predict", str(bundle), str(digits_csv), "--output", str(out)])
    assert res.exit_code == 0, res.output
    preds = pacsv.read_csv(out)
    assert preds.num_rows == 1797
    assert {"label", "label_probability", "label_prob_0", "label_prob_9"} <= set(preds.column_names)
    truth = pacsv.read_csv(digits_csv).column("label").to_pylist()
    assert np.mean(np.array(preds.column("label").to_pylist()) == np.array(truth)) > 0.9

    res = runner.invoke(app, ["evaluate", str(bundle), "--data", str(digits_csv)])
    assert res.exit_code == 0, res.output
    assert "accuracy=" in res.output and "rows: 1797" in res.output

    res = runner.invoke(app, ["info", str(bundle)])
    assert res.exit_code == 0
    info = json.loads(res.output)
    assert info["outputs"][0]["labels"] == [str(i) for i in range(10)]
    assert info["parameters"] > 1000

    jsonl = tmp_path / "one.jsonl"
    row = {f"p{i}": 0.0 for i in range(64)}
    jsonl.write_text(json.dumps(row) + "\n")
    res = runner.invoke(app, ["predict", str(bundle), str(jsonl)])
    assert (
        res.exit_code == 0
        and json.loads(res.stdout.strip().splitlines()[-1])["label"] in info["outputs"][0]["labels"]
    )


def test_cli_bad_config_names_key_and_allowed_values(tmp_path: Path, digits_csv: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        f"data: {{train: {digits_csv}}}\ninputs: [{{name: p0, type: number}}]\n"
        "outputs: [{name: label, type: category}]\ntrain: {optimizer: {name: adamx}}\n"
    )
    res = runner.invoke(app, ["train", str(cfg)])
    assert res.exit_code == 2
    assert "train.optimizer.name" in res.output and "adamx" in res.output and "'adamw'" in res.output


def test_cli_malformed_row_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,label\n1,2,x\n3,4,y\n5,6,7,8\n9,10,x\n")
    res = runner.invoke(app, ["train", str(bad), "--target", "label", "--runs-dir", str(tmp_path)])
    assert res.exit_code == 2
    assert "bad.csv:4" in res.output


def test_gbk_file_with_chinese_categories(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cities = rng.choice(["北京", "上海", "广州"], size=240)
    price = rng.normal(size=240)
    label = np.where(cities == "北京", "高", "低")
    lines = ["城市,价格,标签"] + [
        f"{c},{p:.3f},{lab}" for c, p, lab in zip(cities, price, label, strict=True)
    ]
    path = tmp_path / "gbk.csv"
    path.write_bytes("\n".join(lines).encode("gbk"))
    res = runner.invoke(
        app,
        [
            "train",
            str(path),
            "--target",
            "标签",
            "--epochs",
            "15",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    bundle = tmp_path / "runs" / "gbk" / "v1"
    p = largo.load(bundle)
    assert p.labels["标签"] == ["低", "高"]
    assert p.predict({"城市": "北京", "价格": 0.1})["标签"] == "高"
    assert p.predict({"城市": "上海", "价格": 0.1})["标签"] == "低"


def test_table_of_image_paths_with_separate_valid_and_test_files(digits_folder: Path, tmp_path: Path) -> None:
    paths = sorted(digits_folder.rglob("*.png"))
    rng = np.random.default_rng(0)
    rng.shuffle(paths)
    parts = {"train": paths[:1200], "valid": paths[1200:1500], "test": paths[1500:]}
    for split, items in parts.items():  # relative paths, resolved against each table's own folder
        table = pa.table(
            {
                "path": [str(p.relative_to(digits_folder)) for p in items],
                "digit": [p.parent.name for p in items],
            }
        )
        pacsv.write_csv(table, digits_folder / f"{split}.csv")
    cfg, inferred = largo.infer_config(digits_folder / "train.csv", "digit")
    # an image column; shifts of 1 px (8x8 images / 14) read from the first image, found via the table folder
    assert inferred.inputs == [{"name": "path", "type": "image", "augment": {"crop": 1}}]
    data = cfg.model_dump(mode="json")
    data["data"].update(valid=str(digits_folder / "valid.csv"), test=str(digits_folder / "test.csv"))
    data["runs_dir"] = str(tmp_path)
    data["train"].update(epochs=4, progress=False)
    result = largo.train(data)
    assert result.metrics["splits"] == {"train": 1200, "valid": 300, "test": 297}
    assert result.test["digit"]["accuracy"] > 0.9
    assert set(result.metrics["cleaning"]) == {"train", "valid", "test"}


def test_every_verb_has_help() -> None:
    for verb in ("train", "evaluate", "predict", "info", "config"):
        res = runner.invoke(app, [verb, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output, verb
