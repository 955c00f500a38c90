"""Export a bundle to ONNX / TorchScript, quantize to int8, prune, and check every result for parity.

Every file goes into the bundle beside the weights (`model.onnx`, `model.int8.onnx`, `model.ts`), and
every export is checked on held-out rows against the eager fp32 model; the checks and the runtime
timings land in the bundle's `export.json`, which `load_predictor(path, "auto")` reads.

Parity rules (`PARITY`):
- a faithful copy (ONNX fp32, TorchScript): largest |output difference| ≤ 1e-3 over every logit /
  regression value, and ≥ 99.9% of predicted labels equal to eager's;
- a lossy copy (int8, pruned weights): accuracy at most 1 point below eager's (R² at most 0.01 below
  for a regression output).

ONNX comes from the dynamo exporter (`torch.onnx.export(..., dynamo=True)`) with a dynamic batch axis
and a dynamic length per text input; when it fails the TorchScript-based exporter
(`dynamo=False`, dynamic_axes) takes over, and export.json names the one used. RNN encoders are
exported in their masked form (`export_rnn.py`: packed sequences do not export) and by the
TorchScript-based exporter first, which writes ONNX's GRU/LSTM ops in seconds where dynamo takes a
minute.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from largo.data.features import CategoryProcessor, encode_input_arrays, sequence_pads
from largo.data.readers import source_dir
from largo.data.text import TextProcessor, array_lengths
from largo.deploy.bundle import Bundle
from largo.deploy.export_rnn import export_friendly
from largo.deploy.metadata import EXPORT_RECORD, ParityError, read_json
from largo.deploy.predictor import BasePredictor, Predictor
from largo.deploy.runtime import INT8_FILE, ONNX_FILE, OnnxPredictor, choose_runtime
from largo.models.rnn import RnnTextEncoder

TORCHSCRIPT_FILE = "model.ts"
FORMATS = ("onnx", "torchscript", "all")
QUANTIZE = ("none", "int8")
EXPORTERS = ("auto", "dynamo", "torchscript")
PARITY = {"max_abs_diff": 1e-3, "min_agreement": 0.999, "max_accuracy_drop": 0.01}


@dataclass
class HeldOut:
    """Encoded held-out rows: model inputs and targets as numpy arrays, and where they came from."""

    inputs: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    source: str
    pads: dict[str, int]  # token id inputs → their padding id

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def head(self, n: int) -> dict[str, np.ndarray]:
        """The first n rows' inputs (texts cut to their longest row, at least 2 steps: an exporter
        treats a size-1 axis as fixed)."""
        out = {}
        for k, v in self.inputs.items():
            v = v[:n]
            if k in self.pads:
                longest = max(2, int(array_lengths(v, self.pads[k]).max(initial=0)))
                v = np.pad(v, ((0, 0), (0, max(0, longest - v.shape[1]))), constant_values=self.pads[k])
                v = v[:, :longest]
            out[k] = np.ascontiguousarray(v)
        return out


def held_out(bundle: Bundle, table: pa.Table, source: str) -> HeldOut:
    """A cleaned, labelled table → encoded inputs and targets through the bundle's processors."""
    cfg, procs = bundle.config, bundle.processors
    columns = {f.name: table.column(f.source) for f in cfg.inputs}
    inputs = encode_input_arrays(columns, cfg.inputs, procs, source_dir(table))
    targets = {f.name: procs[f.name].encode_array(table.column(f.source)) for f in cfg.outputs}
    return HeldOut(inputs, targets, source, sequence_pads(cfg.inputs, procs))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' and quantizer's advice printed through logging and warnings."""
    root, onnx_log = logging.getLogger(), logging.getLogger("torch.onnx")
    levels = root.level, onnx_log.level
    root.setLevel(logging.ERROR)
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(levels[0])
        onnx_log.setLevel(levels[1])


# ------------------------------------------------------------------------------------------ graphs


class Graph(nn.Module):
    """The model with positional tensor inputs and a tuple of outputs, as exporters want it."""

    def __init__(self, model: nn.Module, input_names: list[str], output_names: list[str]):
        super().__init__()
        self.model = export_friendly(model)
        self.input_names = input_names
        self.output_names = output_names

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(dict(zip(self.input_names, xs, strict=True)))
        return tuple(out[n].float() for n in self.output_names)


class Unpacked(nn.Module):
    """A positional graph (e.g. TorchScript) called with a batch dict, returning an output dict."""

    def __init__(self, graph: nn.Module, input_names: list[str], output_names: list[str]):
        super().__init__()
        self.graph = graph
        self.input_names = input_names
        self.output_names = output_names
        self.anchor = nn.Parameter(torch.zeros(0))  # forward_in_batches reads the device off a parameter

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(zip(self.output_names, self.graph(*(batch[n] for n in self.input_names)), strict=True))


def _names(bundle: Bundle, rows: HeldOut) -> tuple[list[str], list[str], list[str]]:
    """(input names, output names, the inputs that are token id sequences)."""
    texts = [f.name for f in bundle.config.inputs if isinstance(bundle.processors[f.name], TextProcessor)]
    return list(rows.inputs), [f.name for f in bundle.config.outputs], texts


def export_onnx(bundle: Bundle, rows: HeldOut, exporter: str = "auto") -> str:
    """Write model.onnx into the bundle; returns the exporter used ('dynamo' or 'torchscript')."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; allowed: {', '.join(EXPORTERS)}")
    inputs, outputs, texts = _names(bundle, rows)
    graph = Graph(bundle.model, inputs, outputs).eval()
    example = tuple(torch.from_numpy(v) for v in rows.head(4).values())
    path = bundle.path / ONNX_FILE
    errors = []
    order = ("dynamo", "torchscript")
    if any(isinstance(e, RnnTextEncoder) for e in getattr(bundle.model, "encoders", {}).values()):
        # the TorchScript-based exporter writes ONNX's own GRU/LSTM ops in seconds; dynamo takes
        # about a minute for the same RNN on 2 cores
        order = ("torchscript", "dynamo")
    for kind in order if exporter == "auto" else (exporter,):
        try:
            with _quiet():
                _export_onnx(graph, example, path, inputs, outputs, texts, bundle, dynamo=kind == "dynamo")
            return kind
        except Exception as exc:  # noqa: BLE001 - any exporter failure means: try the next one
            errors.append(f"{kind}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise ParityError("ONNX export failed: " + " | ".join(errors))


def _export_onnx(
    graph: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    texts: list[str],
    bundle: Bundle,
    dynamo: bool,
) -> None:
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        shapes = []
        for name in inputs:
            axes = {0: batch}
            if name in texts:  # a text's length: 1 up to its tokenizer's max_length
                limit = bundle.processors[name].max_length
                axes[1] = torch.export.Dim(f"length_{len(shapes)}", min=1, max=max(limit, 2))
            shapes.append(axes)
        program = torch.onnx.export(
            graph, example, dynamo=True, input_names=inputs, output_names=outputs,
            dynamic_shapes=(tuple(shapes),), optimize=True, verbose=False,
        )  # fmt: skip
        program.save(str(path))
    else:
        axes = {n: {0: "batch", **({1: f"length_{n}"} if n in texts else {})} for n in inputs}
        axes |= {n: {0: "batch"} for n in outputs}
        torch.onnx.export(
            graph, example, str(path), dynamo=False, input_names=inputs, output_names=outputs,
            dynamic_axes=axes, opset_version=17,
        )  # fmt: skip


def quantize_int8(bundle: Bundle, calibration: HeldOut | None = None) -> str:
    """model.onnx → model.int8.onnx; returns the method: 'static' (CNNs, calibrated on train rows)
    or 'dynamic' (int8 weights, activations quantized on the fly: text and MLP models)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    src, dst = str(bundle.path / ONNX_FILE), str(bundle.path / INT8_FILE)
    has_image = any(f.type == "image" for f in bundle.config.inputs)
    if has_image and calibration is not None:
        with _quiet():
            quantize_static(
                src, dst, _Calibration(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            )  # fmt: skip
        return "static"
    with _quiet():
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
    return "dynamic"


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over encoded train rows, 32 at a time."""

    def __init__(self, rows: HeldOut, batch: int = 32, limit: int = 512):
        n = min(len(rows), limit)
        self.batches = iter(
            [{k: v[lo : lo + batch] for k, v in rows.inputs.items()} for lo in range(0, n, batch)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def export_torchscript(bundle: Bundle, rows: HeldOut) -> None:
    """Write model.ts (a traced TorchScript archive; load with torch.jit.load)."""
    inputs, outputs, _ = _names(bundle, rows)
    graph = Graph(bundle.model, inputs, outputs).eval()
    example = tuple(torch.from_numpy(v) for v in rows.head(4).values())
    with torch.no_grad(), _quiet():  # torch.jit is deprecated in favour of torch.export and says so
        traced = torch.jit.trace(graph, example, check_trace=False)
        torch.jit.save(traced, str(bundle.path / TORCHSCRIPT_FILE))


def load_torchscript(bundle: Bundle, rows: HeldOut) -> Predictor:
    """A Predictor running the bundle's model.ts."""
    inputs, outputs, _ = _names(bundle, rows)
    with _quiet():  # torch.jit is deprecated in favour of torch.export, and says so on every call
        graph = torch.jit.load(str(bundle.path / TORCHSCRIPT_FILE))
    return Predictor(
        Bundle(bundle.path, bundle.config, bundle.processors, {}, Unpacked(graph, inputs, outputs))
    )


# ------------------------------------------------------------------------------------------ parity


def outputs_of(predictor: BasePredictor, rows: HeldOut) -> dict[str, np.ndarray]:
    """Raw outputs of any predictor on the held-out rows, as float32 numpy arrays."""
    inputs: dict[str, Any] = rows.inputs
    if isinstance(predictor, Predictor):
        inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = predictor.raw_outputs(inputs)
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def _score(bundle: Bundle, name: str, out: np.ndarray, target: np.ndarray) -> float:
    """Accuracy of a category output, R² (on the scaled values) of a number output."""
    if isinstance(bundle.processors[name], CategoryProcessor):
        return float((out.argmax(-1) == target).mean())
    sst = float(((target - target.mean()) ** 2).sum()) or 1.0
    return 1.0 - float(((out.reshape(target.shape) - target) ** 2).sum()) / sst


def parity(
    bundle: Bundle,
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    rows: HeldOut,
    lossy: bool,
    max_abs_diff: float = PARITY["max_abs_diff"],
) -> dict[str, Any]:
    """Compare a candidate's outputs with eager fp32's on the held-out rows; `passed` says the verdict."""
    report: dict[str, Any] = {"rows": len(rows), "lossy": lossy, "outputs": {}}
    passed = True
    for name, ref in reference.items():
        cand = candidate[name]
        m: dict[str, Any] = {"max_abs_diff": float(np.abs(ref - cand).max()) if ref.size else 0.0}
        before, after = (
            _score(bundle, name, ref, rows.targets[name]),
            _score(bundle, name, cand, rows.targets[name]),
        )
        category = isinstance(bundle.processors[name], CategoryProcessor)
        m |= {
            "metric": "accuracy" if category else "r2",
            "before": before,
            "after": after,
            "drop": before - after,
        }
        if category:
            m["label_agreement"] = float((ref.argmax(-1) == cand.argmax(-1)).mean())
        if lossy:
            ok = m["drop"] <= PARITY["max_accuracy_drop"] + 1e-9
        else:
            ok = (
                m["max_abs_diff"] <= max_abs_diff and m.get("label_agreement", 1.0) >= PARITY["min_agreement"]
            )
        m["passed"] = bool(ok)
        passed = passed and ok
        report["outputs"][name] = m
    report["passed"] = passed
    report["thresholds"] = (
        {"max_accuracy_drop": PARITY["max_accuracy_drop"]}
        if lossy
        else {"max_abs_diff": max_abs_diff, "min_agreement": PARITY["min_agreement"]}
    )
    return report


# --------------------------------------------------------------------------------------- benchmark


def measure(
    predictors: dict[str, BasePredictor], rows: HeldOut, rounds: int = 5, min_seconds: float = 0.3
) -> dict[str, list[float]]:
    """Rows/s of each predictor's forward pass on the same rows, interleaved (a rotated order each round)."""
    names = list(predictors)
    calls = {n: (lambda p=predictors[n]: outputs_of(p, rows)) for n in names}
    for call in calls.values():  # warm-up (and torch.compile's compilation)
        call()
    repeats = {}
    for n, call in calls.items():  # enough repeats for ~min_seconds per measurement
        t = time.perf_counter()
        call()
        repeats[n] = max(1, int(min_seconds / max(time.perf_counter() - t, 1e-6)))
    speeds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            for _ in range(repeats[n]):
                calls[n]()
            speeds[n].append(repeats[n] * len(rows) / (time.perf_counter() - t))
    return speeds


def runtime_predictors(
    bundle: Bundle, batch_size: int = 32, compile: bool = False
) -> dict[str, BasePredictor]:
    """Every runtime the bundle can run on now, with one thread count for torch and ONNX Runtime."""
    threads = torch.get_num_threads()
    out: dict[str, BasePredictor] = {
        "torch": Predictor(bundle, batch_size),
        "torch-bf16": Predictor(bundle, batch_size, precision="bf16"),
    }
    if compile:
        out["torch-compile"] = Predictor(bundle, batch_size, compile=True)
    for file in (ONNX_FILE, INT8_FILE):
        if (bundle.path / file).exists():
            p = OnnxPredictor(bundle, file, batch_size, threads=threads)
            out[p.runtime] = p
    return out


def benchmark(bundle: Bundle, rows: HeldOut, rounds: int = 5, compile: bool = False) -> dict[str, Any]:
    """Throughput at batch 32 and accuracy of every available runtime; the `auto` choice among them."""
    predictors = runtime_predictors(bundle, 32, compile)
    speeds = measure(predictors, rows, rounds)
    reference = outputs_of(predictors["torch"], rows)
    base = statistics.median(speeds["torch"])
    runtimes = {}
    for name, p in predictors.items():
        check = parity(bundle, reference, outputs_of(p, rows), rows, lossy=True)
        first = next(iter(check["outputs"].values()))
        median = statistics.median(speeds[name])
        runtimes[name] = {
            "rows_per_s": median,
            "ratio": median / base,
            "accuracy": first["after"],
            "parity_passed": check["passed"],
        }
    return {
        "batch": 32,
        "rows": len(rows),
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "runtimes": runtimes,
    }


# --------------------------------------------------------------------------------------------- record


def update_record(path: Path, section: str, value: Any) -> dict[str, Any]:
    """Merge one section into the bundle's export.json and return the whole record."""
    record = read_json(path / EXPORT_RECORD)
    record.setdefault("formats", {})
    if section == "benchmark":
        record["benchmark"] = value
    else:
        record["formats"][section] = value
    record["versions"] = {"torch": torch.__version__, "onnxruntime": _ort_version()}
    (path / EXPORT_RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def export_bundle(
    bundle: Bundle,
    rows: HeldOut,
    format: str = "onnx",
    quantize: str = "none",
    calibration: HeldOut | None = None,
    exporter: str = "auto",
    max_abs_diff: float = PARITY["max_abs_diff"],
    run_benchmark: bool = False,
    compile: bool = False,
) -> dict[str, Any]:
    """Export, quantize and check a loaded bundle; record everything in export.json.

    Returns the export record. Raises ParityError (after writing the record) when a check fails.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; allowed: {', '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize {quantize!r}; allowed: {', '.join(QUANTIZE)}")
    if quantize == "int8" and format == "torchscript":
        raise ValueError("--quantize int8 quantizes the ONNX model; use --format onnx or all")
    reference = outputs_of(Predictor(bundle), rows)
    failed = []

    def check(section: str, predictor: BasePredictor, lossy: bool, **info: Any) -> None:
        report = parity(bundle, reference, outputs_of(predictor, rows), rows, lossy, max_abs_diff)
        update_record(bundle.path, section, {**info, "data": rows.source, "parity": report})
        if not report["passed"]:
            failed.append(section)

    if format in ("onnx", "all"):
        used = export_onnx(bundle, rows, exporter)
        check("onnx", OnnxPredictor(bundle, ONNX_FILE), False, file=ONNX_FILE, exporter=used)
        if quantize == "int8":
            method = quantize_int8(bundle, calibration)
            check("onnx-int8", OnnxPredictor(bundle, INT8_FILE), True, file=INT8_FILE, method=method)
    if format in ("torchscript", "all"):
        export_torchscript(bundle, rows)
        check("torchscript", load_torchscript(bundle, rows), False, file=TORCHSCRIPT_FILE, exporter="trace")
    if run_benchmark:
        result = benchmark(bundle, rows, compile=compile)
        update_record(bundle.path, "benchmark", result)
        update_record(bundle.path, "benchmark", {**result, "choice": choose_runtime(bundle.path)})
    record = read_json(bundle.path / EXPORT_RECORD)
    if failed:
        raise ParityError(f"parity check failed for {', '.join(failed)}; see {bundle.path / EXPORT_RECORD}")
    return record
