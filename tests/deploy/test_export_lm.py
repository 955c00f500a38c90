"""A language model exported to ONNX with its KV cache: parity checks in export.json, the ONNX rows of a
continuous batch against `GPTRows`, numpy sampling against torch's, greedy text against `TextGenerator`,
and POST /generate served by `largo serve --runtime onnx` in a process where torch cannot be imported."""

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

import largo.api
import largo.api_lm
from largo.cli import app as cli
from largo.config_lm import LMTokenizerConfig
from largo.data import corpus
from largo.deploy import lm_onnx
from largo.deploy.generator import TextGenerator
from largo.deploy.lm_onnx import (
    MIN_TEMPERATURE,
    OnnxLM,
    OnnxRows,
    OnnxTextGenerator,
    next_tokens_numpy,
    sample_rows_numpy,
)
from largo.models import layers
from largo.models.gpt import GPTRows
from tests.deploy.test_generate_server import events
from tests.deploy.test_server import start_cli, stop_cli, torch_blocked  # noqa: F401 - a fixture
from tests.lm_corpus import tiny_lm_config, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
PROMPTS = ["the cat sat", "今天天气", "", "birds sang songs of joy under old trees and the dog ran"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT pretrained for 40 steps on a generated corpus, exported to ONNX and int8."""
    tmp = tmp_path_factory.mktemp("lm-onnx")
    result = largo.api_lm.pretrain(tiny_lm_config(write_corpus(tmp / "corpus"), tmp / "runs"))
    bundle = Path(result.path)
    largo.api.export(bundle, "onnx", "int8")
    return bundle


@pytest.fixture(scope="module")
def torch_gen(exported: Path) -> TextGenerator:
    return TextGenerator.load(exported)


def test_export_checks_the_graph_whole_and_through_its_cache(exported: Path) -> None:
    record = json.loads((exported / "export.json").read_text())
    fp32, int8 = record["formats"]["onnx"], record["formats"]["onnx-int8"]
    assert (exported / fp32["file"]).exists() and (exported / int8["file"]).exists()
    assert fp32["data"] == "valid split" and fp32["parity"]["passed"] and int8["parity"]["passed"]
    # teacher-forced; a prompt half then one token at a time; rows of a batch at different positions
    for way in ("whole", "cached", "rows"):
        assert fp32["parity"][way]["max_abs_diff"] < 1e-4
        assert fp32["parity"][way]["argmax_agreement"] == 1.0
    assert fp32["parity"]["rows"]["positions"] > 16 * 30
    assert fp32["parity"]["tokens"] >= 16 * 63
    ppl = int8["parity"]["perplexity"]
    assert ppl["before"] > 1 and abs(ppl["increase"]) < 0.05  # int8 weights cost little perplexity


def test_a_failed_parity_check_exits_1_and_is_recorded(exported: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "copy"
    shutil.copytree(exported, bundle)
    text = tmp_path / "held_out.txt"
    text.write_text("the dog ran to the park while birds sang songs of joy. " * 20, encoding="utf-8")
    result = runner.invoke(cli, ["export", str(bundle), "--data", str(text), "--max-diff", "1e-12"])
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and "parity check failed for onnx" in result.output
    check = json.loads((bundle / "export.json").read_text())["formats"]["onnx"]
    assert check["data"] == str(text) and not check["parity"]["passed"]
    ok = runner.invoke(cli, ["export", str(bundle), "--data", str(text)])
    assert ok.exit_code == 0 and "onnx         ok" in ok.output, ok.output
    # the int8 file of the earlier export was quantized again from the new graph, and checked again
    int8 = json.loads((bundle / "export.json").read_text())["formats"]["onnx-int8"]
    assert int8["data"] == str(text) and int8["parity"]["passed"] and "onnx-int8    ok" in ok.output
    bad = runner.invoke(cli, ["export", str(bundle), "--format", "torchscript"])
    assert bad.exit_code != 0 and "onnx only" in bad.output


def test_onnx_rows_match_gpt_rows_as_rows_join_and_leave(exported: Path, torch_gen: TextGenerator) -> None:
    """The ONNX batch (buffers the graph reads in place) gives each row the logits the torch batch (a
    slot per row at its own position) gives it, through joins longer and shorter than the others,
    growth of the buffers, removals and a row at the context's end."""
    onnx_rows = OnnxRows(OnnxLM(exported / "model.onnx", threads=1), slots=4, context=64)
    torch_rows = GPTRows(torch_gen.model, slots=4)
    rng = np.random.default_rng(0)
    last: list[int] = []

    def add(n: int) -> None:
        ids = rng.integers(0, 300, size=n).tolist()
        a, b = onnx_rows.add(ids), torch_rows.add(ids)
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4)
        last.append(int(b.argmax()))

    def step(times: int) -> None:
        for _ in range(times):
            a, b = onnx_rows.step(last), torch_rows.step(last)
            np.testing.assert_allclose(a, b.numpy(), atol=1e-4)
            last[:] = b.argmax(-1).tolist()

    def remove(row: int) -> None:
        onnx_rows.remove(row)
        torch_rows.remove(row)
        last[row] = last[-1]
        last.pop()

    add(5)
    step(3)
    add(2)  # a short row beside longer ones
    step(2)
    add(20)  # longer than the columns so far: they grow
    step(4)
    remove(0)  # the last row moves into row 0
    add(1)
    step(3)
    remove(2)
    remove(0)
    step(2)
    assert onnx_rows.lengths == torch_rows.cache.lengths
    assert max(onnx_rows.lengths) < onnx_rows.k.shape[4] <= 64  # grown by doubling, with room for a step
    remove(0)
    assert onnx_rows.rows == 0
    with pytest.raises(ValueError, match="1 to 64 tokens"):
        onnx_rows.add([])
    add(3)
    add(60)  # runs into the context beside a short row
    step(4)
    assert onnx_rows.full(1) and torch_rows.full(1) and not onnx_rows.full(0)
    assert onnx_rows.k.shape[1] == 4 and onnx_rows.k.shape[4] == 64  # rows and columns grew from 2 and 32
    with pytest.raises(ValueError, match="one token per live row"):
        onnx_rows.step(last)  # a full row takes no more
    remove(1)  # the long row leaves: the short one (7 tokens) does not keep paying for its width
    assert onnx_rows.k.shape[4] == 32
    step(2)


