"""Export a seq2seq bundle to ONNX (its encoder, and one decoding step with the KV cache), quantize both to
int8, and check them against eager fp32.

The graphs (`seq2seq_onnx.py` documents their inputs and outputs, and serves them without torch) follow
the language model's (`export_lm.py`): the decoder's self-attention reads its past keys and values in
place through `GraphCache`, and cross-attention reads the memory's keys (transposed) and values, which
the encoder graph computes once per source, so a step never copies a cache. RMSNorm is spelled out in
elementary ops (`PlainRMSNorm`) for opset 17.

Parity (written into the bundle's export.json, as for the other bundles): on held-out pairs (the run's
test split, its valid split without one, or a file of pairs `data`), the graphs' next-token logits over
the reference targets against eager fp32 two ways — read whole (teacher-forced), and as rows of a
continuous batch (`OnnxSeq2SeqRows`, sources joining one per step and leaving as their targets end, so
rows sit at different positions) — must differ by at most `max_abs_diff` with ≥ 99.9% of argmaxes equal;
an int8 export must keep held-out token perplexity within 5% (relative) of eager's on both ways. The
record also holds the beam-searched outputs of both runtimes on those sources: how many are the same, and
BLEU / chrF against the references before and after. `--benchmark` times every runtime (`benchmark_seq2seq`:
greedy decoding as the server batches it, and beam-search translation as `largo predict` runs it); `largo
serve --runtime auto` picks from it.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from largo.data.pair_text import NEVER, PAD, source_ids
from largo.deploy.export import _quiet
from largo.deploy.export_lm import (
    LM_BENCH_ROWS,
    LM_PARITY,
    GraphCache,
    PlainRMSNorm,
    _perplexity,
    benchmark_decoding,
    compare,
    export_graphs,
    onnx_passed,
    verdict,
)
from largo.deploy.lm_onnx import input_names
from largo.deploy.seq2seq_onnx import (
    DECODER_OUTPUTS,
    ENCODER_OUTPUTS,
    SEQ2SEQ_ONNX_RUNTIMES,
    OnnxSeq2Seq,
    OnnxSeq2SeqRows,
    OnnxTranslator,
    decoder_input_names,
    search_numpy,
)
from largo.deploy.translator import Translator
from largo.models.seq2seq import CrossAttention, Seq2SeqTransformer

PARITY_PAIRS = 32  # held-out pairs the export is checked on


class GraphCrossAttention(nn.Module):
    """Cross-attention over the memory's keys kept transposed ([b, heads, head_dim, s]), so a step's
    scores are a plain MatMul of the buffers the caller holds; masked to each row's real source tokens."""

    def __init__(self, cross: CrossAttention):
        super().__init__()
        self.cross = cross

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.cross.keys_values(memory)
        return k.transpose(-1, -2), v

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        c, (keys_t, values) = self.cross, kv
        b, t, dim = x.shape
        q = c.q(x).view(b, t, c.heads, c.head_dim).transpose(1, 2)
        scores = (q @ keys_t) * (1.0 / math.sqrt(c.head_dim))
        weights = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(-1)
        return c.proj((weights @ values).transpose(1, 2).reshape(b, t, dim))


def graph_model(model: Seq2SeqTransformer) -> Seq2SeqTransformer:
    """A copy of the model as the graphs compute it: RMSNorms spelled out, cross-attention over
    transposed keys."""
    graph = copy.deepcopy(model).float().eval()
    swaps = [
        (parent, name, child) for parent in graph.modules() for name, child in parent.named_children()
    ]  # listed first: a wrapper holds the module it replaces
    for parent, name, child in swaps:
        if isinstance(child, nn.RMSNorm):
            setattr(parent, name, PlainRMSNorm(child))
        elif isinstance(child, CrossAttention):
            setattr(parent, name, GraphCrossAttention(child))
    return graph


class EncoderGraph(nn.Module):
    """source_ids → every decoder layer's cross-attention keys (transposed) and values, stacked."""

    def __init__(self, model: Seq2SeqTransformer):
        super().__init__()
        self.model = model

    def forward(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv, _ = self.model.encode(source)
        return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])


