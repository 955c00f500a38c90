"""A seq2seq model exported to ONNX (its encoder and a decoding step with the KV cache): parity checks in
export.json, the ONNX rows of a continuous batch against `Seq2SeqRows`, beam search and greedy text
against `Translator`, and POST /generate served by `largo serve --runtime onnx` where torch cannot be
imported."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import largo
from largo.cli import app as cli
from largo.data.samples import english_number, write_number_pairs
from largo.deploy import lm_onnx
from largo.deploy.seq2seq_onnx import OnnxSeq2Seq, OnnxSeq2SeqRows, OnnxTranslator
from largo.deploy.translator import Translator
from largo.models.seq2seq import NEVER, Seq2SeqRows
from tests.deploy.test_export_lm import benchmarked
from tests.deploy.test_server import start_cli, stop_cli, torch_blocked  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
SOURCES = [english_number(n) for n in (7, 15_204, 318, 99_999, 4_010, 60, 2_222_222, 1_000_001, 42)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small encoder-decoder trained 5 epochs on English number words → Chinese numerals (far from
    right, but each source gets its own output), exported to ONNX and int8."""
    root = tmp_path_factory.mktemp("seq2seq-onnx")
    data = write_number_pairs(root / "pairs.tsv", n=2000)
    result = largo.train({
        "task": "seq2seq", "name": "numbers", "runs_dir": str(root / "runs"),
        "data": {"train": str(data), "source": "english", "target": "chinese", "valid": 0.05, "test": 0.05},
        "tokenizer": {"vocab_size": 300, "max_source_length": 24, "max_target_length": 16},
        "model": {"dim": 48, "encoder_layers": 1, "decoder_layers": 2, "heads": 2, "dropout": 0.0},
        "train": {"epochs": 5, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 3e-3},
                  "schedule": {"name": "cosine", "warmup": 0.1}, "progress": False, "eval_generate": 10},
    })  # fmt: skip
    largo.export(result.path, "onnx", "int8")
    return Path(result.path)


@pytest.fixture(scope="module")
def translator(exported: Path) -> Translator:
    return Translator.load(exported)


def test_export_checks_both_graphs_whole_and_as_rows_of_a_batch(exported: Path) -> None:
    record = json.loads((exported / "export.json").read_text())
    fp32, int8 = record["formats"]["onnx"], record["formats"]["onnx-int8"]
    assert fp32["files"] == ["encoder.onnx", "decoder.onnx"] and int8["files"][1] == "decoder.int8.onnx"
    assert all((exported / f).exists() for f in fp32["files"] + int8["files"])
    assert fp32["data"] == "test split" and fp32["parity"]["passed"] and int8["parity"]["passed"]
    check = fp32["parity"]
    for way in ("whole", "rows"):  # teacher-forced; sources joining and leaving a batch step by step
        assert check[way]["max_abs_diff"] < 1e-4 and check[way]["argmax_agreement"] == 1.0
        assert check[way]["positions"] == check["tokens"] > check["pairs"] * 3
    assert check["pairs"] == 32 and check["outputs"]["beams"] == 4
    assert check["outputs"]["same"] >= 0.9  # beam-searched outputs of the two runtimes
    assert check["outputs"]["before"]["chrf"] == pytest.approx(check["outputs"]["after"]["chrf"], abs=2)
    ppl = int8["parity"]["perplexity"]
    assert ppl["before"] > 1 and abs(ppl["increase"]) < 0.05  # int8 weights cost little perplexity


def test_a_failed_parity_check_exits_1_and_is_recorded(exported: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "copy"
    shutil.copytree(exported, bundle)
    pairs = write_number_pairs(tmp_path / "held_out.tsv", n=40, seed=9)
    result = runner.invoke(cli, ["export", str(bundle), "--data", str(pairs), "--max-diff", "1e-12"])
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and "parity check failed for onnx" in result.output
    assert "outputs (4 beams)" in result.output and "chrF" in result.output
    check = json.loads((bundle / "export.json").read_text())["formats"]["onnx"]
    assert check["data"] == str(pairs) and check["parity"]["passed"] is False
    assert runner.invoke(cli, ["export", str(bundle), "--format", "torchscript"]).exit_code != 0


def test_onnx_rows_match_seq2seq_rows_as_rows_join_and_leave(exported: Path, translator: Translator) -> None:
    """Sources of different lengths join a batch at different steps (the buffers double their rows),
    one leaves from the middle (the last row moves into its place), another joins; every step's logits
    are torch's."""
    model, ids = OnnxSeq2Seq(exported), [translator.encode(s) for s in SOURCES]
    want = Seq2SeqRows(translator.model, 8, translator.context)
    got = OnnxSeq2SeqRows(model, 8, translator.config.model.context, translator.context)
    assert got.k.shape[1] == 2  # rows start at two and double as sources join

    def same(a: torch.Tensor, b: np.ndarray) -> None:
        a = a.numpy()
        keep = np.setdiff1d(np.arange(a.shape[-1]), NEVER)
        assert np.isneginf(b[..., NEVER]).all()
        np.testing.assert_allclose(b[..., keep], a[..., keep], atol=1e-4)

    tokens: list[int] = []
    for i in range(3):
        same(want.add(ids[i]), got.add(ids[i]))
        tokens.append(5 + i)
    for step in range(4):
        if step == 2:
            want.remove(1)
            got.remove(1)
            tokens[1] = tokens.pop()
            same(want.add(ids[3]), got.add(ids[3]))
            tokens.append(9)
        same(want.step(tokens), got.step(tokens))
        tokens = [(t * 7 + step) % 250 + 3 for t in tokens]
    assert (
        got.rows == want.rows == 3 and got.k.shape[1] == 4 and got.sources == [len(ids[i]) for i in (0, 2, 3)]
    )
    calls = {"n": 0}
    run = got._run

    def failing(tokens: list[int], rows: slice):  # noqa: ANN202 - the first new source's BOS pass fails
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        return run(tokens, rows)

    got._run = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="injected"):
        got.add(ids[4])
    assert got.rows == 3 and len(got.sources) == 3  # the rows that were there stay as they were
    same(want.step(tokens), got.step(tokens))
    got.clear()
    assert got.rows == 0 and got.sources == []
    with pytest.raises(ValueError, match="sources of 1 to 24 tokens"):
        got.add([])