def test_onnx_rows_read_a_prompt_in_chunks_between_steps(exported: Path, torch_gen: TextGenerator) -> None:
    """Chunked prefill on ONNX Runtime: a prompt read 5 tokens a pass while another row steps joins with
    the logits torch gives the whole prompt, and both rows then step as torch's do."""
    rows, want = OnnxRows(OnnxLM(exported / "model.onnx"), 4, 64), GPTRows(torch_gen.model, 4)
    first, prompt = torch_gen.encode("the cat sat"), torch_gen.encode(PROMPTS[3])
    np.testing.assert_allclose(rows.add(first), want.add(first).numpy(), atol=1e-4)
    reader, fed = rows.reader(prompt), 7
    while (logits := reader.read(5)) is None:
        assert rows.rows == 1
        np.testing.assert_allclose(rows.step([fed]), want.step([fed]).numpy(), atol=1e-4)
        fed += 1
    assert fed - 7 == -(-len(prompt) // 5) - 1 and rows.rows == 2
    np.testing.assert_allclose(logits, want.add(prompt).numpy(), atol=1e-4)
    np.testing.assert_allclose(rows.step([3, 4]), want.step([3, 4]).numpy(), atol=1e-4)


def test_a_graph_exported_before_logits_index_still_serves(
    exported: Path, torch_gen: TextGenerator, tmp_path: Path
) -> None:
    """A graph without the logits_index input (exported before it existed: logits after every new token)
    is read as the new one: the last logits of a step, all of them for a whole read."""
    from largo.deploy.export import _quiet
    from largo.deploy.export_lm import LMGraph

    class Legacy(LMGraph):
        def forward(self, ids, positions, mask, *past):  # noqa: ANN001, ANN201
            return super().forward(ids, positions, mask, torch.arange(ids.shape[1]), *past)

    c, keys, values = torch_gen.model.cfg, *lm_onnx.input_names(torch_gen.model.cfg.layers)
    d, file = c.dim // c.heads, tmp_path / "legacy.onnx"
    example = (torch.ones(1, 2, dtype=torch.long), torch.arange(2)[None], torch.ones(1, 0, dtype=torch.long))
    example += tuple(torch.zeros(1, c.heads, d, 0) for _ in keys)
    example += tuple(torch.zeros(1, c.heads, 0, d) for _ in values)
    axes = {"input_ids": {1: "t"}, "position_ids": {1: "t"}, "attention_mask": {1: "past"}}
    axes |= {n: {3: "past"} for n in keys} | {n: {2: "past"} for n in values} | {"logits": {1: "t"}}
    with torch.no_grad(), _quiet():
        torch.onnx.export(Legacy(torch_gen.model).eval(), example, str(file), dynamo=False, opset_version=17,
                          input_names=["input_ids", "position_ids", "attention_mask", *keys, *values],
                          output_names=list(lm_onnx.OUTPUTS), dynamic_axes=axes)  # fmt: skip
    legacy, current = OnnxLM(file), OnnxLM(exported / "model.onnx")
    assert not legacy.indexed and current.indexed
    ids = np.array([torch_gen.encode("the cat sat on the mat")])
    np.testing.assert_allclose(legacy.read(ids)[0], current.read(ids)[0], atol=1e-5)
    old, new = OnnxRows(legacy, 2, c.context), OnnxRows(current, 2, c.context)
    np.testing.assert_allclose(old.add(ids[0].tolist()), new.add(ids[0].tolist()), atol=1e-5)
    np.testing.assert_allclose(old.step([5]), new.step([5]), atol=1e-5)


def test_the_graph_reads_a_chunk_after_a_past(exported: Path, torch_gen: TextGenerator) -> None:
    """Several new tokens after a cached past (chunked prefill): each sees the past and the new tokens
    before it, as the eager model reading the whole sequence does."""
    lm = OnnxLM(exported / "model.onnx", threads=1)
    ids = np.random.default_rng(1).integers(0, 300, size=(2, 15))
    _, k, v = lm.read(ids[:, :10])
    logits, new_k, _ = lm.run(
        np.ascontiguousarray(ids[:, 10:]),
        np.tile(np.arange(10, 15), (2, 1)),
        np.ones((2, 10), np.int64),
        [np.ascontiguousarray(k[i].transpose(0, 1, 3, 2)) for i in range(lm.layers)],
        [v[i] for i in range(lm.layers)],
        every=True,
    )
    with torch.inference_mode():
        want = torch_gen.model(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(logits, want[:, 10:], atol=1e-4)
    assert new_k.shape == (lm.layers, 2, lm.heads, 5, lm.head_dim)
    last, _, _ = lm.run(  # by default the head runs on the last new token alone (reading a prompt)
        np.ascontiguousarray(ids[:, 10:]),
        np.tile(np.arange(10, 15), (2, 1)),
        np.ones((2, 10), np.int64),
        [np.ascontiguousarray(k[i].transpose(0, 1, 3, 2)) for i in range(lm.layers)],
        [v[i] for i in range(lm.layers)],
    )
    assert last.shape == (2, 1, lm.vocab)
    np.testing.assert_allclose(last[:, 0], want[:, -1], atol=1e-4)


def test_numpy_sampling_picks_what_torch_sampling_picks() -> None:
    assert MIN_TEMPERATURE == layers.MIN_TEMPERATURE  # a torch-free copy
    assert LMTokenizerConfig().eot == corpus.EOT  # what the ONNX generator stops at by default
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        n, vocab = 6, 50 + trial
        logits = torch.randn(n, vocab, generator=gen) * 3
        logits[0, :10] = -float("inf")
        temperature = torch.tensor([1.0, 0.5, 2.0, 1e-6, 0.8, 1.3])
        top_k = torch.tensor([0, 5, 1, 0, 40, 0])
        top_p = torch.tensor([1.0, 0.9, 1.0, 0.5, 0.3, 0.95])
        uniform = torch.rand(n, generator=gen)
        want = layers.sample_rows(logits, temperature, top_k, top_p, uniform)
        got = sample_rows_numpy(
            logits.numpy(), temperature.numpy(), top_k.numpy(), top_p.numpy(), uniform.numpy()
        )
        assert got.tolist() == want.tolist(), trial
    for trial in range(5):  # a real vocabulary: prefix sums over thousands of weights
        logits = torch.randn(8, 8192, generator=gen) * 2
        temperature = torch.full((8,), 1.0)
        top_k = torch.tensor([0, 0, 0, 0, 500, 0, 0, 4000])
        top_p = torch.tensor([1.0, 0.9, 0.99, 0.5, 1.0, 0.95, 1.0, 0.8])
        uniform = torch.rand(8, generator=gen)
        want = layers.sample_rows(logits, temperature, top_k, top_p, uniform)
        got = sample_rows_numpy(
            logits.numpy(), temperature.numpy(), top_k.numpy(), top_p.numpy(), uniform.numpy()
        )
        assert got.tolist() == want.tolist(), trial
    for bad in (np.full((1, 5), np.nan, np.float32), np.array([[0.0, np.nan, 1.0]], np.float32)):
        with pytest.raises(ValueError, match="no finite largest value"):
            sample_rows_numpy(bad, np.ones(1), np.zeros(1), np.ones(1), np.zeros(1))
    rng = np.random.default_rng(3)
    logits = np.array([[0.0, 5.0, 1.0]], np.float32)
    assert next_tokens_numpy(logits, [(0.0, None, None)], [None]) == [1]  # greedy without a sampler
    draws = {next_tokens_numpy(logits, [(5.0, None, None)], [rng])[0] for _ in range(50)}
    assert draws == {0, 1, 2}  # a hot temperature reaches every token


@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8"])
def test_onnx_generator_writes_torchs_greedy_text(
    exported: Path, torch_gen: TextGenerator, runtime: str
) -> None:
    gen = largo.api.load(exported, runtime=runtime)
    assert isinstance(gen, OnnxTextGenerator) and gen.info()["runtime"] == runtime
    agree = 0
    for prompt in [*PROMPTS, "the park " * 40]:  # the last is longer than the context: its end is read
        want = torch_gen.generate(prompt, 70, temperature=0, stop_at_eot=False)  # runs into the context end
        got = gen.generate(prompt, 70, temperature=0, stop_at_eot=False)
        if runtime == "onnx":
            assert got == want, prompt
        agree += got == want
    assert agree >= 3  # int8 weights may flip a near-tie, not most texts
    a, b = gen.generate("the dog", 30, seed=5), gen.generate("the dog", 30, seed=5)
    assert a == b and a != gen.generate("the dog", 30, seed=6)  # seeded sampling repeats


def test_wrong_runtimes_and_missing_files_are_clear_errors(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from largo.deploy.generate_service import load_generator
    from largo.deploy.lm_onnx import choose_lm_runtime
    from largo.deploy.metadata import BundleError

    bundle = tmp_path / "plain"
    shutil.copytree(exported, bundle, ignore=shutil.ignore_patterns("*.onnx", "export.json"))
    with pytest.raises(BundleError, match="largo export .* --format onnx --quantize int8"):
        load_generator(bundle, "onnx-int8")
    with pytest.raises(ValueError, match="runtime 'tensorrt'.*onnx-int8"):
        load_generator(bundle, "tensorrt")
    with pytest.raises(ValueError, match="ONNX Runtime serves on the CPU"):
        load_generator(exported, "onnx", device="cuda")
    with pytest.raises(ValueError, match="loads on torch, torch-bf16, onnx"):
        largo.api.load(bundle, runtime="tensorrt")
    monkeypatch.setattr(lm_onnx, "_has_torch", lambda: False)
    with pytest.raises(BundleError, match="torch is not installed and the bundle has no model.onnx"):
        choose_lm_runtime(bundle)


def test_largo_generate_runs_on_onnx(exported: Path, torch_gen: TextGenerator) -> None:
    result = runner.invoke(
        cli, ["generate", str(exported), "the cat", "-n", "20", "--temperature", "0", "--runtime", "onnx"]
    )
    assert result.exit_code == 0, result.output
    assert torch_gen.generate("the cat", 20, temperature=0) in result.output
    bad = runner.invoke(cli, ["generate", str(exported), "x", "--runtime", "tensorrt"])
    assert bad.exit_code != 0 and "onnx-int8" in bad.output


def test_largo_serve_runtime_onnx_generates_without_torch(
    exported: Path,
    torch_gen: TextGenerator,
    torch_blocked: dict[str, str],  # noqa: F811
) -> None:
    """The light deployment: `largo serve BUNDLE --runtime onnx` where `import torch` fails; JSON and
    streamed answers equal torch's greedy text, and concurrent requests are decoded as one batch."""
    proc, url = start_cli([str(exported), "--runtime", "onnx", "--max-batch", "4"], torch_blocked)
    try:
        health = httpx.get(f"{url}/health").json()
        assert health["runtime"] == "onnx" and health["batching"] and health["max_concurrent"] == 4
        answers: dict[int, dict] = {}

        def ask(i: int, prompt: str) -> None:
            body = {"prompt": prompt, "max_new_tokens": 30, "temperature": 0, "stop_at_eot": False}
            answers[i] = httpx.post(f"{url}/generate", json=body, timeout=60).json()

        threads = [threading.Thread(target=ask, args=(i, p)) for i, p in enumerate(PROMPTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i, prompt in enumerate(PROMPTS):
            assert answers[i]["text"] == torch_gen.generate(prompt, 30, temperature=0, stop_at_eot=False)
            assert answers[i]["tokens"] == 30 and answers[i]["finish_reason"] == "length"
        streamed = httpx.post(
            f"{url}/generate", json={"prompt": "今天", "max_new_tokens": 12, "temperature": 0, "stream": True}
        )
        evs = events(streamed.text)
        want = torch_gen.generate("今天", 12, temperature=0)
        assert evs[-1][0] == "done" and "".join(d["text"] for k, d in evs if k == "token") == want
        # sampled requests decoded together draw what each draws alone on this runtime
        alone = OnnxTextGenerator(exported)
        bodies = [{"prompt": p, "max_new_tokens": 25, "seed": i, "top_p": 0.9} for i, p in enumerate(PROMPTS)]
        answers.clear()
        threads = [
            threading.Thread(
                target=lambda i=i, b=b: answers.update(
                    {i: httpx.post(f"{url}/generate", json=b, timeout=60).json()}
                )
            )
            for i, b in enumerate(bodies)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i, b in enumerate(bodies):
            assert answers[i]["text"] == alone.generate(b["prompt"], 25, seed=i, top_p=0.9), i
        assert httpx.post(f"{url}/generate", json={"prompt": "x", "max_new_tokens": -1}).status_code == 422
    finally:
        log = stop_cli(proc)
    assert "OnnxTextGenerator" in log and "Traceback" not in log, log


def benchmarked(exported: Path, tmp_path: Path) -> tuple[Path, dict, str]:
    """A copy of the bundle exported again with int8 and `--benchmark`: (its path, the benchmark record,
    the command's output). Every runtime was timed, and auto chose, and serves, the fastest at 8 rows."""
    from largo.deploy.generate_service import load_generator, runtime_of

    bundle = tmp_path / "copy"
    shutil.copytree(exported, bundle)
    result = runner.invoke(cli, ["export", str(bundle), "--quantize", "int8", "--benchmark"])
    assert result.exit_code == 0, result.output
    bench = json.loads((bundle / "export.json").read_text())["benchmark"]
    assert set(bench["runtimes"]) == {"torch", "torch-bf16", "onnx", "onnx-int8"}
    fastest = max(bench["runtimes"], key=lambda n: bench["runtimes"][n]["tokens_per_s"]["8"])
    assert bench["choice"] == fastest and f"runtime auto → {fastest}" in result.output
    assert runtime_of(load_generator(bundle, "auto", device="cpu")) == fastest
    return bundle, bench, result.output


def test_benchmark_times_every_runtime_and_auto_serves_the_fastest_that_passed(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from largo.deploy.lm_onnx import choose_lm_runtime

    bundle, bench, _ = benchmarked(exported, tmp_path)
    for m in bench["runtimes"].values():
        assert m["tokens_per_s"]["1"] > 0 and m["tokens_per_s"]["8"] > 0 and m["parity_passed"]
    assert choose_lm_runtime(bundle) == bench["choice"]
    # a runtime whose check failed is never chosen, however fast
    record = json.loads((bundle / "export.json").read_text())
    record["benchmark"]["runtimes"]["onnx-int8"] |= {
        "parity_passed": False,
        "tokens_per_s": {"1": 1e9, "8": 1e9},
    }
    (bundle / "export.json").write_text(json.dumps(record))
    assert choose_lm_runtime(bundle) != "onnx-int8"
    # where torch is missing, auto takes ONNX Runtime
    (bundle / "export.json").unlink()
    assert choose_lm_runtime(bundle) == "torch"
    monkeypatch.setattr(lm_onnx, "_has_torch", lambda: False)
    assert choose_lm_runtime(bundle) == "onnx"