class DecoderGraph(nn.Module):
    """One decoding step with positional tensor inputs and outputs (see `seq2seq_onnx`)."""

    def __init__(self, model: Seq2SeqTransformer):
        super().__init__()
        self.model = model

    def forward(self, ids, positions, mask, source_mask, *tensors):  # noqa: ANN001, ANN201 - exporter's
        n = len(tensors) // 4
        cache = GraphCache(list(tensors[:n]), list(tensors[n : 2 * n]), positions, mask)
        kv = list(zip(tensors[2 * n : 3 * n], tensors[3 * n :], strict=True))
        logits = self.model.decode(ids, kv, source_mask.bool()[:, None, None, :], cache).float()
        return logits, torch.stack(cache.new_k), torch.stack(cache.new_v)


def export_seq2seq_onnx(model: Seq2SeqTransformer, folder: Path, files: tuple[str, str]) -> None:
    """Write the encoder and the decoding step to `folder` / `files` (the TorchScript-based exporter;
    dynamic batch, source length, new tokens and past columns)."""
    c = model.cfg
    graph = graph_model(model)
    b, t, past, s, d, layers = 2, 3, 4, 5, c.dim // c.heads, c.decoder_layers
    encoder_axes = {"source_ids": {0: "batch", 1: "source"}, "cross_key": {1: "batch", 4: "source"}}
    encoder_axes["cross_value"] = {1: "batch", 3: "source"}
    keys, values = input_names(layers)
    cross_k = [f"cross_key_{i}" for i in range(layers)]
    cross_v = [f"cross_value_{i}" for i in range(layers)]
    example = (
        torch.ones(b, t, dtype=torch.long),
        torch.arange(past, past + t).repeat(b, 1),
        torch.ones(b, past, dtype=torch.long),
        torch.ones(b, s, dtype=torch.long),
        *(torch.zeros(b, c.heads, d, past) for _ in keys),
        *(torch.zeros(b, c.heads, past, d) for _ in values),
        *(torch.zeros(b, c.heads, d, s) for _ in cross_k),
        *(torch.zeros(b, c.heads, s, d) for _ in cross_v),
    )
    axes = {"input_ids": {0: "batch", 1: "new"}, "position_ids": {0: "batch", 1: "new"}}
    axes |= {"attention_mask": {0: "batch", 1: "past"}, "source_mask": {0: "batch", 1: "source"}}
    axes |= {n: {0: "batch", 3: "past"} for n in keys} | {n: {0: "batch", 2: "past"} for n in values}
    axes |= {n: {0: "batch", 3: "source"} for n in cross_k} | {n: {0: "batch", 2: "source"} for n in cross_v}
    axes |= {"logits": {0: "batch", 1: "new"}} | {n: {1: "batch", 3: "new"} for n in DECODER_OUTPUTS[1:]}
    with torch.no_grad(), _quiet():
        torch.onnx.export(
            EncoderGraph(graph), (torch.ones(b, s, dtype=torch.long),), str(folder / files[0]), dynamo=False,
            input_names=["source_ids"], output_names=list(ENCODER_OUTPUTS), dynamic_axes=encoder_axes,
            opset_version=17,
        )  # fmt: skip
        torch.onnx.export(
            DecoderGraph(graph), example, str(folder / files[1]), dynamo=False,
            input_names=decoder_input_names(layers), output_names=list(DECODER_OUTPUTS), dynamic_axes=axes,
            opset_version=17,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------ parity


def held_out_pairs(translator: Translator, data: str | Path | None) -> tuple[pa.Table, str]:
    """Up to `PARITY_PAIRS` cleaned held-out pairs, spread over the run's test split (valid without
    one) or over a pairs file `data`, and where they came from."""
    from largo.data.pairs import load_pairs, read_pairs
    from largo.data.readers import DataError

    cfg = translator.config
    if data is not None:
        if not Path(data).is_file():
            raise DataError(f"{data}: no such file to check the export on")
        table, source = read_pairs(str(data), cfg)[0], str(data)
    else:
        try:
            tables = load_pairs(cfg)[0]
        except (FileNotFoundError, DataError) as exc:
            raise DataError(f"cannot re-create the run's test split ({exc}); pass --data FILE") from None
        source = "test split" if tables["test"].num_rows else "valid split"
        table = tables[source.split()[0]]
    if table.num_rows == 0:
        raise DataError(f"{source}: no pairs to check the export on; pass --data FILE")
    n = table.num_rows
    picks = np.unique(np.linspace(0, n - 1, num=min(PARITY_PAIRS, n)).astype(int))
    return table.take(pa.array(picks)), source


def _through_rows(
    model: OnnxSeq2Seq, sources: list[list[int]], targets: np.ndarray, context: int, source_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced logits [n, t, vocab], and the positions they cover [n, t], of the reference targets
    [n, t + 1] (BOS first, PAD after EOS) decoded as the server decodes (`OnnxSeq2SeqRows`): source i
    joins at step i and its row is fed its next reference token every step; it leaves once its EOS has
    been predicted (the last row moving into its place)."""
    n, t = targets.shape[0], targets.shape[1] - 1
    ends = (targets[:, 1:] != PAD).sum(1)  # positions to predict: up to and with EOS
    out, covered = np.zeros((n, t, model.vocab), np.float32), np.zeros((n, t), bool)
    rows, live, at = OnnxSeq2SeqRows(model, n, context, source_length), [], {}
    waiting = list(range(n))
    while waiting or live:
        if waiting:
            i = waiting.pop(0)
            out[i, 0], covered[i, 0], at[i] = rows.add(sources[i]), True, 1
            live.append(i)
        for r in reversed(range(len(live))):
            if at[live[r]] == ends[live[r]]:
                rows.remove(r)
                live[r] = live[-1]
                live.pop()
        if live:
            logits = rows.step([int(targets[i, at[i]]) for i in live])
            for r, i in enumerate(live):
                out[i, at[i]], covered[i, at[i]] = logits[r], True
                at[i] += 1
    return out, covered


def seq2seq_parity(
    translator: Translator, onnx: OnnxSeq2Seq, table: pa.Table, lossy: bool, max_abs_diff: float
) -> dict[str, Any]:
    """The graphs against eager fp32 on held-out pairs: teacher-forced logits read whole and through
    the rows of a continuous batch, then the beam-searched outputs of both (see the module doc)."""
    from largo.data.pairs import encode_pairs, texts
    from largo.evaluate.metrics import generation_metrics

    cfg, model = translator.config, translator.model.float().eval()
    split = encode_pairs(table, cfg, translator.tokenizer, "held-out", lambda *_: None)
    source, target = split.inputs["source"], split.inputs["target"]
    with torch.inference_mode():
        kv, mask = model.encode(source)
        reference = model.decode(target[:, :-1], kv, mask).float().numpy()
    labels = target[:, 1:].numpy()
    real = labels != PAD
    sources = [row[row != PAD].tolist() for row in source.numpy()]
    context, length = cfg.model.context, cfg.tokenizer.max_source_length
    paths = {
        "whole": (onnx.read(source.numpy(), target[:, :-1].numpy()), real),
        "rows": _through_rows(onnx, sources, target.numpy(), context, length),
    }
    keep = np.setdiff1d(np.arange(reference.shape[-1]), NEVER)  # never generated: -inf in the rows
    goal = np.searchsorted(keep, labels)
    report: dict[str, Any] = {"pairs": len(sources), "tokens": int(real.sum()), "lossy": lossy}
    for name, (out, covered) in paths.items():
        at = real & covered
        report[name] = compare(reference[at][:, keep], out[at][:, keep], goal[at])
    before = _perplexity(reference[real][:, keep], goal[real])
    after = before * (1.0 + report["whole"]["perplexity_increase"])
    d = cfg.decode
    eager = translator.search(sources, cfg.max_new_tokens, d.beams, d.length_penalty)
    rows = OnnxSeq2SeqRows(onnx, len(sources) * d.beams, context, length)
    graph = search_numpy(rows, sources, cfg.max_new_tokens, d.beams, d.length_penalty)
    references = texts(table, cfg.data.target)
    scores = [generation_metrics([translator.decode(r) for r in rows], references) for rows in (eager, graph)]
    report["outputs"] = {
        "beams": d.beams,
        "same": float(np.mean([a == b for a, b in zip(eager, graph, strict=True)])),
        **{when: {k: s[k] for k in ("bleu", "chrf")} for when, s in zip(("before", "after"), scores)},  # noqa: B905
    }
    return verdict(report, list(paths), before, after, lossy, max_abs_diff)


# --------------------------------------------------------------------------------------- benchmark


def benchmark_seq2seq(
    path: Path, table: pa.Table, rounds: int = 3, batches: tuple[int, ...] = LM_BENCH_ROWS
) -> dict[str, Any]:
    """Every runtime the bundle has (torch, torch-bf16, onnx, onnx-int8) two ways on the held-out
    sources: greedy decoding tokens/s at 1 and 8 rows as the server batches it (`benchmark_decoding`,
    which `auto` compares), and sources/s of beam-search translation of all of them (`translate`: the
    bundle's beams, batches of 32, as `largo predict` translates)."""
    from largo.data.pairs import encode_pairs, texts

    generators: dict[str, Any] = {
        "torch": Translator.load(path),
        "torch-bf16": Translator.load(path, precision="bf16"),
    }
    for runtime, files in SEQ2SEQ_ONNX_RUNTIMES.items():
        if all((path / f).exists() for f in files):
            generators[runtime] = OnnxTranslator(path, runtime, torch.get_num_threads())
    cfg = generators["torch"].config
    sources = source_ids(generators["torch"].tokenizer, texts(table, cfg.data.source), cfg)
    new_tokens = max(2, min(32, cfg.model.context - 1))

    def passed(runtime: str) -> bool:
        if runtime != "torch-bf16":
            return onnx_passed(path, runtime)
        split = encode_pairs(table, cfg, generators["torch"].tokenizer, "held-out", lambda *_: None)
        losses = []
        for name in ("torch", runtime):
            with torch.inference_mode():
                out = generators[name].model(split.inputs)
            losses.append(float(out["nll"].float().sum() / out["tokens"].sum()))
        return math.exp(losses[1] - losses[0]) - 1.0 <= LM_PARITY["max_perplexity_increase"]

    result = benchmark_decoding(generators, sources, passed, new_tokens, rounds, batches)
    names, items = list(generators), texts(table, cfg.data.source)
    speeds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            generators[name].translate(items)  # as `largo predict` translates: batches of 32
            speeds[name].append(len(items) / (time.perf_counter() - start))
    for name in names:
        result["runtimes"][name]["sources_per_s"] = statistics.median(speeds[name])
    return {**result, "beams": cfg.decode.beams, "sources": len(sources)}


def export_seq2seq_bundle(
    translator: Translator,
    table: pa.Table,
    source: str,
    quantize: str = "none",
    max_abs_diff: float = LM_PARITY["max_abs_diff"],
    run_benchmark: bool = False,
) -> dict[str, Any]:
    """encoder.onnx and decoder.onnx (and their int8 versions: asked for, or there from an earlier
    export, which are quantized again from the new graphs) into a seq2seq bundle, each pair checked
    on the held-out pairs `table` (and, with `run_benchmark`, every runtime timed, which `largo serve
    --runtime auto` then reads); returns the export record. Raises ParityError (after writing the
    record) when a check fails."""
    path = translator.path

    def section(runtime: str, lossy: bool) -> dict[str, Any]:
        report = seq2seq_parity(translator, OnnxSeq2Seq(path, runtime), table, lossy, max_abs_diff)
        return {"files": list(SEQ2SEQ_ONNX_RUNTIMES[runtime]), "data": source, "parity": report}

    return export_graphs(
        path,
        quantize,
        SEQ2SEQ_ONNX_RUNTIMES,
        lambda: export_seq2seq_onnx(translator.model, path, SEQ2SEQ_ONNX_RUNTIMES["onnx"]),
        section,
        (lambda: benchmark_seq2seq(path, table)) if run_benchmark else None,
    )
