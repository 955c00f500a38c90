"""Raw records → outputs with probabilities. Shared by the CLI, the Python API and the server.

`BasePredictor` holds everything but the forward pass (picking columns, preprocessing, formatting,
text warnings) and needs numpy only; `Predictor` runs the model in torch (eager, bf16 autocast or
torch.compile), `OnnxPredictor` (`runtime.py`) in ONNX Runtime. Importing this module does not import
torch, so `load_predictor(path, "onnx")` works in a serving image without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from largo.data.features import (
    CategoryProcessor,
    NumberProcessor,
    Processor,
    encode_input_arrays,
    sequence_pads,
)
from largo.data.readers import DataError
from largo.data.text import array_lengths
from largo.deploy.metadata import BundleInfo

if TYPE_CHECKING:
    import torch

    from largo.deploy.bundle import Bundle

Records = Sequence[Mapping[str, Any]] | Mapping[str, Any] | pa.Table
RUNTIMES = ("torch", "torch-bf16", "torch-compile", "onnx", "onnx-int8", "auto")


DEVICES = ("auto", "cpu", "cuda", "cuda:N")


def serving_device(name: str) -> torch.device:
    """The torch device a predictor runs on: 'auto' (the GPU when there is one), 'cpu', 'cuda', 'cuda:N'.

    Raises:
        ValueError: for another name, or a GPU this machine does not have.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: allowed {', '.join(DEVICES)}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise ValueError(f"device {name!r}: this machine has {gpus} CUDA device(s); use cpu or auto")
    return device


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float32."""
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


class BasePredictor:
    """Raw records → outputs for a bundle; subclasses supply `encode` and `raw_outputs`."""

    def __init__(self, bundle: BundleInfo | Bundle, batch_size: int = 256):
        self.bundle = bundle
        self.config = bundle.config
        self.processors: dict[str, Processor] = bundle.processors
        self.batch_size = batch_size

    @property
    def path(self) -> Path:
        """The bundle folder."""
        return self.bundle.path

    @property
    def labels(self) -> dict[str, list[str]]:
        """Class labels of each category output."""
        return {
            n: p.vocab for n, p in self.processors.items() if isinstance(p, CategoryProcessor) and p.is_output
        }

    def columns(self, records: Records) -> dict[str, list[Any]]:
        """Pick each input's raw values out of the records, by column name or feature name."""
        if isinstance(records, pa.Table):
            table = records
            names = set(table.column_names)
            out = {}
            for f in self.config.inputs:
                key = f.source if f.source in names else f.name
                if key not in names:
                    raise DataError(f"input {f.name!r} is missing: no column {f.source!r} in {sorted(names)}")
                out[f.name] = table.column(key).to_pylist()
        else:
            rows = [records] if isinstance(records, Mapping) else list(records)
            out = {f.name: [] for f in self.config.inputs}
            for i, row in enumerate(rows):
                if not isinstance(row, Mapping):
                    raise DataError(
                        f"record {i}: expected a mapping of field → value, got {type(row).__name__}"
                    )
                for f in self.config.inputs:
                    if f.source in row:
                        out[f.name].append(row[f.source])
                    elif f.name in row:
                        out[f.name].append(row[f.name])
                    else:
                        raise DataError(
                            f"record {i}: missing input {f.source!r} (null is allowed, absence is not)"
                        )
        return out

    def from_texts(self, records: Records | str | Sequence[str]) -> Records:
        """A string or a list of strings → records, for a model whose only input is a text."""
        texts = [records] if isinstance(records, str) else records
        if isinstance(texts, pa.Table | Mapping) or not texts or not all(isinstance(t, str) for t in texts):
            return records  # type: ignore[return-value]
        inputs = self.config.inputs
        if len(inputs) != 1 or inputs[0].type != "text":
            names = ", ".join(f"{f.name} ({f.type})" for f in inputs)
            raise DataError(f"plain strings need a model with one text input; this one takes {names}")
        return [{inputs[0].source: t} for t in texts]

    def encode_arrays(self, records: Records, base_dir: str | None = None) -> dict[str, np.ndarray]:
        """Records → the model's inputs as numpy arrays (same preprocessing as training)."""
        return encode_input_arrays(self.columns(records), self.config.inputs, self.processors, base_dir)

    def encode(self, records: Records, base_dir: str | None = None) -> dict[str, Any]:
        """Records → the model's inputs in this runtime's array type."""
        raise NotImplementedError

    def raw_outputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Encoded inputs → logits / scaled values per output (float32)."""
        raise NotImplementedError

    def format(self, outputs: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Model outputs → one dict per record: label, its probability and all class probabilities."""
        n = len(next(iter(outputs.values())))
        results: list[dict[str, Any]] = [{} for _ in range(n)]
        for f in self.config.outputs:
            proc = self.processors[f.name]
            out = np.asarray(outputs[f.name], dtype=np.float32)
            if isinstance(proc, CategoryProcessor):
                probs = softmax(out)
                idx = probs.argmax(axis=-1)
                conf = probs[np.arange(n), idx]
                for r, i, c, p in zip(results, idx.tolist(), conf.tolist(), probs.tolist(), strict=True):
                    r[f.name] = proc.vocab[i]
                    r[f"{f.name}_probability"] = c
                    r[f"{f.name}_probabilities"] = dict(zip(proc.vocab, p, strict=True))
            else:
                assert isinstance(proc, NumberProcessor)
                for r, v in zip(results, proc.unscale(out.astype(np.float64)).tolist(), strict=True):
                    r[f.name] = v
        return results

    def predict(self, records: Records, base_dir: str | None = None) -> list[dict[str, Any]] | dict[str, Any]:
        """Predict outputs for raw records; a single mapping gives a single result.

        Args:
            records: a dict, a list of dicts, or a pyarrow Table with the input columns; for a model
                whose only input is a text, also a string or a list of strings.
            base_dir: folder that relative image paths are resolved against.

        Returns:
            For each record {output: label or value, output_probability, output_probabilities}, plus
            `warnings` for a text that is empty or was cut at max_length.
        """
        single = isinstance(records, Mapping | str)
        inputs = self.encode(self.from_texts(records), base_dir)
        results = self.format(self.raw_outputs(inputs))
        for i, notes in self.text_warnings(inputs).items():
            results[i]["warnings"] = notes
        return results[0] if single else results

    def text_warnings(self, inputs: Mapping[str, Any]) -> dict[int, list[str]]:
        """Row → notes on its texts: empty, or cut at max_length (the prediction is still made)."""
        notes: dict[int, list[str]] = {}
        for name, pad_id in sequence_pads(self.config.inputs, self.processors).items():
            lengths = array_lengths(np.asarray(inputs[name]), pad_id).tolist()
            limit = self.processors[name].max_length
            for i, n in enumerate(lengths):
                if n == 0:
                    notes.setdefault(i, []).append(f"text {name!r} is empty after normalization")
                elif n >= limit:
                    notes.setdefault(i, []).append(f"text {name!r} was cut to max_length {limit} tokens")
        return notes


