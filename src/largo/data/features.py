"""Per-type feature processors: fit on the train split, turn columns into arrays, save as JSON.

Each processor has `fit(column)`, `encode_array(column) -> np.ndarray`, `state() -> dict` and
`from_state()`; `encode(column)` is the same as a torch tensor. Encoding needs numpy only (torch is
imported inside the tensor wrappers), so the ONNX Runtime serving path runs without torch.
Number inputs are stacked into one float matrix (`NUMBERS`) so a table of 64 pixel columns is one
tensor, not 64; category inputs become int64 ids (0 is the unknown bucket); images become uint8
[n, c, h, w] tensors that the model normalizes itself, so an exported model takes raw pixels; texts
become right-padded int32 token ids (`data/text.py`), trimmed per batch to the longest row.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from largo.config import CategoryFeatureConfig, ImageFeatureConfig, NumberFeatureConfig
from largo.data.readers import DataError
from largo.data.text import TextProcessor

if TYPE_CHECKING:
    import torch

NUMBERS = "__numbers__"  # batch key of the stacked number inputs
UNKNOWN = "<unk>"


def _values(column: pa.ChunkedArray | pa.Array | Sequence[Any]) -> list[Any]:
    if isinstance(column, pa.ChunkedArray | pa.Array):
        return column.to_pylist()
    return list(column)


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A numpy array as a torch tensor sharing its memory (torch imported only here)."""
    import torch

    return torch.from_numpy(a)


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


class NumberProcessor:
    """Scales one numeric column and fills its missing values; inverts the scaling for outputs."""

    def __init__(self, config: NumberFeatureConfig, stats: dict[str, float] | None = None):
        self.config = config
        self.stats = stats or {}

    def to_float(self, column: pa.ChunkedArray | pa.Array | Sequence[Any]) -> np.ndarray:
        """Column → float64 array with NaN for missing; a non-numeric value is a clear error."""
        if isinstance(column, pa.ChunkedArray | pa.Array) and _is_numeric(column.type):
            return pc.cast(column, pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
        out = np.empty(len(column), dtype=np.float64)
        for i, v in enumerate(_values(column)):
            if v is None or (isinstance(v, str) and not v.strip()):
                out[i] = np.nan
                continue
            try:
                out[i] = float(v)
            except (TypeError, ValueError):
                raise DataError(
                    f"feature {self.config.name!r}: value {v!r} in row {i + 1} is not a number"
                ) from None
        return out

    def fit(self, column: pa.ChunkedArray) -> None:
        """Learn mean/std/min/max/median from the train split (missing values ignored)."""
        x = self.to_float(column)
        x = x[np.isfinite(x)]
        if x.size == 0:
            raise DataError(f"feature {self.config.name!r}: no numeric values in the train split")
        self.stats = {
            "mean": float(x.mean()),
            "std": float(x.std()) or 1.0,
            "min": float(x.min()),
            "max": float(x.max()),
            "median": float(np.median(x)),
        }

    def _fill_value(self) -> float:
        fill = self.config.fill
        return {"mean": self.stats["mean"], "median": self.stats["median"], "zero": 0.0}.get(
            fill, self.config.fill_value
        )

    def scale(self, x: np.ndarray) -> np.ndarray:
        """Raw values → model space (missing filled before scaling)."""
        x = np.where(np.isfinite(x), x, self._fill_value())
        norm = self.config.normalization
        if norm == "standard":
            return (x - self.stats["mean"]) / self.stats["std"]
        if norm == "minmax":
            span = (self.stats["max"] - self.stats["min"]) or 1.0
            return (x - self.stats["min"]) / span
        return x

    def unscale(self, y: np.ndarray) -> np.ndarray:
        """Model space → raw values (for regression outputs)."""
        norm = self.config.normalization
        if norm == "standard":
            return y * self.stats["std"] + self.stats["mean"]
        if norm == "minmax":
            return y * ((self.stats["max"] - self.stats["min"]) or 1.0) + self.stats["min"]
        return y

    def encode_array(self, column: pa.ChunkedArray | Sequence[Any]) -> np.ndarray:
        """Column → float32 array [n] in model space."""
        return self.scale(self.to_float(column)).astype(np.float32)

    def encode(self, column: pa.ChunkedArray | Sequence[Any]) -> torch.Tensor:
        """`encode_array` as a torch tensor."""
        return _tensor(self.encode_array(column))

    def state(self) -> dict[str, Any]:
        """JSON-serializable fitted state."""
        return {"stats": self.stats}


class CategoryProcessor:
    """A vocabulary fit on train. Inputs map unseen values to id 0; outputs reject unseen labels."""

    def __init__(self, config: CategoryFeatureConfig, is_output: bool, vocab: list[str] | None = None):
        self.config = config
        self.is_output = is_output
        self.vocab = vocab or []
        self.index = {v: i for i, v in enumerate(self.vocab)}

    @staticmethod
    def _as_str(v: Any) -> str | None:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)  # 3.0 and 3 are the same class
        return str(v)

    def fit(self, column: pa.ChunkedArray) -> None:
        """Count values on the train split; keep the frequent ones in a stable order."""
        counts = Counter(s for s in map(self._as_str, _values(column)) if s is not None)
        kept = [v for v, c in counts.items() if c >= self.config.min_count]
        if self.config.max_size is not None:
            kept = sorted(kept, key=lambda v: (-counts[v], v))[: self.config.max_size]
        kept = sorted(kept, key=_natural_key)
        if not kept:
            raise DataError(f"feature {self.config.name!r}: no values in the train split")
        self.vocab = kept if self.is_output else [UNKNOWN, *kept]
        self.index = {v: i for i, v in enumerate(self.vocab)}

    @property
    def size(self) -> int:
        """Number of ids (classes for an output; values plus the unknown bucket for an input)."""
        return len(self.vocab)

    def encode_array(self, column: pa.ChunkedArray | Sequence[Any]) -> np.ndarray:
        """Column → int64 ids [n]."""
        values = [self._as_str(v) for v in _values(column)]
        if not self.is_output:
            return np.array([self.index.get(v, 0) for v in values], dtype=np.int64)
        unseen = sorted({str(v) for v in values if v not in self.index})
        if unseen:
            shown = ", ".join(repr(u) for u in unseen[:10])
            raise DataError(
                f"output {self.config.name!r}: labels not seen in training: {shown}"
                f"{' …' if len(unseen) > 10 else ''}; known labels: {', '.join(self.vocab[:20])}"
            )
        return np.array([self.index[v] for v in values], dtype=np.int64)

    def encode(self, column: pa.ChunkedArray | Sequence[Any]) -> torch.Tensor:
        """`encode_array` as a torch tensor."""
        return _tensor(self.encode_array(column))

    def state(self) -> dict[str, Any]:
        """JSON-serializable fitted state."""
        return {"vocab": self.vocab}


