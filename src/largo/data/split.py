"""Train / valid / test split of row indices: seeded, optionally stratified, every row in exactly one split.

Two stages with scikit-learn's `train_test_split`: carve the test rows from all rows, then the valid rows
from the rest. Classes too rare to stratify go to train; when stratifying is still impossible the split
falls back to a plain seeded shuffle. `split_tables` applies it to a run's files (or takes the valid and
test files given).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
from sklearn.model_selection import train_test_split

from largo.config import DataConfig
from largo.data.readers import DataError


def split_indices(
    n: int, *, valid: float, test: float, seed: int, stratify: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Split `range(n)` into sorted int64 index arrays "train", "valid" and "test".

    Args:
        n: number of rows.
        valid: fraction of all rows for validation (0.0 gives an empty array).
        test: fraction of all rows for the final test (0.0 gives an empty array).
        seed: the same seed gives the same split.
        stratify: one label per row to keep class proportions equal across splits, or None.

    Returns:
        {"train": ..., "valid": ..., "test": ...}; together they hold every index once.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not (0.0 <= valid < 1.0 and 0.0 <= test < 1.0 and valid + test < 1.0):
        raise ValueError(f"valid and test must be in [0, 1) with valid + test < 1, got {valid} and {test}")
    codes = None
    if stratify is not None:
        labels = np.asarray(stratify)
        if labels.shape != (n,):
            raise ValueError(f"stratify must hold one label per row: shape {labels.shape}, expected ({n},)")
        # strings compare for any label type (None and NaN included), so np.unique never fails
        codes = np.unique(labels.astype(str), return_inverse=True)[1].reshape(-1)
    rest, test_idx = _carve(np.arange(n, dtype=np.int64), math.ceil(test * n), seed, codes)
    n_valid = math.ceil(valid / (1.0 - test) * len(rest)) if valid > 0 else 0
    train_idx, valid_idx = _carve(rest, n_valid, seed, codes)
    return {"train": np.sort(train_idx), "valid": np.sort(valid_idx), "test": np.sort(test_idx)}


def take_split(table: pa.Table, indices: np.ndarray) -> pa.Table:
    """The rows of `table` at `indices`, schema metadata kept."""
    return table.take(pa.array(np.asarray(indices, dtype=np.int64))).replace_schema_metadata(
        table.schema.metadata
    )


def _carve(idx: np.ndarray, size: int, seed: int, codes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Split `idx` into (rest, part) with `size` rows in part; at least one row stays in rest."""
    size = min(size, len(idx) - 1)
    if size <= 0:
        return idx, idx[:0]
    if codes is not None:
        labels = codes[idx]
        counts = np.bincount(labels)
        rare = counts[labels] < 2  # a class with one row cannot be in both parts
        common = idx[~rare]
        if 0 < size < len(common):
            try:
                rest, part = train_test_split(
                    common, test_size=size, random_state=seed, stratify=labels[~rare]
                )
                return np.concatenate([rest, idx[rare]]), part
            except ValueError:
                pass  # e.g. fewer rows in a part than classes: stratifying is impossible
    rest, part = train_test_split(idx, test_size=size, random_state=seed, shuffle=True)
    return rest, part


def split_tables(
    data: DataConfig,
    read: Callable[[str], tuple[pa.Table, dict[str, int]]],
    stratify: str | None = None,
) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Read and split a run's data: {'train', 'valid', 'test'} tables and the cleaning counts per file.

    `read(path)` reads and cleans one file. `data.valid` / `data.test` are fractions carved out of the
    train file (stratified on the column `stratify` when given) or paths of their own files.
    """
    train, counts = read(data.train)
    cleaning: dict[str, Any] = {"train": counts}
    tables: dict[str, pa.Table] = {}
    for split in ("valid", "test"):
        value = getattr(data, split)
        if isinstance(value, str):
            tables[split], cleaning[split] = read(value)
    labels = None
    if stratify is not None:
        labels = np.array([str(v) for v in train.column(stratify).to_pylist()])
    valid, test = (v if isinstance(v, float) else 0.0 for v in (data.valid, data.test))
    idx = split_indices(train.num_rows, valid=valid, test=test, seed=data.split_seed, stratify=labels)
    for split in ("train", "valid", "test"):
        if split == "train" or split not in tables:
            tables[split] = take_split(train, idx[split])
    if tables["train"].num_rows == 0:
        raise DataError(f"{data.train}: no rows left for training after cleaning and splitting")
    return tables, cleaning
