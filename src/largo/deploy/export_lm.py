"""Export a language-model bundle to ONNX with its KV cache, quantize it to int8, and check both.

The graph is one decoding step of the GPT, so it serves prompts and continuous batches alike without
torch (`lm_onnx.OnnxTextGenerator`):

    input_ids [b, t] int64, position_ids [b, t] int64, attention_mask [b, past] int64 (1: a column
    holding this row's token), logits_index [k] int64 (the new tokens to give logits after: the last
    when reading a prompt, so the head runs once, not t times), per layer past_key_i [b, heads,
    head_dim, past] (keys transposed) and past_value_i [b, heads, past, head_dim] float32
    → logits [b, k, vocab] float32, new_key / new_value [layers, b, heads, t, head_dim]

Each row reads its own positions (RoPE) and attends to the past columns its mask marks and to its new
tokens causally. The past is only read: attention scores the past and the new tokens apart and
softmaxes them together (`GraphCache.attention`), so the graph never concatenates (copies) the cache,
and only the new keys and values come out; the caller writes them into its buffers (`OnnxRows`, which
hands the graph the live rows' prefix of its buffers without a copy). Keys are kept transposed so the
scores are a plain MatMul with no Transpose of the cache. Against the first version of this graph (the
cache as one stacked input, concatenated to a `present` output) a 16-row step of a 3.7M-parameter GPT
took 4.9 ms instead of 14.1 ms (ONNX Runtime's profile had Concat 18%, Transpose 16%, Split 9%).

Parity (`LM_PARITY`, written into the bundle's export.json as for other bundles): on held-out windows
of text (the run's validation tokens, or `data`), the graph's logits against eager fp32 three ways —
read whole; read as a prompt half, then token by token through the cache; and as rows of a continuous
batch (`OnnxRows`: rows joining step by step with prompts of different lengths, so they sit at
different positions, and leaving as their windows end) — must differ by at most
`max_abs_diff` with ≥ 99.9% of next-token argmaxes equal; an int8 graph (dynamic quantization of its
MatMul weights) must keep held-out perplexity on each way within `max_perplexity_increase` (relative)
of eager's. `--benchmark` then times greedy decoding on every runtime (`benchmark_lm`), which
`largo serve --runtime auto` reads (`lm_onnx.choose_lm_runtime`).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from largo.deploy.export import _quiet, update_record
from largo.deploy.generator import LMBundle
from largo.deploy.lm_onnx import (
    LM_INPUTS,
    LM_ONNX_FILE,
    LM_ONNX_RUNTIMES,
    OUTPUTS,
    OnnxLM,
    OnnxRows,
    OnnxTextGenerator,
    choose_lm_runtime,
    input_names,
)
from largo.deploy.metadata import EXPORT_RECORD, ParityError, read_json
from largo.models.gpt import GPT

LM_PARITY = {"max_abs_diff": 1e-3, "min_agreement": 0.999, "max_perplexity_increase": 0.05}
LM_QUANTIZE = ("none", "int8")
LM_BENCH_ROWS = (1, 8)  # rows decoded together in the benchmark: one client, and a busy server


class GraphCache:
    """What `GPT.hidden` asks of a cache (`rope`, `attention`, `advance`), as graph tensors: each layer's
    past keys (transposed, [b, kv_heads, head_dim, past]) and values ([b, kv_heads, past, head_dim])
    come in as inputs and are only read, never copied: attention scores the past and the new tokens apart and
    softmaxes them together, and only the new tokens' keys and values go out (the caller stores them)."""

    def __init__(
        self,
        past_k: list[torch.Tensor],
        past_v: list[torch.Tensor],
        positions: torch.Tensor,
        mask: torch.Tensor,
    ):
        self.past_k, self.past_v, self.positions = past_k, past_v, positions
        t = positions.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()  # new token i sees 0..i
        seen = torch.cat(
            [mask.bool()[:, None, :].expand(-1, t, -1), causal[None].expand(mask.shape[0], -1, -1)], -1
        )
        self.mask = seen[:, None]  # [b, 1, t, past + t]
        self.new_k: list[torch.Tensor] = []
        self.new_v: list[torch.Tensor] = []

    def rope(self, cos: torch.Tensor, sin: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return cos[self.positions][:, None], sin[self.positions][:, None]  # [b, 1, t, d/2]

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q·[past; new]ᵀ / √d, masked) · [past; new] without concatenating the past."""
        self.new_k.append(k)
        self.new_v.append(v)
        b, heads, t, d = q.shape
        group = heads // k.shape[1]  # query heads per key/value head (grouped-query attention)
        q = q.reshape(b, k.shape[1], group * t, d)  # a key head's queries, its group's heads in a row
        scale = 1.0 / math.sqrt(d)
        past_kt, past_v = self.past_k[layer], self.past_v[layer]
        scores = torch.cat([q @ past_kt, q @ k.transpose(-1, -2)], dim=-1) * scale  # [b, kvh, g·t, past + t]
        # the mask [b, 1, t, past + t] broadcasts over the group's heads
        scores = scores.unflatten(2, (group, t)).masked_fill(
            ~self.mask[:, :, None], torch.finfo(scores.dtype).min
        )
        scores = scores.flatten(2, 3)
        weights = scores.softmax(-1)
        past = past_v.shape[2]
        out = weights[..., :past] @ past_v + weights[..., past:] @ v
        return out.reshape(b, heads, t, d)

    def advance(self, t: int) -> None:
        pass


class PlainRMSNorm(nn.Module):
    """`nn.RMSNorm` in elementary ops (opset 17 has no RMSNormalization; opset 23 is too new for many
    runtimes): x / sqrt(mean(x²) + eps) · weight."""

    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class LMGraph(nn.Module):
    """One decoding step of a GPT with positional tensor inputs and outputs, as exporters want it (a
    copy of the model, its RMSNorms spelled out)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = copy.deepcopy(model)
        for parent in self.model.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.RMSNorm):
                    setattr(parent, name, PlainRMSNorm(child))

    def forward(self, ids, positions, mask, which, *past):  # noqa: ANN001, ANN201 - the exporter's tensors
        layers = len(past) // 2
        cache = GraphCache(list(past[:layers]), list(past[layers:]), positions, mask)
        hidden = self.model.hidden(ids, cache).index_select(1, which)  # the positions logits are wanted at
        logits = self.model.head(hidden).float()
        return logits, torch.stack(cache.new_k), torch.stack(cache.new_v)


