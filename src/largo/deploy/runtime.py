"""ONNX Runtime predictions and the choice of runtime, without torch.

`OnnxPredictor` runs a bundle's `model.onnx` (or `model.int8.onnx`) written by `largo export`, with
the same preprocessing, batching and output format as the torch `Predictor`. `choose_runtime` reads
the timings `largo export --benchmark` recorded in the bundle's export.json and picks the fastest
runtime whose accuracy drop stayed within the allowed point.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from largo.data.features import sequence_pads
from largo.data.text import array_lengths
from largo.deploy.metadata import EXPORT_RECORD, BundleError, BundleInfo, read_bundle_info, read_json
from largo.deploy.predictor import BasePredictor, Records

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
MAX_ACCURACY_DROP = 0.01  # auto picks only runtimes within 1 accuracy point of eager fp32


class OnnxPredictor(BasePredictor):
    """A bundle predicting through ONNX Runtime (CPU); the same interface as `Predictor`."""

    def __init__(
        self, bundle: BundleInfo, model_file: str = ONNX_FILE, batch_size: int = 256, threads: int = 0
    ):
        import onnxruntime as ort

        super().__init__(bundle, batch_size)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per core)
        self.model_file = model_file
        self.runtime = "onnx-int8" if model_file == INT8_FILE else "onnx"
        self.session = ort.InferenceSession(
            str(bundle.path / model_file), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @classmethod
    def load(cls, path: str | Path, int8: bool = False, **kwargs: Any) -> OnnxPredictor:
        """Read a bundle folder that `largo export --format onnx` (and `--quantize int8`) wrote to."""
        file = INT8_FILE if int8 else ONNX_FILE
        path = Path(path)
        if not (path / file).exists():
            how = "largo export BUNDLE --format onnx" + (" --quantize int8" if int8 else "")
            raise BundleError(f"{path}: no {file} in the bundle; write it with: {how}")
        kwargs.pop("precision", None)  # a torch setting; the graph's precision is fixed
        return cls(read_bundle_info(path), file, **kwargs)

    def encode(self, records: Records, base_dir: str | None = None) -> dict[str, np.ndarray]:
        """Records → the model's inputs as numpy arrays."""
        return self.encode_arrays(records, base_dir)

    def raw_outputs(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Encoded inputs → logits / scaled values per output (float32), in input order.

        As in the torch path, texts run sorted by length and each batch is cut to its longest row.
        """
        inputs = {k: np.asarray(v) for k, v in inputs.items()}
        n = len(next(iter(inputs.values())))
        pads = sequence_pads(self.config.inputs, self.processors)
        lengths = {k: array_lengths(inputs[k], p) for k, p in pads.items()}
        order = np.arange(n)
        if lengths:
            key = np.max(np.stack(list(lengths.values())), axis=0)
            order = np.argsort(-key, kind="stable")
        chunks: dict[str, list[np.ndarray]] = {name: [] for name in self.output_names}
        for lo in range(0, n, self.batch_size):
            index = order[lo : lo + self.batch_size]
            feed = {}
            for name in self.input_names:
                x = inputs[name][index]
                if name in lengths:
                    x = np.ascontiguousarray(x[:, : max(1, int(lengths[name][index].max(initial=0)))])
                feed[name] = x
            for name, out in zip(self.output_names, self.session.run(self.output_names, feed), strict=True):
                chunks[name].append(out)
        outputs = {k: np.concatenate(v) for k, v in chunks.items()}
        inverse = np.empty_like(order)
        inverse[order] = np.arange(n)
        return {k: v[inverse] for k, v in outputs.items()}


def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def choose_runtime(path: str | Path, max_drop: float = MAX_ACCURACY_DROP) -> str:
    """The fastest measured runtime whose accuracy is within `max_drop` of eager fp32.

    Reads the `benchmark` section `largo export --benchmark` wrote into export.json. Without it the
    answer is 'torch' (eager); without torch installed only the ONNX runtimes are candidates.
    """
    bench = read_json(Path(path) / EXPORT_RECORD).get("benchmark") or {}
    measured = bench.get("runtimes") or {}
    baseline = (measured.get("torch") or {}).get("accuracy")
    torch_ok = _has_torch()
    best, best_speed = None, 0.0
    for name, m in measured.items():
        if name.startswith("torch") and not torch_ok:
            continue
        drop = 0.0 if baseline is None or m.get("accuracy") is None else baseline - m["accuracy"]
        if m.get("parity_passed", True) and drop <= max_drop + 1e-12 and m["rows_per_s"] > best_speed:
            best, best_speed = name, m["rows_per_s"]
    if best is None:
        return "torch" if torch_ok else "onnx"
    return best
