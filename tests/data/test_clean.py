"""Tests for largo.data.clean: each rule and its count, and the missing-column error."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from largo.config import CleanConfig
from largo.data.clean import clean_table
from largo.data.readers import DataError

OFF = dict(
    strip_whitespace=False,
    empty_as_missing=False,
    drop_missing_target=False,
    drop_missing_inputs=False,
    drop_duplicates=False,
)


def _table() -> pa.Table:
    return pa.table(
        {
            "text": [" a ", "a", "b", "  ", None, "c", "d", "d"],
            "x": [1.0, 1.0, float("nan"), 2.0, 3.0, 4.0, 5.0, 5.0],
            "label": ["p", "p", "n", "n", "p", "", "n", "n"],
        }
    ).replace_schema_metadata({b"largo.source": b"/data/f.csv"})


def test_all_rules_off_keeps_everything():
    table, counts = clean_table(_table(), inputs=["text", "x"], targets=["label"], config=CleanConfig(**OFF))
    assert table.select(["text", "label"]).equals(_table().select(["text", "label"]))
    assert np.array_equal(table.column("x").to_numpy(), _table().column("x").to_numpy(), equal_nan=True)
    assert counts == {
        "rows_read": 8,
        "missing_target": 0,
        "missing_inputs": 0,
        "duplicates": 0,
        "rows_kept": 8,
    }


def test_strip_and_empty_as_missing():
    config = CleanConfig(**{**OFF, "strip_whitespace": True, "empty_as_missing": True})
    table, _ = clean_table(_table(), inputs=["text", "x"], targets=["label"], config=config)
    assert table.column("text").to_pylist() == ["a", "a", "b", None, None, "c", "d", "d"]
    assert table.column("label").to_pylist()[5] is None
    only_strip = CleanConfig(**{**OFF, "strip_whitespace": True})
    table, _ = clean_table(_table(), inputs=["text"], targets=["label"], config=only_strip)
    assert table.column("text").to_pylist()[3] == ""


def test_drop_missing_target_counts_empty_label():
    config = CleanConfig(**{**OFF, "empty_as_missing": True, "drop_missing_target": True})
    table, counts = clean_table(_table(), inputs=["text", "x"], targets=["label"], config=config)
    assert counts["missing_target"] == 1
    assert counts["rows_kept"] == 7
    assert "c" not in table.column("text").to_pylist()


def test_drop_missing_inputs_counts_null_and_nan_once_per_row():
    config = CleanConfig(**{**OFF, "strip_whitespace": True, "empty_as_missing": True,
                            "drop_missing_target": True, "drop_missing_inputs": True})  # fmt: skip
    table, counts = clean_table(_table(), inputs=["text", "x"], targets=["label"], config=config)
    # row 5 goes to missing_target; rows 2 (NaN), 3 ("  " -> null) and 4 (None) to missing_inputs
    assert counts == {
        "rows_read": 8,
        "missing_target": 1,
        "missing_inputs": 3,
        "duplicates": 0,
        "rows_kept": 4,
    }
    assert table.column("text").to_pylist() == ["a", "a", "d", "d"]
    assert not any(math.isnan(v) for v in table.column("x").to_pylist())
    assert table.schema.metadata[b"largo.source"] == b"/data/f.csv"


def test_drop_duplicates_keeps_first_and_sees_stripped_values():
    config = CleanConfig(**{**OFF, "strip_whitespace": True, "drop_duplicates": True})
    table, counts = clean_table(_table(), inputs=["text", "x"], targets=["label"], config=config)
    # " a " strips to "a" so rows 0 and 1 match; rows 6 and 7 are identical
    assert counts["duplicates"] == 2
    assert counts["rows_kept"] == 6
    assert table.column("text").to_pylist() == ["a", "b", "", None, "c", "d"]
    assert table.column_names == ["text", "x", "label"]


def test_drop_duplicates_with_nested_values():
    table = pa.table({"tags": [[1, 2], [1, 2], [3]], "y": [1, 1, 1]})
    config = CleanConfig(**{**OFF, "drop_duplicates": True})
    out, counts = clean_table(table, inputs=["tags"], targets=["y"], config=config)
    assert counts["duplicates"] == 1
    assert out.column("tags").to_pylist() == [[1, 2], [3]]


def test_missing_column_names_it_and_lists_present():
    with pytest.raises(DataError) as info:
        clean_table(_table(), inputs=["text"], targets=["Label"], config=CleanConfig())
    message = str(info.value)
    assert message.startswith("/data/f.csv: column 'Label'")
    assert "did you mean 'label'" in message
    assert "columns present: text, x, label" in message
