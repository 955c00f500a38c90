"""Row-level cleaning before the split: trim strings, treat empty as missing, drop bad rows, count each.

Pure and vectorized with `pyarrow.compute`; the counts go into the run's report so no row disappears
without a trace.
"""

from __future__ import annotations

import difflib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from largo.config import CleanConfig
from largo.data.readers import DataError, table_source

_ROW_INDEX = "__largo_row_index__"


def clean_table(
    table: pa.Table, *, inputs: list[str], targets: list[str], config: CleanConfig
) -> tuple[pa.Table, dict[str, int]]:
    """Apply the cleaning rules in order and count the rows each rule dropped.

    Args:
        table: the data as read; its columns and schema metadata are kept.
        inputs: input column names.
        targets: target column names.
        config: which rules are on.

    Returns:
        The cleaned table and `{"rows_read", "missing_target", "missing_inputs", "duplicates", "rows_kept"}`;
        a rule that is off counts 0. A row is counted under the first rule that drops it.

    Raises:
        DataError: an input or target column is not in the table.
    """
    _check_columns(table, [*inputs, *targets])
    metadata = table.schema.metadata
    counts = {"rows_read": table.num_rows, "missing_target": 0, "missing_inputs": 0, "duplicates": 0}
    table = _normalize_strings(table, strip=config.strip_whitespace, empty_as_null=config.empty_as_missing)

    drop = pa.array(np.zeros(table.num_rows, dtype=bool))
    if config.drop_missing_target and targets:
        missing = _any_missing(table, targets)
        counts["missing_target"] = _count(missing)
        drop = pc.or_(drop, missing)
    if config.drop_missing_inputs and inputs:
        missing = pc.and_not(_any_missing(table, inputs), drop)  # only rows not dropped already
        counts["missing_inputs"] = _count(missing)
        drop = pc.or_(drop, missing)
    table = table.filter(pc.invert(drop))

    if config.drop_duplicates:
        before = table.num_rows
        table = table.take(_first_occurrences(table, list(dict.fromkeys([*inputs, *targets]))))
        counts["duplicates"] = before - table.num_rows
    counts["rows_kept"] = table.num_rows
    return table.replace_schema_metadata(metadata), counts


def _check_columns(table: pa.Table, wanted: list[str]) -> None:
    present = table.column_names
    missing = [name for name in dict.fromkeys(wanted) if name not in present]
    if not missing:
        return
    hints = []
    for name in missing:
        close = difflib.get_close_matches(name, present, n=1)
        hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    plural = "s" if len(missing) > 1 else ""
    raise DataError(
        f"column{plural} {', '.join(hints)} not found; columns present: {', '.join(present)}",
        path=table_source(table),
    )


def _normalize_strings(table: pa.Table, *, strip: bool, empty_as_null: bool) -> pa.Table:
    for i, field in enumerate(table.schema):
        if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            continue
        column = table.column(i)
        if strip:
            column = pc.utf8_trim_whitespace(column)
        if empty_as_null:
            column = pc.if_else(pc.equal(column, ""), pa.scalar(None, field.type), column)
        table = table.set_column(i, field, column)
    return table


def _any_missing(table: pa.Table, columns: list[str]) -> pa.ChunkedArray:
    """True where any of the columns is null, or NaN for float columns."""
    mask = pc.is_null(table.column(columns[0]), nan_is_null=True)
    for name in columns[1:]:
        mask = pc.or_(mask, pc.is_null(table.column(name), nan_is_null=True))
    return mask


def _count(mask: pa.ChunkedArray | pa.Array) -> int:
    return int(pc.sum(mask).as_py() or 0)


def _first_occurrences(table: pa.Table, columns: list[str]) -> np.ndarray:
    """Sorted row indices of the first row of each distinct combination of values in `columns`."""
    keyed = table.select(columns).append_column(_ROW_INDEX, pa.array(np.arange(table.num_rows)))
    try:
        grouped = keyed.group_by(columns, use_threads=False).aggregate([(_ROW_INDEX, "min")])
        return np.sort(grouped.column(f"{_ROW_INDEX}_min").to_numpy())
    except pa.ArrowNotImplementedError:
        # group_by has no kernel for nested keys (lists, structs from JSON); compare their reprs instead
        seen: set[str] = set()
        first = []
        for i, row in enumerate(zip(*(table.column(name).to_pylist() for name in columns), strict=True)):
            key = repr(row)
            if key not in seen:
                seen.add(key)
                first.append(i)
        return np.asarray(first, dtype=np.int64)