@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8"])
def test_onnx_translator_translates_as_torch(exported: Path, translator: Translator, runtime: str) -> None:
    onnx = largo.load(exported, runtime=runtime)
    assert isinstance(onnx, OnnxTranslator) and onnx.info()["runtime"] == runtime
    agree = 0
    assert len(set(translator.translate(SOURCES))) >= 5  # outputs that tell the sources apart
    for beams in (1, 4):
        want = translator.translate(SOURCES, beams=beams)
        got = onnx.translate(SOURCES, beams=beams, batch_size=4)  # batches of other sizes: same outputs
        if runtime == "onnx":
            assert got == want, beams
        agree += sum(a == b for a, b in zip(got, want, strict=True))
    assert agree >= len(SOURCES)  # int8 weights may flip near-ties, not most outputs
    if runtime == "onnx":
        for source in SOURCES[:4]:  # streamed greedy text, and a beam search of one source
            assert onnx.generate(source, 16) == translator.generate(source, 16)
            assert onnx.beam_ids(source, 16, 3) == translator.beam_ids(source, 16, 3)
        assert largo.predict(onnx, SOURCES[:2]) == largo.predict(translator, SOURCES[:2])
    a, b = (
        onnx.generate("forty two", 16, temperature=1.0, seed=3),
        onnx.generate("forty two", 16, temperature=1.0, seed=3),
    )
    assert a == b  # seeded sampling repeats
    assert len({onnx.generate("forty two", 16, temperature=2.0, seed=s) for s in range(6)}) > 1
    with pytest.raises(ValueError, match="scored on torch"):
        largo.evaluate(onnx, exported / "missing.tsv")


def test_cli_generate_and_errors(exported: Path, translator: Translator, tmp_path: Path) -> None:
    from largo.deploy.generate_service import load_generator
    from largo.deploy.metadata import BundleError

    result = runner.invoke(cli, ["generate", str(exported), SOURCES[1], "--runtime", "onnx"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == translator.translate(SOURCES[1])[0]  # beam search, the bundle's beams
    bare = tmp_path / "plain"
    shutil.copytree(exported, bare, ignore=shutil.ignore_patterns("*.onnx", "export.json"))
    with pytest.raises(BundleError, match="no encoder.int8.onnx, decoder.int8.onnx; run `largo export"):
        load_generator(bare, "onnx-int8")
    with pytest.raises(ValueError, match="a seq2seq model serves on auto, torch"):
        load_generator(bare, "tensorrt")
    with pytest.raises(ValueError, match="seq2seq model loads on torch, torch-bf16, onnx"):
        largo.load(bare, runtime="tensorrt")


def test_benchmark_times_every_runtime_and_auto_serves_the_fastest_that_passed(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from largo.deploy.generate_service import load_generator, runtime_of

    bundle, bench, output = benchmarked(exported, tmp_path)
    assert bench["beams"] == 4 and "sources/s" in output  # beam-search translation timed too
    for m in bench["runtimes"].values():
        assert m["tokens_per_s"]["8"] > 0 and m["sources_per_s"] > 0 and m["parity_passed"]
    (bundle / "export.json").unlink()  # no benchmark: torch, or ONNX Runtime where torch is missing
    assert runtime_of(load_generator(bundle, "auto", device="cpu")) == "torch"
    monkeypatch.setattr(lm_onnx, "_has_torch", lambda: False)
    assert runtime_of(load_generator(bundle, "auto", device="cpu")) == "onnx"


def test_largo_serve_runtime_onnx_translates_without_torch(
    exported: Path,
    translator: Translator,
    torch_blocked: dict[str, str],  # noqa: F811
) -> None:
    """The light deployment of a seq2seq bundle: concurrent greedy requests decoded as rows of one batch
    and a beam search, each the text torch writes."""
    proc, url = start_cli([str(exported), "--runtime", "onnx", "--max-batch", "4"], torch_blocked)
    try:
        health = httpx.get(f"{url}/health").json()
        assert health["runtime"] == "onnx" and health["task"] == "seq2seq" and health["batching"]
        answers: dict[int, dict] = {}

        def ask(i: int, body: dict) -> None:
            answers[i] = httpx.post(f"{url}/generate", json=body, timeout=60).json()

        bodies = [{"prompt": s, "max_new_tokens": 16} for s in SOURCES]
        bodies.append({"prompt": SOURCES[3], "max_new_tokens": 16, "beams": 3})
        threads = [threading.Thread(target=ask, args=(i, b)) for i, b in enumerate(bodies)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        greedy = translator.translate(SOURCES, beams=1, max_new_tokens=16)
        assert [answers[i]["text"] for i in range(len(SOURCES))] == greedy
        assert (
            answers[len(SOURCES)]["text"] == translator.translate(SOURCES[3], beams=3, max_new_tokens=16)[0]
        )
        assert httpx.post(f"{url}/generate", json={"prompt": "x", "max_new_tokens": -1}).status_code == 422
    finally:
        log = stop_cli(proc)
    assert "OnnxTranslator" in log and "Traceback" not in log, log
