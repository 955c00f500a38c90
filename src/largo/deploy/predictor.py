"""Raw records → outputs with probabilities. Shared by the CLI, the Python API and the server."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from largo.data.features import CategoryProcessor, NumberProcessor, encode_inputs, sequence_pads
from largo.data.readers import DataError
from largo.data.text import text_lengths
from largo.deploy.bundle import Bundle, read_bundle
from largo.train.loop import forward_in_batches

Records = Sequence[Mapping[str, Any]] | Mapping[str, Any] | pa.Table


class Predictor:
    """A loaded bundle that predicts from raw records (dicts keyed by column or feature name)."""

    def __init__(self, bundle: Bundle, batch_size: int = 256, precision: str = "fp32"):
        self.bundle = bundle
        self.config = bundle.config
        self.model = bundle.model
        self.batch_size = batch_size
        self.precision = precision

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> Predictor:
        """Read a bundle folder."""
        return cls(read_bundle(path), **kwargs)

    @property
    def path(self) -> Path:
        """The bundle folder."""
        return self.bundle.path

    @property
    def labels(self) -> dict[str, list[str]]:
        """Class labels of each category output."""
        return {
            n: p.vocab
            for n, p in self.bundle.processors.items()
            if isinstance(p, CategoryProcessor) and p.is_output
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

    def encode(self, records: Records, base_dir: str | None = None) -> dict[str, torch.Tensor]:
        """Records → the model's input tensors (same preprocessing as training)."""
        return encode_inputs(self.columns(records), self.config.inputs, self.bundle.processors, base_dir)

    def raw_outputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encoded inputs → logits / scaled values per output (float32, CPU)."""
        pad = sequence_pads(self.config.inputs, self.bundle.processors)
        return forward_in_batches(self.model, inputs, self.batch_size, self.precision, pad)

    def format(self, outputs: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """Model outputs → one dict per record: label, its probability and all class probabilities."""
        n = len(next(iter(outputs.values())))
        results: list[dict[str, Any]] = [{} for _ in range(n)]
        for f in self.config.outputs:
            proc = self.bundle.processors[f.name]
            out = outputs[f.name]
            if isinstance(proc, CategoryProcessor):
                probs = torch.softmax(out, dim=-1)
                conf, idx = probs.max(dim=-1)
                for r, i, c, p in zip(results, idx.tolist(), conf.tolist(), probs.tolist(), strict=True):
                    r[f.name] = proc.vocab[i]
                    r[f"{f.name}_probability"] = c
                    r[f"{f.name}_probabilities"] = dict(zip(proc.vocab, p, strict=True))
            else:
                assert isinstance(proc, NumberProcessor)
                for r, v in zip(results, proc.unscale(out.double().numpy()).tolist(), strict=True):
                    r[f.name] = v
        return results

    def predict(self, records: Records, base_dir: str | None = None) -> list[dict[str, Any]] | dict[str, Any]:
        """Predict outputs for raw records; a single mapping gives a single result.

        Args:
            records: a dict, a list of dicts, or a pyarrow Table with the input columns; for a model
                whose only input is a text, also a string or a list of strings.
            base_dir: folder that relative image paths are resolved against.

        Returns:
            For each record {output: label or value, output_probability, output_probabilities}.
        """
        single = isinstance(records, Mapping | str)
        inputs = self.encode(self.from_texts(records), base_dir)
        results = self.format(self.raw_outputs(inputs))
        for i, notes in self.text_warnings(inputs).items():
            results[i]["warnings"] = notes
        return results[0] if single else results

    def text_warnings(self, inputs: dict[str, torch.Tensor]) -> dict[int, list[str]]:
        """Row → notes on its texts: empty, or cut at max_length (the prediction is still made)."""
        notes: dict[int, list[str]] = {}
        for name, pad_id in sequence_pads(self.config.inputs, self.bundle.processors).items():
            lengths = text_lengths(inputs[name], pad_id).tolist()
            limit = self.bundle.processors[name].max_length
            for i, n in enumerate(lengths):
                if n == 0:
                    notes.setdefault(i, []).append(f"text {name!r} is empty after normalization")
                elif n >= limit:
                    notes.setdefault(i, []).append(f"text {name!r} was cut to max_length {limit} tokens")
        return notes


def load_predictor(path: str | Path, runtime: str = "torch", **kwargs: Any) -> Predictor:
    """A bundle's predictor on the chosen runtime: 'torch' (eager) or 'onnx' (ONNX Runtime, no torch)."""
    if runtime == "torch":
        return Predictor.load(path, **kwargs)
    raise NotImplementedError(f"runtime {runtime!r} is not built yet")  # 'onnx': issue 4, in progress