def _natural_key(v: str) -> tuple[int, float, str]:
    try:
        x = float(v)
    except ValueError:
        return (1, 0.0, v)
    return (1, 0.0, v) if math.isnan(x) else (0, x, v)  # NaN compares false both ways: sort it as text


class ImageProcessor:
    """Decodes, converts and resizes images to uint8 [c, h, w]; learns mean/std for the model."""

    def __init__(self, config: ImageFeatureConfig, base_dir: str | None = None, stats: dict | None = None):
        self.config = config
        self.base_dir = base_dir
        self.stats = stats or {}

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) after preprocessing."""
        return (self.stats["channels"], *self.stats["size"])

    def _open(self, value: Any, base_dir: str | None = None) -> Image.Image:
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, bytes | bytearray):
            try:
                return Image.open(io.BytesIO(value))
            except OSError as exc:
                raise DataError(
                    f"image feature {self.config.name!r}: cannot decode image bytes: {exc}"
                ) from None
        if isinstance(value, np.ndarray):
            return Image.fromarray(value)
        if not isinstance(value, str) or not value:
            raise DataError(f"image feature {self.config.name!r}: expected a path or bytes, got {value!r}")
        path = Path(value)
        base_dir = base_dir or self.base_dir
        if not path.is_absolute() and base_dir:
            path = Path(base_dir) / path
        try:
            return Image.open(path)
        except FileNotFoundError:
            raise DataError(f"image feature {self.config.name!r}: file not found: {path}") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot decode image: {exc}") from None

    def load(self, value: Any, base_dir: str | None = None) -> np.ndarray:
        """One raw image (path, bytes, PIL image or array) → uint8 array [c, h, w].

        Relative paths resolve against `base_dir`, else the folder given at construction.
        """
        img = self._open(value, base_dir)
        mode = "L" if self.stats["channels"] == 1 else "RGB"
        img = img.convert(mode)
        h, w = self.stats["size"]
        if img.size != (w, h):
            img = img.resize((w, h), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    def fit(self, column: pa.ChunkedArray) -> None:
        """Pick size and channels (config or first image), then mean/std on up to 2,000 train images."""
        values = _values(column)
        first = self._open(values[0])
        channels = self.config.channels or (1 if first.mode in ("L", "1", "I", "I;16", "F") else 3)
        size = list(self.config.size or (first.height, first.width))
        self.stats = {"channels": channels, "size": size}
        step = max(1, len(values) // 2000)
        sample = self.encode(values[::step]).float() / 255.0  # torch: fit runs at train time only
        self.stats["mean"] = sample.mean(dim=(0, 2, 3)).tolist()
        self.stats["std"] = [max(s, 1e-3) for s in sample.std(dim=(0, 2, 3)).tolist()]

    def encode_array(
        self, column: pa.ChunkedArray | Sequence[Any], base_dir: str | None = None
    ) -> np.ndarray:
        """Column of images → uint8 array [n, c, h, w] (decoded on a few threads)."""
        values = _values(column)
        c, h, w = self.shape
        out = np.empty((len(values), c, h, w), dtype=np.uint8)
        if len(values) < 16:  # a served request: starting threads would cost more than decoding
            for i, v in enumerate(values):
                out[i] = self.load(v, base_dir)
            return out
        with ThreadPoolExecutor(max_workers=4) as pool:
            for i, arr in enumerate(pool.map(lambda v: self.load(v, base_dir), values, chunksize=64)):
                out[i] = arr
        return out

    def encode(self, column: pa.ChunkedArray | Sequence[Any], base_dir: str | None = None) -> torch.Tensor:
        """`encode_array` as a torch tensor."""
        return _tensor(self.encode_array(column, base_dir))

    def state(self) -> dict[str, Any]:
        """JSON-serializable fitted state."""
        return {"stats": self.stats}


Processor = NumberProcessor | CategoryProcessor | ImageProcessor | TextProcessor


def make_processor(config: Any, is_output: bool, base_dir: str | None = None) -> Processor:
    """An unfitted processor for a feature config."""
    if config.type == "number":
        return NumberProcessor(config)
    if config.type == "category":
        return CategoryProcessor(config, is_output)
    if config.type == "text":
        return TextProcessor(config)
    return ImageProcessor(config, base_dir)


def processor_from_state(config: Any, is_output: bool, state: dict[str, Any]) -> Processor:
    """A fitted processor rebuilt from `state()` (as stored in preprocessors.json)."""
    if config.type == "number":
        return NumberProcessor(config, state["stats"])
    if config.type == "category":
        return CategoryProcessor(config, is_output, state["vocab"])
    if config.type == "text":
        return TextProcessor(config, state)
    return ImageProcessor(config, None, state["stats"])


def encode_input_arrays(
    columns: dict[str, Any], configs: list[Any], processors: dict[str, Processor], base_dir: str | None = None
) -> dict[str, np.ndarray]:
    """Raw input columns (by feature name) → the model's input batch as numpy arrays; numbers are
    stacked as NUMBERS [n, k] float32.

    `base_dir` is the folder relative image paths resolve against (the data file's folder).
    """
    batch: dict[str, np.ndarray] = {}
    numbers = [processors[c.name].encode_array(columns[c.name]) for c in configs if c.type == "number"]
    if numbers:
        batch[NUMBERS] = np.stack(numbers, axis=1)
    for c in configs:
        proc = processors[c.name]
        if isinstance(proc, ImageProcessor):
            batch[c.name] = proc.encode_array(columns[c.name], base_dir)
        elif c.type != "number":
            batch[c.name] = proc.encode_array(columns[c.name])
    return batch


def encode_inputs(
    columns: dict[str, Any], configs: list[Any], processors: dict[str, Processor], base_dir: str | None = None
) -> dict[str, torch.Tensor]:
    """`encode_input_arrays` as torch tensors (the training and eager-predict path)."""
    return {k: _tensor(v) for k, v in encode_input_arrays(columns, configs, processors, base_dir).items()}


def sequence_pads(configs: list[Any], processors: dict[str, Processor]) -> dict[str, int]:
    """Batch key → padding id for every sequence input (what dynamic padding trims)."""
    return {
        c.name: processors[c.name].pad_id for c in configs if isinstance(processors[c.name], TextProcessor)
    }
