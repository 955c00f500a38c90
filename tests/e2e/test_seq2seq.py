"""Text pairs → encoder-decoder → bundle → translate, predict, evaluate, CLI: English number words to
Chinese numerals, a task whose every output can be checked exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

import largo
from largo.data.samples import chinese_number, english_number, write_number_pairs


def _config(data: Path, runs: Path, **train: object) -> dict:
    return {
        "task": "seq2seq",
        "name": "numbers",
        "runs_dir": str(runs),
        "data": {"train": str(data), "source": "english", "target": "chinese", "valid": 0.05, "test": 0.05},
        "tokenizer": {"vocab_size": 400, "max_source_length": 24, "max_target_length": 16},
        "model": {"dim": 64, "encoder_layers": 2, "decoder_layers": 2, "heads": 4, "dropout": 0.0},
        "train": {
            "epochs": 8,
            "batch_size": 32,
            "optimizer": {"name": "adamw", "lr": 2e-3},
            "schedule": {"name": "cosine", "warmup": 0.2},  # Transformers want warmup: ~1.5 epochs here
            "clip_grad_norm": 1.0,
            "eval_generate": 60,
            "progress": False,
            **train,
        },
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, largo.TrainResult]:
    root = tmp_path_factory.mktemp("seq2seq")
    data = write_number_pairs(root / "pairs.tsv", n=4000)
    return data, largo.train(_config(data, root / "runs"))


def test_the_model_learns_to_translate(trained: tuple[Path, largo.TrainResult]) -> None:
    _, result = trained
    m = result.metrics
    test = m["test"]["chinese"]
    assert test["type"] == "text" and test["support"] == 200 and test["bleu_tokenize"] == "zh"
    assert test["chrf"] > 95 and test["exact_match"] > 0.8, test
    assert test["perplexity"] < 1.5 and test["token_accuracy"] > 0.9
    history = m["history"]
    assert len(history) == 8
    assert history[-1]["valid.loss"] < history[0]["valid.loss"] / 5
    assert history[-1]["valid.chrf"] > history[0]["valid.chrf"] + 20
    # valid.loss is the exact per-token mean: exp of it is the logged perplexity
    assert history[-1]["valid.perplexity"] == pytest.approx(2.718281828 ** history[-1]["valid.loss"])
    # the report shows the scores and sample outputs beside their references
    html = result.report.read_text(encoding="utf-8")
    assert "Sample outputs" in html and m["examples"][0]["reference"] in html
    assert (result.path / "text_scores.png").stat().st_size > 5_000 and "text_scores.png" in html
    bundle = result.path
    assert {"config.yaml", "model.safetensors", "tokenizer.json", "metrics.json"} <= {
        p.name for p in bundle.iterdir()
    }
    assert not (bundle / "checkpoints").exists()


def test_a_loaded_bundle_translates_as_the_run_did(trained: tuple[Path, largo.TrainResult]) -> None:
    data, result = trained
    translator = largo.load(result.path)
    examples = result.metrics["examples"]
    got = translator.translate([e["source"] for e in examples])
    assert got == [e["output"] for e in examples]
    # numbers it never saw in training: most come out exactly right
    seen = set(data.read_text(encoding="utf-8").split("\n"))  # train, valid and test rows
    unseen = [n for n in range(10_000) if f"{english_number(n)}\t{chinese_number(n)}" not in seen][:50]
    outputs = translator.translate([english_number(n) for n in unseen], beams=3)
    right = sum(o == chinese_number(n) for o, n in zip(outputs, unseen, strict=True))
    assert right >= 35, list(zip(unseen, outputs, strict=True))[:10]
    # greedy streaming gives the same text as greedy decoding in a batch
    source = english_number(unseen[0])
    assert "".join(translator.stream(source, 16)) == translator.translate(source, beams=1)[0]


def test_predict_and_evaluate(trained: tuple[Path, largo.TrainResult], tmp_path: Path) -> None:
    data, result = trained
    rows = largo.predict(result.path, ["seven thousand eight hundred eight", "twelve"])
    assert [r["source"] for r in rows] == ["seven thousand eight hundred eight", "twelve"]
    assert all(isinstance(r["output"], str) for r in rows)
    assert rows[0]["output"] == "七千八百零八"
    one = largo.predict(result.path, {"english": "seven thousand eight hundred eight"})
    assert one == {"source": "seven thousand eight hundred eight", "output": "七千八百零八"}
    with pytest.raises(largo.DataError, match="needs a text 'english'"):
        largo.predict(result.path, [{"en": "five"}])
    # the commands for models of input and output features say what the bundle is
    from largo.deploy.metadata import BundleError

    with pytest.raises(BundleError, match="a seq2seq bundle"):
        largo.compress(result.path)
    pairs = tmp_path / "some.tsv"
    pairs.write_text("\n".join(data.read_text(encoding="utf-8").split("\n")[:101]) + "\n", encoding="utf-8")
    scores = largo.evaluate(result.path, pairs, tmp_path / "eval")
    assert scores["rows"] == 100
    assert scores["test"]["chinese"]["chrf"] > 90
    assert (tmp_path / "eval" / "report.html").exists()
    # a file without the source column names it
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tchinese\none\t一\n", encoding="utf-8")
    with pytest.raises(largo.DataError, match="english"):
        largo.predict(result.path, bad)


def test_an_int8_onnx_export_keeps_the_translations(trained: tuple[Path, largo.TrainResult]) -> None:
    """On a model that has learnt the task, ONNX Runtime fp32 writes torch's outputs and int8 weights
    keep their quality (tests/deploy/test_export_seq2seq.py checks the export itself on a small model)."""
    _, result = trained
    formats = largo.export(result.path, "onnx", "int8")["formats"]
    fp32, int8 = formats["onnx"]["parity"], formats["onnx-int8"]["parity"]
    assert fp32["passed"] and int8["passed"] and fp32["outputs"]["same"] == 1.0
    assert fp32["outputs"]["before"]["chrf"] > 95
    assert int8["outputs"]["after"]["chrf"] > int8["outputs"]["before"]["chrf"] - 2
    sources = ["seven thousand eight hundred eight", "twelve", "nine hundred ninety-nine thousand"]
    assert largo.load(result.path, runtime="onnx-int8").translate(sources)[0] == "七千八百零八"
    assert largo.load(result.path, runtime="onnx").translate(sources) == largo.translate(result.path, sources)


def test_cli_train_generate_and_predict(tmp_path: Path) -> None:
    data = write_number_pairs(tmp_path / "pairs.tsv", n=600)
    cfg = _config(data, tmp_path / "runs", epochs=1, eval_generate=0)
    path = tmp_path / "numbers.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    cli = [sys.executable, "-m", "largo.cli"]
    out = subprocess.run(
        [*cli, "train", str(path), "--set", "decode.beams=2", "--name", "cli"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "test chinese: " in out.stdout and "chrf=" in out.stdout
    bundle = tmp_path / "runs" / "cli" / "v1"
    assert yaml.safe_load((bundle / "config.yaml").read_text(encoding="utf-8"))["decode"]["beams"] == 2
    gen = subprocess.run([*cli, "generate", str(bundle), "three"], capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout == largo.load(bundle).translate("three", beams=2)[0] + "\n"  # the bundle's beams
    other = subprocess.run([*cli, "generate", str(tmp_path), "three"], capture_output=True, text=True)
    assert other.returncode == 2 and "not a language-model or seq2seq bundle" in other.stderr
    sampled = subprocess.run(
        [*cli, "generate", str(bundle), "three", "--beams", "2", "--temperature", "1"],
        capture_output=True,
        text=True,
    )
    assert sampled.returncode == 2 and "--beams 1" in sampled.stderr
    pred = subprocess.run(
        [*cli, "predict", str(bundle), "--text", "three", "--text", "four"], capture_output=True, text=True
    )
    assert pred.returncode == 0, pred.stderr
    lines = [json.loads(line) for line in pred.stdout.splitlines()]
    assert [r["source"] for r in lines] == ["three", "four"]
    # a bad key of a seq2seq config is named with what is allowed
    bad = subprocess.run(
        [*cli, "train", str(path), "--set", "train.early_stopping={metric: valid.f1_macro}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "train.early_stopping.metric: 'valid.f1_macro'" in bad.stderr
    assert "valid.perplexity" in bad.stderr and "valid.chrf" not in bad.stderr  # not logged: eval_generate 0


def test_config_errors_name_the_key() -> None:
    base = {"task": "seq2seq", "data": {"train": "x.tsv", "source": "a", "target": "a"}}
    with pytest.raises(largo.ConfigError, match="same column"):
        largo.train(base)
    base["data"]["target"] = "b"
    with pytest.raises(largo.ConfigError, match="model.heads|dim"):
        largo.train({**base, "model": {"dim": 30, "heads": 4}})
    with pytest.raises(largo.ConfigError, match="stratify"):
        largo.train({**base, "data": {**base["data"], "stratify": True}})


def test_served_over_post_generate(trained: tuple[Path, largo.TrainResult], tmp_path: Path) -> None:
    import httpx

    from largo.deploy.generate_service import create_generate_app, load_generator
    from largo.deploy.server import serve_in_thread

    _, result = trained
    translator = load_generator(result.path, "torch", "cpu")
    assert type(translator).__name__ == "Translator"
    app = create_generate_app(translator, max_new_tokens_limit=32, api_key="k", sink=None)
    source = "three thousand twenty"
    greedy = translator.translate(source, beams=1)[0]
    auth = {"Authorization": "Bearer k"}
    with serve_in_thread(app) as url:
        health = httpx.get(f"{url}/health").json()
        assert health["task"] == "seq2seq" and health["context"] == 24
        # no temperature: the model's default, greedy, so the text is the greedy translation
        r = httpx.post(f"{url}/generate", json={"prompt": source, "max_new_tokens": 16}, headers=auth)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["text"] == greedy and body["finish_reason"] == "stop"
        # the encoder read the source's tokens and its EOS, nothing cut
        read = len(translator.encode(source))
        assert body["prompt_tokens"] == read and body["prompt_truncated"] is False
        long = httpx.post(f"{url}/generate", json={"prompt": source * 10, "max_new_tokens": 4}, headers=auth)
        assert long.json()["prompt_tokens"] == 24 and long.json()["prompt_truncated"] is True  # its start
        endless = {"prompt": source, "max_new_tokens": 8, "stop_at_eot": False}
        no_end = httpx.post(f"{url}/generate", json=endless, headers=auth)
        assert no_end.status_code == 422 and "stop_at_eot" in no_end.text
        beam = httpx.post(
            f"{url}/generate", json={"prompt": source, "max_new_tokens": 16, "beams": 3}, headers=auth
        )
        assert beam.status_code == 200 and beam.json()["text"] == translator.translate(source, beams=3)[0]
        assert beam.json()["finish_reason"] == "stop"
        hot = {"prompt": source, "max_new_tokens": 16, "beams": 3, "temperature": 0.7}
        assert httpx.post(f"{url}/generate", json=hot, headers=auth).status_code == 422
        here = httpx.post(f"{url}/predict", json={"english": source}, headers=auth)
        assert here.status_code == 404 and "seq2seq model" in here.text
        streamed = httpx.post(
            f"{url}/generate", json={"prompt": source, "max_new_tokens": 16, "stream": True}, headers=auth
        )
        blocks = [b for b in streamed.text.split("\n\n") if b.strip()]
        assert blocks[-1].startswith("event: done") and len(blocks) >= 2
        assert json.loads(blocks[-1].split("data: ", 1)[1])["text"] == greedy
        # the usual limits: no key is 401, too many tokens 422 naming the field
        assert httpx.post(f"{url}/generate", json={"prompt": source}).status_code == 401
        bad = httpx.post(f"{url}/generate", json={"prompt": source, "max_new_tokens": 99}, headers=auth)
        assert bad.status_code == 422 and "max_new_tokens" in bad.text
        # a correction of the generation is accepted as feedback
        fb = {"prediction_id": body["id"], "completion": chinese_number(3020)}
        assert httpx.post(f"{url}/feedback", json=fb, headers=auth).status_code == 200
        # concurrent sources of different lengths are decoded as rows of one batch, each its own greedy text
        sources = [english_number(n) for n in (7, 15_204, 318, 99_999, 4_010, 60, 2_222_222)]

        def post(src: str) -> httpx.Response:
            body = {"prompt": src, "max_new_tokens": 24}
            return httpx.post(f"{url}/generate", json=body, headers=auth, timeout=60)

        with ThreadPoolExecutor(len(sources)) as pool:
            answers = list(pool.map(post, sources))
        assert httpx.get(f"{url}/health").json()["batching"] is True
        assert [a.json()["text"] for a in answers] == translator.translate(sources, beams=1)
    logged = {p.name: p.read_text(encoding="utf-8") for p in (result.path / "serving").glob("*.jsonl")}
    assert any(chinese_number(3020) in text for text in logged.values())  # the feedback row
    rows = [json.loads(line) for line in logged["predictions.jsonl"].splitlines()]
    first = next(r for r in rows if r["id"] == body["id"])
    assert first["inputs"]["temperature"] == 0.0 and first["outputs"]["text"] == greedy  # greedy by default


def test_a_free_text_target_beside_one_text_column_is_inferred_as_seq2seq(tmp_path: Path) -> None:
    data = write_number_pairs(tmp_path / "pairs.tsv", n=300)
    cfg, _ = largo.infer_config(data, "chinese")
    assert isinstance(cfg, largo.Seq2SeqConfig)
    assert (cfg.data.source, cfg.data.target) == ("english", "chinese")
    assert 16 <= cfg.tokenizer.max_target_length <= 32 and cfg.tokenizer.max_source_length >= 16
    shown = subprocess.run(
        [sys.executable, "-m", "largo.cli", "config", str(data), "--target", "chinese"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert shown.returncode == 0 and yaml.safe_load(shown.stdout)["task"] == "seq2seq"
    # a label column stays a classifier's output
    labels = tmp_path / "labels.csv"
    rows = [f"{english_number(n)},{'big' if n > 5000 else 'small'}" for n in range(0, 10_000, 37)]
    labels.write_text("text,size\n" + "\n".join(rows) + "\n", encoding="utf-8")
    classifier, _ = largo.infer_config(labels, "size")
    assert isinstance(classifier, largo.Config) and classifier.outputs[0].type == "category"
