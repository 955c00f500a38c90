"""Text end to end: Chinese and English through the CLI and the API, every encoder, mixed inputs,
GBK files, bad input, and a bundle that reloads to identical predictions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import largo
from largo.cli import app
from largo.data.readers import DataError
from largo.data.samples import news_rows, write_news_csv

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
LABELS = {"科技", "经济", "体育", "娱乐"}


def write_rows(path: Path, rows: list[dict], encoding: str = "utf-8") -> Path:
    with path.open("w", newline="", encoding=encoding) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def text_config(train: Path, runs: Path, encoder: dict, tokenizer: dict | None = None, **train_cfg) -> dict:
    return {
        "name": f"news-{encoder['kind']}",
        "runs_dir": str(runs),
        "data": {"train": str(train), "valid": 0.15, "test": 0.15},
        "inputs": [
            {"name": "text", "type": "text", "tokenizer": tokenizer or {"kind": "char"}, "encoder": encoder}
        ],
        "outputs": [{"name": "label", "type": "category"}],
        "model": {"hidden": [32], "dropout": 0.1},
        "train": {
            "epochs": 6,
            "batch_size": 32,
            "optimizer": {"name": "adamw", "lr": 3e-3},
            "progress": False,
            **train_cfg,
        },
    }


@pytest.fixture(scope="module")
def news_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_news_csv(tmp_path_factory.mktemp("news") / "news.csv", n=1600, seed=1)


@pytest.fixture(scope="module")
def cli_run(news_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    args = ["train", str(news_csv), "--target", "label", "--runs-dir", str(runs), "--no-progress"]
    result = runner.invoke(app, args)  # the inferred defaults, as a user gets them
    assert result.exit_code == 0, result.output
    return runs / "news" / "v1"


def test_cli_detects_the_text_column_and_picks_chinese_defaults(cli_run: Path) -> None:
    config = (cli_run / "config.yaml").read_text(encoding="utf-8")
    assert "type: text" in config and "kind: char" in config and "kind: bag" in config
    assert "ngrams: 3" in config and "pooling: mean\n" in config and "hidden: []" in config
    assert (cli_run / "tokenizer-text.json").exists()
    metrics = json.loads((cli_run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["test"]["label"]["accuracy"] > 0.8  # 4 classes: chance is 0.25
    info = json.loads(runner.invoke(app, ["info", str(cli_run)]).stdout)["inputs"][0]
    assert info["tokenizer"] == "char" and info["encoder"] == "bag" and info["vocab_size"] > 50
    assert info["train_texts"]["texts"] == 1280 and info["train_texts"]["empty"] == 0


def test_cli_predicts_raw_chinese_and_english_strings(cli_run: Path) -> None:
    result = runner.invoke(
        app,
        [
            "predict",
            str(cli_run),
            "--text",
            "这篇文章讨论了股市和银行的利率",
            "--text",
            "the football league",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["label"] for r in rows] == ["经济", "体育"]
    assert set(rows[0]["label_probabilities"]) == LABELS
    assert abs(sum(rows[0]["label_probabilities"].values()) - 1) < 1e-5


def test_api_predicts_from_records_and_strings_and_flags_empty_text(cli_run: Path) -> None:
    predictor = largo.load(cli_run)
    from_record = predictor.predict([{"text": "新的芯片和人工智能算法"}])[0]
    assert from_record["label"] == "科技" and from_record["label_probability"] > 0.5
    assert predictor.predict("记者报道明星的演唱会和电影票房")["label"] == "娱乐"
    empty = predictor.predict({"text": None})
    assert empty["warnings"] == ["text 'text' is empty after normalization"] and empty["label"] in LABELS


def test_bundle_reload_gives_identical_predictions(cli_run: Path) -> None:
    texts = [r["text"] for r in news_rows(50, seed=9)]
    a = largo.load(cli_run).predict(texts)
    b = largo.load(cli_run).predict(texts)
    assert a == b
    # batch composition does not change a row's answer (dynamic padding, length-sorted batches)
    one_by_one = [largo.load(cli_run).predict(t) for t in texts[:5]]
    for x, y in zip(a[:5], one_by_one, strict=True):
        assert x["label"] == y["label"] and abs(x["label_probability"] - y["label_probability"]) < 1e-5


def test_evaluate_rejects_labels_unseen_in_training(cli_run: Path, tmp_path: Path) -> None:
    path = write_rows(tmp_path / "new.csv", [{"text": "坦克和军舰", "label": "军事"}])
    with pytest.raises(DataError, match="labels not seen in training: '军事'"):
        largo.evaluate(cli_run, path)


ENCODERS = [
    ({"kind": "bag", "dim": 32}, {"kind": "char"}),
    ({"kind": "bag", "dim": 32, "ngrams": 2, "ngram_buckets": 4096, "pooling": "mean_max"}, {"kind": "bpe"}),
    ({"kind": "cnn", "dim": 32, "filters": 32, "kernel_sizes": [2, 3]}, {"kind": "jieba"}),
    ({"kind": "rnn", "cell": "lstm", "dim": 32, "hidden": 32}, {"kind": "char"}),
    (
        {"kind": "rnn", "cell": "gru", "dim": 32, "hidden": 32, "bidirectional": False, "pooling": "last"},
        None,
    ),
    ({"kind": "transformer", "dim": 32, "layers": 2, "heads": 2, "pooling": "cls"}, {"kind": "wordpiece"}),
]


@pytest.mark.parametrize(("encoder", "tokenizer"), ENCODERS, ids=lambda v: str(v and v.get("kind")))
def test_each_encoder_learns_the_topic_task(news_csv: Path, tmp_path: Path, encoder, tokenizer) -> None:
    lr = 1e-2 if encoder["kind"] == "bag" else 3e-3  # a bag of embeddings learns slowly at small rates
    result = largo.train(
        text_config(news_csv, tmp_path, encoder, tokenizer, epochs=12, optimizer={"name": "adamw", "lr": lr})
    )
    assert result.test["label"]["accuracy"] > 0.75, result.test["label"]  # chance 0.25


def test_text_combines_with_number_and_category_inputs(tmp_path: Path) -> None:
    # the label needs both the text's topic and the price: (tech or economy) AND price > 0; either
    # input alone gets 0.75 at best
    rng = np.random.default_rng(0)
    rows = []
    for r in news_rows(1200, seed=2):
        price = float(rng.normal())
        tech = r["label"] in ("科技", "经济")
        rows.append(
            {
                "text": r["text"],
                "price": round(price, 3),
                "shop": str(rng.choice(["a", "b", "c"])),
                "label": "yes" if tech and price > 0 else "no",
            }
        )
    path = write_rows(tmp_path / "mixed.csv", rows)
    cfg, _ = largo.infer_config(path, "label")
    assert [f.type for f in cfg.inputs] == ["text", "number", "category"]
    data = cfg.model_dump()
    data["runs_dir"] = str(tmp_path / "runs")
    data["train"].update(epochs=10, progress=False)
    result = largo.train(data)
    assert result.test["label"]["accuracy"] > 0.88
    predictor = largo.load(result.path)
    assert predictor.predict({"text": "人工智能芯片和算法", "price": 2.0, "shop": "a"})["label"] == "yes"
    assert predictor.predict({"text": "人工智能芯片和算法", "price": -2.0, "shop": "a"})["label"] == "no"
    assert predictor.predict({"text": "足球比赛的冠军", "price": 2.0, "shop": "a"})["label"] == "no"


def test_gbk_file_trains_and_keeps_chinese_labels(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "gbk.csv", news_rows(400, seed=3, english_share=0.0), encoding="gbk")
    encoder = {"kind": "bag", "dim": 32}
    result = largo.train(text_config(path, tmp_path / "runs", encoder, epochs=4))
    assert set(result.test["label"]["labels"]) == LABELS


def test_non_text_values_in_a_text_column_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(json.dumps({"text": ["a", "b"], "label": "x"}) for _ in range(5)), encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"bad\.jsonl: text feature 'text': data row 1 holds list"):
        largo.train(text_config(path, tmp_path / "runs", {"kind": "bag"}))


def test_long_texts_are_texts_and_missing_files_are_errors(cli_run: Path, tmp_path: Path) -> None:
    long_text = "股市和银行的利率" * 60  # far longer than any file name may be
    out = largo.predict(cli_run, long_text)
    assert out["label"] == "经济" and "cut to max_length" in out["warnings"][0]
    result = runner.invoke(app, ["predict", str(cli_run), str(tmp_path / "missing.csv")])
    assert result.exit_code == 2 and "missing.csv" in result.output


def test_predict_rejects_non_string_records(cli_run: Path) -> None:
    with pytest.raises(DataError, match="row 1 holds a dict"):
        largo.load(cli_run).predict([{"text": {"nested": 1}}])