def export_lm_onnx(model: GPT, path: Path) -> None:
    """Write the model's decoding step to `path` (the TorchScript-based exporter; dynamic batch, new
    tokens and past columns)."""
    c = model.cfg
    graph = LMGraph(model.float().eval()).eval()
    b, t, past, head_dim = 2, 3, 4, c.dim // c.heads
    keys, values = input_names(c.layers)
    example = (
        torch.ones(b, t, dtype=torch.long),
        torch.arange(past, past + t).repeat(b, 1),
        torch.ones(b, past, dtype=torch.long),
        torch.tensor([t - 1]),
        *(torch.zeros(b, c.key_value_heads, head_dim, past) for _ in keys),
        *(torch.zeros(b, c.key_value_heads, past, head_dim) for _ in values),
    )
    axes = {"input_ids": {0: "batch", 1: "new"}, "position_ids": {0: "batch", 1: "new"}}
    axes |= {"attention_mask": {0: "batch", 1: "past"}, "logits": {0: "batch", 1: "wanted"}}
    axes |= {"logits_index": {0: "wanted"}}
    axes |= {n: {0: "batch", 3: "past"} for n in keys} | {n: {0: "batch", 2: "past"} for n in values}
    axes |= {n: {1: "batch", 3: "new"} for n in OUTPUTS[1:]}
    with torch.no_grad(), _quiet():
        torch.onnx.export(
            graph, example, str(path), dynamo=False, input_names=[*LM_INPUTS, *keys, *values],
            output_names=list(OUTPUTS), dynamic_axes=axes,
            opset_version=17,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------ parity


def held_out_windows(
    bundle: LMBundle, data: str | Path | None, count: int = 16, length: int = 64
) -> tuple[np.ndarray, str]:
    """Up to `count` windows of `length` + 1 held-out token ids [n, length + 1] (spread evenly over the
    run's validation tokens, or over the tokens of a text file `data`), and where they came from."""
    from largo.data.corpus import iter_pieces, prepare_corpus
    from largo.data.readers import DataError

    if data is not None:  # a corpus file as `largo pretrain` reads one (.txt, .jsonl, .parquet; UTF-8 or GBK)
        d = bundle.config.data
        if not Path(data).is_file():
            raise DataError(f"{data}: no such file to check the export on")
        text = "".join(
            p + ("\n" if end else "") for p, end in iter_pieces(Path(data), d.text_field, d.encoding)
        )
        tokens = np.asarray(bundle.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
        source = str(data)
    elif not bundle.config.data.paths:
        raise DataError("the bundle names no corpus (an imported model): pass --data FILE to check on")
    else:
        try:
            corpus = prepare_corpus(bundle.config, bundle.tokenizer, chat=bundle.chat_template)
            tokens = np.asarray(corpus[1].valid, dtype=np.int64)
        except (FileNotFoundError, DataError) as exc:
            raise DataError(f"cannot re-read the run's validation tokens ({exc}); pass --data FILE") from None
        source = "valid split"
    length = min(length, bundle.config.model.context)
    if len(tokens) < length + 1:
        raise DataError(f"{source}: {len(tokens)} tokens, fewer than one window of {length + 1} to check on")
    starts = np.linspace(0, len(tokens) - length - 1, num=min(count, len(tokens) - length)).astype(int)
    return np.stack([tokens[s : s + length + 1] for s in np.unique(starts)]), source


def _perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    t = torch.from_numpy(logits.astype(np.float32))
    loss = F.cross_entropy(t.reshape(-1, t.shape[-1]), torch.from_numpy(targets).reshape(-1))
    return math.exp(float(loss))


def _through_rows(
    lm: OnnxLM, ids: np.ndarray, context: int, staggered: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Logits, and the positions they cover [n, t], of the windows decoded as the server decodes them
    (`OnnxRows`), each fed its next true token every step. Not staggered: every window reads its first
    half as a prompt, then all step together (the cache, position by position). Staggered: window i
    joins at step i with a prompt of its own length (8 to 31 tokens) and leaves when it ends (the last
    row moving into its place), so the rows sit at different positions of their buffers."""
    n, t = ids.shape
    out, covered = np.zeros((n, t, lm.vocab), np.float32), np.zeros((n, t), bool)
    rows, live, at = OnnxRows(lm, n, context), [], {}
    waiting = list(range(n))
    while waiting or live:
        for i in waiting[:1] if staggered else waiting:
            p = min(t - 1, 8 + (5 * i) % 24) if staggered else t // 2
            out[i, p - 1], covered[i, p - 1] = rows.add(ids[i, :p].tolist()), True
            live.append(i)
            at[i] = p
        waiting = waiting[1:] if staggered else []
        logits = rows.step([int(ids[i, at[i]]) for i in live])
        for r, i in enumerate(live):
            out[i, at[i]], covered[i, at[i]] = logits[r], True
            at[i] += 1
        for r in reversed(range(len(live))):
            if at[live[r]] == t:
                rows.remove(r)
                live[r] = live[-1]
                live.pop()
    return out, covered


def lm_parity(
    model: GPT, lm: OnnxLM, windows: np.ndarray, lossy: bool, max_abs_diff: float
) -> dict[str, Any]:
    """The graph against eager fp32 on held-out windows, three ways: read whole (teacher-forced), through
    its cache token by token, and as rows of a continuous batch (`_through_rows`)."""
    ids, targets = windows[:, :-1], windows[:, 1:]
    with torch.inference_mode():
        reference = model.float().eval()(torch.from_numpy(ids)).numpy()
    c = model.cfg.context
    paths = {
        "whole": (lm.read(ids)[0], np.ones(ids.shape, bool)),
        "cached": _through_rows(lm, ids, c, staggered=False),
        "rows": _through_rows(lm, ids, c, staggered=True),
    }
    before = _perplexity(reference, targets)
    report: dict[str, Any] = {"windows": len(windows), "tokens": int(ids.size), "lossy": lossy}
    for name, (out, mask) in paths.items():
        report[name] = compare(reference[mask], out[mask], targets[mask])
    after = _perplexity(paths["whole"][0], targets)
    return verdict(report, list(paths), before, after, lossy, max_abs_diff)


def compare(reference: np.ndarray, got: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """One way of reading held-out tokens: next-token logits [positions, vocab] against eager's, and the
    true next tokens [positions]."""
    return {
        "positions": len(targets),
        "max_abs_diff": float(np.abs(got - reference).max()),
        "argmax_agreement": float((got.argmax(-1) == reference.argmax(-1)).mean()),
        "perplexity_increase": _perplexity(got, targets) / _perplexity(reference, targets) - 1.0,
    }


def verdict(
    report: dict[str, Any], paths: list[str], before: float, after: float, lossy: bool, max_abs_diff: float
) -> dict[str, Any]:
    """The report with its perplexity summary, thresholds and `passed`: a lossy (int8) graph must keep
    perplexity on every path within `max_perplexity_increase` of eager's, a faithful one its logits
    within `max_abs_diff` with `min_agreement` of argmaxes equal on every path."""
    worst = max(report[n]["perplexity_increase"] for n in paths)
    report["perplexity"] = {"before": before, "after": after, "increase": worst}
    if lossy:
        ok = worst <= LM_PARITY["max_perplexity_increase"] + 1e-9
        report["thresholds"] = {"max_perplexity_increase": LM_PARITY["max_perplexity_increase"]}
    else:
        ok = all(
            report[n]["max_abs_diff"] <= max_abs_diff
            and report[n]["argmax_agreement"] >= LM_PARITY["min_agreement"]
            for n in paths
        )
        report["thresholds"] = {"max_abs_diff": max_abs_diff, "min_agreement": LM_PARITY["min_agreement"]}
    report["passed"] = bool(ok)
    return report


# --------------------------------------------------------------------------------------- benchmark


def decode_speed(generator: Any, prompts: list[list[int]], new_tokens: int) -> float:
    """Tokens/s of greedy decoding of the prompts as rows of one batch (the generator's `decode_rows`,
    as the server decodes), reading the prompts included."""
    rows = generator.decode_rows(len(prompts))
    start = time.perf_counter()
    last = [int(rows.add(p).argmax()) for p in prompts]
    for _ in range(new_tokens - 1):
        last = rows.step(last).argmax(-1).tolist()
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def benchmark_lm(
    path: Path,
    windows: np.ndarray,
    rounds: int = 3,
    new_tokens: int = 32,
    batches: tuple[int, ...] = LM_BENCH_ROWS,
) -> dict[str, Any]:
    """Greedy decoding tokens/s of every runtime the bundle has (torch, torch-bf16, onnx, onnx-int8) at
    1 and 8 rows, prompts of 16 held-out tokens (`benchmark_decoding`)."""
    from largo.deploy.generator import TextGenerator

    generators: dict[str, Any] = {
        "torch": TextGenerator.load(path),
        "torch-bf16": TextGenerator.load(path, precision="bf16"),
    }
    for runtime, file in LM_ONNX_RUNTIMES.items():
        if (path / file).exists():
            generators[runtime] = OnnxTextGenerator(path, runtime, torch.get_num_threads())
    context = generators["torch"].context
    prompt = max(1, min(16, context // 2))
    new_tokens = max(2, min(new_tokens, context - prompt))
    prompts = [w[:prompt].tolist() for w in windows]

    def passed(runtime: str) -> bool:
        if runtime != "torch-bf16":
            return onnx_passed(path, runtime)
        ids, targets = torch.from_numpy(windows[:, :-1]), windows[:, 1:]
        with torch.inference_mode():
            fp32 = _perplexity(generators["torch"].model(ids).float().numpy(), targets)
            other = _perplexity(generators[runtime].model(ids).float().numpy(), targets)
        return other / fp32 - 1.0 <= LM_PARITY["max_perplexity_increase"]

    result = benchmark_decoding(generators, prompts, passed, new_tokens, rounds, batches)
    return {**result, "prompt_tokens": prompt}


def benchmark_decoding(
    generators: dict[str, Any],
    prompts: list[list[int]],
    passed: Callable[[str], bool],
    new_tokens: int,
    rounds: int = 3,
    batches: tuple[int, ...] = LM_BENCH_ROWS,
) -> dict[str, Any]:
    """Greedy decoding tokens/s of each generator (`decode_speed`: its `decode_rows`, as the server
    decodes) at each number of rows, rounds interleaved in a rotated order after a warm-up; ratios to
    torch at the most rows (what `auto` compares), and whether each runtime may serve (`passed`)."""
    names = list(generators)
    for name in names:  # warm-up
        decode_speed(generators[name], prompts[:2], 4)
    speeds: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batches} for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for b in batches:
                rows = [prompts[i % len(prompts)] for i in range(b)]
                speeds[name][b].append(decode_speed(generators[name], rows, new_tokens))
    top = max(batches)
    base = statistics.median(speeds["torch"][top])
    runtimes = {
        n: {
            "tokens_per_s": {str(b): statistics.median(v) for b, v in speeds[n].items()},
            "ratio": statistics.median(speeds[n][top]) / base,
            "parity_passed": passed(n),
        }
        for n in names
    }
    return {"rows": list(batches), "new_tokens": new_tokens, "rounds": rounds,
            "threads": torch.get_num_threads(), "runtimes": runtimes}  # fmt: skip


def onnx_passed(path: Path, runtime: str) -> bool:
    """Whether a runtime may serve for `auto`: torch fp32 always, an ONNX runtime when its file's latest
    check passed (export.json)."""
    if runtime == "torch":
        return True
    section = (read_json(path / EXPORT_RECORD).get("formats") or {}).get(runtime) or {}
    return bool(section.get("parity", {}).get("passed"))


def export_lm_bundle(
    bundle: LMBundle,
    windows: np.ndarray,
    source: str,
    quantize: str = "none",
    max_abs_diff: float = LM_PARITY["max_abs_diff"],
    run_benchmark: bool = False,
) -> dict[str, Any]:
    """model.onnx (and model.int8.onnx: asked for, or there from an earlier export, which is quantized
    again from the new graph) into an LM bundle, each checked (and, with `run_benchmark`, every
    runtime's decoding speed, which `largo serve --runtime auto` then reads); returns the export record.
    Raises ParityError (after writing the record) when a check fails."""
    model = bundle.model.float().eval()

    def section(runtime: str, lossy: bool) -> dict[str, Any]:
        file = LM_ONNX_RUNTIMES[runtime]
        report = lm_parity(model, OnnxLM(bundle.path / file), windows, lossy, max_abs_diff)
        return {"file": file, "data": source, "parity": report}

    return export_graphs(
        bundle.path,
        quantize,
        {runtime: (file,) for runtime, file in LM_ONNX_RUNTIMES.items()},
        lambda: export_lm_onnx(model, bundle.path / LM_ONNX_FILE),
        section,
        (lambda: benchmark_lm(bundle.path, windows)) if run_benchmark else None,
    )


def export_graphs(
    path: Path,
    quantize: str,
    runtimes: dict[str, tuple[str, ...]],
    write: Callable[[], None],
    section: Callable[[str, bool], dict[str, Any]],
    benchmark: Callable[[], dict[str, Any]] | None,
) -> dict[str, Any]:
    """The steps of a decoder's export (a language model's graph, a seq2seq model's two), in one place:
    `write()` the fp32 files (`runtimes["onnx"]`), check them (`section(runtime, lossy)`: the export.json
    section, with its `parity` report), quantize them into `runtimes["onnx-int8"]` when asked for or
    when int8 files are there from an earlier export (never an int8 file of an older graph) and check
    those, then with `benchmark` time every runtime and record what `--runtime auto` chooses (a
    benchmark of the old files is dropped otherwise). Returns the export record; raises ParityError
    (after writing it) when a check fails."""
    if quantize not in LM_QUANTIZE:
        raise ValueError(f"unknown quantize {quantize!r}; allowed: {', '.join(LM_QUANTIZE)}")
    failed, record_path = [], path / EXPORT_RECORD
    if benchmark is None and "benchmark" in (old := read_json(record_path)):  # it timed the old files
        del old["benchmark"]
        record_path.write_text(json.dumps(old, indent=1), encoding="utf-8")
    write()

    def check(runtime: str, lossy: bool, **info: Any) -> None:
        checked = {**info, **section(runtime, lossy)}
        update_record(path, runtime, checked)
        if not checked["parity"]["passed"]:
            failed.append(runtime)

    check("onnx", False, exporter="torchscript")
    if quantize == "int8" or any((path / f).exists() for f in runtimes["onnx-int8"]):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _quiet():
            for fp32, int8 in zip(runtimes["onnx"], runtimes["onnx-int8"], strict=True):
                quantize_dynamic(str(path / fp32), str(path / int8), weight_type=QuantType.QInt8)
        check("onnx-int8", True, method="dynamic")
    if benchmark is not None:
        result = benchmark()
        update_record(path, "benchmark", result)
        choice = choose_lm_runtime(path, runtimes["onnx"][-1])  # the graph a step runs
        update_record(path, "benchmark", {**result, "choice": choice})
    record = read_json(record_path)
    if failed:
        raise ParityError(f"parity check failed for {', '.join(failed)}; see {record_path}")
    return record