class Predictor(BasePredictor):
    """A loaded bundle that predicts from raw records with the torch model.

    `precision` 'bf16' runs under bf16 autocast; `compile` wraps the model in torch.compile. `device`
    'cpu', 'cuda' (or 'cuda:1') or 'auto' (the GPU when there is one) is where the model runs; inputs
    are encoded on the CPU and outputs come back to it.
    """

    def __init__(
        self,
        bundle: Bundle,
        batch_size: int = 256,
        precision: str = "fp32",
        compile: bool = False,
        device: str = "cpu",
    ):
        super().__init__(bundle, batch_size)
        self.device = serving_device(device)
        self.model = bundle.model.to(self.device)
        self.precision = precision
        self.runtime = "torch-compile" if compile else ("torch-bf16" if precision == "bf16" else "torch")
        if compile:
            import torch

            self.model = torch.compile(self.model, dynamic=True)

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> Predictor:
        """Read a bundle folder."""
        from largo.deploy.bundle import read_bundle

        return cls(read_bundle(path), **kwargs)

    def encode(self, records: Records, base_dir: str | None = None) -> dict[str, torch.Tensor]:
        """Records → the model's input tensors (same preprocessing as training)."""
        import torch

        return {k: torch.from_numpy(v) for k, v in self.encode_arrays(records, base_dir).items()}

    def raw_outputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encoded inputs → logits / scaled values per output (float32, CPU)."""
        from largo.train.loop import forward_in_batches

        pad = sequence_pads(self.config.inputs, self.processors)
        return forward_in_batches(self.model, inputs, self.batch_size, self.precision, pad)


def load_predictor(path: str | Path, runtime: str = "torch", **kwargs: Any) -> BasePredictor:
    """A bundle's predictor on the chosen runtime; every one has the same `predict` interface.

    Args:
        path: a bundle folder.
        runtime: 'torch' (eager fp32), 'torch-bf16' (bf16 autocast), 'torch-compile', 'onnx'
            (ONNX Runtime on model.onnx, no torch imported), 'onnx-int8' (model.int8.onnx), or 'auto':
            the fastest runtime whose accuracy drop `largo export --benchmark` measured to be within
            1 point (torch eager when the bundle holds no measurements).
        kwargs: passed to the predictor (batch_size; precision and device for torch). ONNX Runtime
            runs on the CPU here: device 'cuda' with an onnx runtime is refused.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; allowed: {', '.join(RUNTIMES)}")
    if runtime == "auto":
        from largo.deploy.runtime import choose_runtime

        runtime = choose_runtime(path)
    if runtime in ("onnx", "onnx-int8"):
        from largo.deploy.runtime import OnnxPredictor

        device = kwargs.pop("device", "cpu")
        if device not in ("cpu", "auto"):
            raise ValueError(
                f"device {device!r}: the {runtime} runtime runs on the CPU (ONNX Runtime's CPU provider); "
                "serve on a GPU with --runtime torch or torch-bf16"
            )
        return OnnxPredictor.load(path, int8=runtime == "onnx-int8", **kwargs)
    if runtime == "torch-bf16":
        kwargs.setdefault("precision", "bf16")
    return Predictor.load(path, compile=runtime == "torch-compile", **kwargs)
