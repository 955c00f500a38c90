"""Guess feature types from a table, so `largo train data.csv --target label` needs no config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from largo.data.readers import source_dir

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_CATEGORY_UNIQUE = 1000  # more distinct strings than this looks like free text or an id


@dataclass
class Inferred:
    """Inferred input and output feature dicts, and why any column was left out."""

    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _is_image_column(col: pa.ChunkedArray) -> bool:
    values = pc.drop_null(col).to_pylist()[:200]
    if not values:
        return False
    hits = sum(1 for v in values if isinstance(v, str) and v.lower().endswith(IMAGE_SUFFIXES))
    return hits >= 0.9 * len(values)


def _default_augment(table: pa.Table, col: pa.ChunkedArray) -> dict[str, Any]:
    """Random shifts of about 1/14 of the image side (1 px at 8x8, 2 px at 28x28), from the first image.

    Flips are left off: they are wrong for digits, text and anything with a handedness.
    """
    first = pc.drop_null(col)[0].as_py()
    path = Path(first)
    base = source_dir(table)
    if not path.is_absolute() and base:
        path = Path(base) / path
    try:
        with Image.open(path) as img:
            side = min(img.size)
    except OSError:
        return {}
    return {"crop": max(1, round(side / 14))}


def infer_target_type(col: pa.ChunkedArray) -> str:
    """'category' for strings, booleans and integers with few values; 'number' otherwise."""
    t = col.type
    if pa.types.is_floating(t):
        values = pc.drop_null(col)
        all_int = len(values) > 0 and pc.all(pc.equal(values, pc.round(values))).as_py()
        return "category" if all_int and pc.count_distinct(values).as_py() <= 20 else "number"
    if pa.types.is_integer(t):
        return "category" if pc.count_distinct(col).as_py() <= 20 else "number"
    return "category"


def infer_features(table: pa.Table, targets: list[str]) -> Inferred:
    """Infer one feature per column: number, category or image; targets become outputs."""
    result = Inferred()
    for name in targets:
        if name not in table.column_names:
            raise ValueError(f"--target {name!r} is not a column; columns: {', '.join(table.column_names)}")
        result.outputs.append({"name": name, "type": infer_target_type(table.column(name))})
    n = max(1, table.num_rows)
    for name in table.column_names:
        if name in targets:
            continue
        col = table.column(name)
        t = col.type
        if col.null_count == len(col):
            result.skipped[name] = "every value is missing"
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            result.inputs.append({"name": name, "type": "number"})
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            if _is_image_column(col):
                result.inputs.append({"name": name, "type": "image", "augment": _default_augment(table, col)})
                continue
            unique = pc.count_distinct(col).as_py()
            if unique > MAX_CATEGORY_UNIQUE or (unique > 50 and unique > 0.5 * n):
                result.skipped[name] = f"{unique} distinct values in {n} rows: an id or free text"
            else:
                result.inputs.append({"name": name, "type": "category"})
        else:
            result.skipped[name] = f"unsupported column type {t}"
    return result


def default_config(data: str, inferred: Inferred, name: str) -> dict[str, Any]:
    """A sensible starting config for the inferred features (a CNN for images, an MLP otherwise)."""
    has_image = any(f["type"] == "image" for f in inferred.inputs)
    return {
        "name": name,
        "data": {"train": data, "valid": 0.1, "test": 0.1},
        "inputs": inferred.inputs,
        "outputs": inferred.outputs,
        "model": {"hidden": [128] if has_image else [128, 64], "dropout": 0.2 if has_image else 0.1},
        "train": {
            "epochs": 30 if has_image else 50,
            "batch_size": 64,
            "optimizer": {"name": "adamw", "lr": 2e-3 if has_image else 1e-3, "weight_decay": 0.01},
            "schedule": {"name": "cosine", "warmup": 0.05},
            "early_stopping": {"metric": "valid.loss", "patience": 8},
        },
    }
