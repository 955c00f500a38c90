"""Tests for largo.data.split: sizes, completeness, determinism, stratification and rare classes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from largo.data.split import split_indices, take_split


def _check_partition(splits: dict[str, np.ndarray], n: int) -> None:
    joined = np.concatenate([splits["train"], splits["valid"], splits["test"]])
    assert np.array_equal(np.sort(joined), np.arange(n))  # disjoint and complete
    for part in splits.values():
        assert part.dtype == np.int64
        assert np.array_equal(part, np.sort(part))


def test_fractions_and_partition():
    splits = split_indices(1000, valid=0.1, test=0.2, seed=0)
    _check_partition(splits, 1000)
    assert len(splits["test"]) == 200
    assert len(splits["valid"]) == 100
    assert len(splits["train"]) == 700


def test_zero_fractions_give_empty_splits():
    splits = split_indices(10, valid=0.0, test=0.0, seed=0)
    assert splits["train"].tolist() == list(range(10))
    assert len(splits["valid"]) == 0 and len(splits["test"]) == 0
    assert splits["valid"].dtype == np.int64
    only_test = split_indices(10, valid=0.0, test=0.3, seed=0)
    assert (len(only_test["train"]), len(only_test["valid"]), len(only_test["test"])) == (7, 0, 3)


def test_deterministic_per_seed():
    a = split_indices(200, valid=0.1, test=0.1, seed=7)
    b = split_indices(200, valid=0.1, test=0.1, seed=7)
    c = split_indices(200, valid=0.1, test=0.1, seed=8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])


def test_stratified_proportions():
    labels = np.array(["a"] * 400 + ["b"] * 160 + ["c"] * 40)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    splits = split_indices(len(labels), valid=0.1, test=0.2, seed=3, stratify=labels)
    _check_partition(splits, len(labels))
    for name, fraction in [("train", 0.7), ("valid", 0.1), ("test", 0.2)]:
        part = labels[splits[name]]
        for cls, total in [("a", 400), ("b", 160), ("c", 40)]:
            assert abs(np.sum(part == cls) - fraction * total) <= 1, (name, cls)


def test_unstratified_split_can_unbalance_classes():
    # the stratified test above would not pass by chance: without stratify the rare class drifts
    labels = np.array(["a"] * 400 + ["b"] * 160 + ["c"] * 40)
    drift = 0
    for seed in range(5):
        test = labels[split_indices(len(labels), valid=0.1, test=0.2, seed=seed)["test"]]
        drift = max(drift, abs(np.sum(test == "c") - 8))
    assert drift > 1


def test_rare_classes_go_to_train_and_the_rest_stays_stratified():
    labels = np.array(["a"] * 30 + ["b"] * 30 + ["solo"] + [None])
    for seed in range(5):
        splits = split_indices(len(labels), valid=0.1, test=0.2, seed=seed, stratify=labels)
        _check_partition(splits, len(labels))
        assert 60 in splits["train"] and 61 in splits["train"]
        for name, fraction in [("valid", 0.1), ("test", 0.2)]:
            part = labels[splits[name]]
            assert abs(np.sum(part == "a") - fraction * 30) <= 1, (seed, name)
            assert abs(np.sum(part == "b") - fraction * 30) <= 1, (seed, name)


def test_impossible_stratification_falls_back():
    labels = np.arange(20) % 10  # 10 classes of 2 rows: 2 test rows cannot cover 10 classes
    splits = split_indices(20, valid=0.1, test=0.1, seed=0, stratify=labels)
    _check_partition(splits, 20)
    assert len(splits["test"]) == 2 and len(splits["valid"]) == 2


def test_tiny_and_bad_inputs():
    _check_partition(split_indices(1, valid=0.1, test=0.1, seed=0), 1)
    _check_partition(split_indices(0, valid=0.1, test=0.1, seed=0), 0)
    with pytest.raises(ValueError):
        split_indices(10, valid=0.6, test=0.5, seed=0)
    with pytest.raises(ValueError):
        split_indices(10, valid=0.1, test=0.1, seed=0, stratify=np.zeros(9))


def test_take_split_keeps_metadata():
    table = pa.table({"x": [10, 11, 12, 13]}).replace_schema_metadata({b"largo.source": b"/f.csv"})
    part = take_split(table, np.array([3, 1]))
    assert part.column("x").to_pylist() == [13, 11]
    assert part.schema.metadata == {b"largo.source": b"/f.csv"}
