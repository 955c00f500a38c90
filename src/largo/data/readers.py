"""Read a data file (csv, tsv, jsonl, parquet) or a folder of images by class into a `pyarrow.Table`.

Text files are UTF-8 (with or without a BOM) or GBK/GB18030, detected without loading the whole file.
Nothing is dropped silently: a malformed row or line is a `DataError` naming the file and the 1-based
physical line. Every returned table carries its absolute source path in the schema metadata under
`largo.source`, so later stages can resolve relative image paths against the file's folder.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

SOURCE_KEY = b"largo.source"
FORMATS = ("auto", "csv", "tsv", "jsonl", "parquet", "images")
SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_CHUNK_BYTES = 4 << 20
_ENCODING_ALIASES = {"utf8": "utf-8", "gbk": "gb18030", "gb2312": "gb18030", "cp936": "gb18030"}


class DataError(ValueError):
    """A problem with the user's data; `str()` reads `path:line: reason` (parts omitted when unknown)."""

    def __init__(self, reason: str, *, path: str | os.PathLike[str] | None = None, line: int | None = None):
        self.reason = reason
        self.path = None if path is None else str(path)
        self.line = line
        where = self.path or ""
        if line is not None:
            where = f"{where}:{line}" if where else f"line {line}"
        super().__init__(f"{where}: {reason}" if where else reason)


def table_source(table: pa.Table) -> str | None:
    """The absolute path a table was read from (`largo.source` metadata), or None."""
    value = (table.schema.metadata or {}).get(SOURCE_KEY)
    return None if value is None else value.decode("utf-8")


def source_dir(table: pa.Table) -> str | None:
    """The folder that relative paths in a table (image columns) resolve against: the file's folder,
    or the image folder itself."""
    source = table_source(table)
    if source is None:
        return None
    return source if Path(source).is_dir() else str(Path(source).parent)


def with_source(table: pa.Table, path: str | os.PathLike[str]) -> pa.Table:
    """The table with `largo.source` set to the absolute form of `path`, other metadata kept."""
    metadata = dict(table.schema.metadata or {})
    metadata[SOURCE_KEY] = os.path.abspath(path).encode("utf-8")
    return table.replace_schema_metadata(metadata)


# ----------------------------------------------------------------------------------------- encoding


def detect_encoding(path: str | os.PathLike[str]) -> str:
    """Return "utf-8-sig", "utf-8" or "gb18030" for a text file, reading it in chunks.

    Raises DataError naming the first line that is not UTF-8 when the file is neither UTF-8 nor GB18030.
    """
    with open(path, "rb") as f:
        head = f.read(len(codecs.BOM_UTF8))
    if head == codecs.BOM_UTF8:
        return "utf-8-sig"
    if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        raise DataError("UTF-16 text is not supported; save the file as UTF-8", path=path)
    bad_line = _first_undecodable_line(path, "utf-8")
    if bad_line is None:
        return "utf-8"
    if _first_undecodable_line(path, "gb18030") is None:
        return "gb18030"
    raise DataError(
        "not UTF-8 (first bad byte on this line) and not GBK/GB18030 either; save the file as UTF-8",
        path=path,
        line=bad_line,
    )


def _first_undecodable_line(path: str | os.PathLike[str], encoding: str) -> int | None:
    """1-based line of the first byte that does not decode, or None when the whole file decodes."""
    decoder = codecs.getincrementaldecoder(encoding)()
    newlines = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK_BYTES)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                # exc.object may start with a few bytes buffered from the last chunk; they hold no newline
                return newlines + exc.object[: exc.start].count(b"\n") + 1
            if not chunk:
                return None
            newlines += chunk.count(b"\n")


def _resolve_encoding(path: Path, encoding: str) -> str:
    if encoding == "auto":
        return detect_encoding(path)
    name = _ENCODING_ALIASES.get(encoding.lower(), encoding.lower())
    try:
        codecs.lookup(name)
    except LookupError:
        raise DataError(
            f"unknown encoding {encoding!r}; use auto, utf-8, utf-8-sig, gbk or gb18030", path=path
        ) from None
    return name


# -------------------------------------------------------------------------------------------- entry


def read_table(
    path: str | os.PathLike[str],
    *,
    format: str = "auto",
    encoding: str = "auto",
    text_columns: tuple[str, ...] = (),
) -> pa.Table:
    """Read csv, tsv, jsonl, parquet or an image folder into a table tagged with its source path.

    Args:
        path: a file, or a folder with one sub-folder of images per class.
        format: auto (from the suffix; a folder is images), csv, tsv, jsonl, parquet or images.
        encoding: auto (UTF-8 with or without BOM, else GBK/GB18030), utf-8, utf-8-sig, gbk or gb18030.
        text_columns: columns read as strings whatever they look like: a csv/tsv cell "007" stays
            "007" (not the number 7); numbers in a jsonl or parquet column become their text.

    Returns:
        The table; columns whose values are all null are strings.

    Raises:
        DataError: a missing or unsupported file, or malformed content (with its line number).
    """
    source = Path(path)
    if not source.exists():
        raise DataError("file not found", path=path)
    fmt = _resolve_format(source, format)
    if fmt == "images":
        table = read_image_folder(source)
    elif source.is_dir():
        raise DataError(f"is a folder, but format {fmt!r} needs a file", path=path)
    elif fmt == "parquet":
        table = _read_parquet(source)
    elif fmt == "jsonl":
        table = _read_jsonl(source, _resolve_encoding(source, encoding))
    else:
        delimiter = "," if fmt == "csv" else "\t"
        table = _read_delimited(source, _resolve_encoding(source, encoding), delimiter, text_columns)
    for name in text_columns:  # numbers and booleans as their text (lists, objects: check_text_column)
        kind = table.schema.field(name).type if name in table.column_names else pa.string()
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            i = table.column_names.index(name)
            table = table.set_column(i, pa.field(name, pa.string()), table.column(i).cast(pa.string()))
    return with_source(_nulls_as_strings(table), source)


def _resolve_format(path: Path, format: str) -> str:
    if format not in FORMATS:
        raise DataError(f"unknown format {format!r}; allowed: {', '.join(FORMATS)}", path=path)
    if format != "auto":
        return format
    if path.is_dir():
        return "images"
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        supported = ", ".join(SUFFIX_FORMATS)
        raise DataError(
            f"unsupported file suffix {path.suffix!r}; supported: {supported} or a folder of images by class",
            path=path,
        )
    return fmt


def _nulls_as_strings(table: pa.Table) -> pa.Table:
    """Columns with no values at all get the string type, so later stages never see type null."""
    for i, field in enumerate(table.schema):
        if pa.types.is_null(field.type):
            table = table.set_column(i, field.with_type(pa.string()), table.column(i).cast(pa.string()))
    return table


# ------------------------------------------------------------------------------------------ csv/tsv


def _read_delimited(path: Path, encoding: str, delimiter: str, text_columns: tuple[str, ...]) -> pa.Table:
    invalid: list[pa_csv.InvalidRow] = []

    def on_invalid(row: pa_csv.InvalidRow) -> str:
        invalid.append(row)
        return "skip"  # collected and reported below: no row is dropped silently

    # pyarrow's own UTF-8 path is fast and skips a BOM; other encodings go through a Python transcoder
    arrow_encoding = "utf8" if encoding in ("utf-8", "utf-8-sig") else encoding
    read_options = pa_csv.ReadOptions(encoding=arrow_encoding)
    parse_options = pa_csv.ParseOptions(
        delimiter=delimiter, newlines_in_values=True, invalid_row_handler=on_invalid
    )
    convert_options = pa_csv.ConvertOptions(column_types=dict.fromkeys(text_columns, pa.string()))
    try:
        table = pa_csv.read_csv(
            path, read_options=read_options, parse_options=parse_options, convert_options=convert_options
        )
    except (pa.ArrowException, UnicodeDecodeError) as exc:
        if "Empty CSV file" in str(exc):
            raise DataError("empty file: no header row", path=path) from None
        raise DataError(f"cannot read as {encoding} delimited text: {exc}", path=path) from None
    if invalid:
        raise _invalid_row_error(path, encoding, delimiter, invalid)
    names = table.column_names
    if names and names[0].startswith("\ufeff"):
        table = table.rename_columns([names[0].lstrip("\ufeff"), *names[1:]])
    repeated = sorted({n for n in table.column_names if table.column_names.count(n) > 1})
    if repeated:
        raise DataError(f"repeated column names in the header: {', '.join(repeated)}", path=path, line=1)
    return table


def _invalid_row_error(
    path: Path, encoding: str, delimiter: str, invalid: list[pa_csv.InvalidRow]
) -> DataError:
    """Name the physical line of the first bad row; pyarrow only knows record numbers (None with threads)."""
    expected = invalid[0].expected_columns
    more = f" ({len(invalid)} bad rows in all)" if len(invalid) > 1 else ""
    line, fields = _locate_bad_row(path, encoding, delimiter, expected)
    if line is None or fields is None:
        row = min(invalid, key=lambda r: r.number if r.number is not None else float("inf"))
        where = f"record {row.number}" if row.number is not None else "a row"
        reason = f"{where} has {row.actual_columns} fields, expected {expected} as in the header{more}"
        return DataError(f"{reason}: {row.text[:80]!r}", path=path)
    text = delimiter.join(fields)[:80]
    reason = f"row has {len(fields)} fields, expected {expected} as in the header{more}: {text!r}"
    return DataError(reason, path=path, line=line)


def _locate_bad_row(
    path: Path, encoding: str, delimiter: str, expected: int
) -> tuple[int | None, list[str] | None]:
    """The start line and fields of the first record whose field count differs from `expected`."""
    try:
        with open(path, encoding=encoding, newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            end, header_seen = 0, False
            for record in reader:
                start, end = end + 1, reader.line_num
                if not record:  # blank line, skipped by pyarrow too
                    continue
                if header_seen and len(record) != expected:
                    return start, record
                header_seen = True
    except (csv.Error, UnicodeDecodeError):
        pass
    return None, None


# -------------------------------------------------------------------------------------------- jsonl


def _read_jsonl(path: Path, encoding: str) -> pa.Table:
    if encoding in ("utf-8", "utf-8-sig"):  # pyarrow reads only UTF-8 (a BOM is fine)
        try:
            table = pa_json.read_json(path)
        except pa.ArrowException:
            table = None
        # pyarrow takes a `null` line as a row of nulls; only such rows need the strict Python check
        if table is not None and table.num_columns and not _has_all_null_row(table):
            return table
    records = _parse_json_lines(path, encoding)
    if not records:
        raise DataError("no JSON records: the file is empty", path=path)
    return _table_from_records(records, path)


def _has_all_null_row(table: pa.Table) -> bool:
    mask = pc.is_null(table.column(0))
    for column in table.columns[1:]:
        mask = pc.and_(mask, pc.is_null(column))
    return bool(pc.any(mask).as_py())


def _parse_json_lines(path: Path, encoding: str) -> list[dict[str, Any]]:
    """Parse one JSON object per line (blank lines skipped), failing on the first bad line."""
    records = []
    with open(path, encoding=encoding) as f:
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line, object_pairs_hook=_object_with_unique_keys)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"not valid JSON: {exc.msg} (column {exc.colno}){_array_hint(line)}",
                        path=path,
                        line=number,
                    ) from None
                except ValueError as exc:
                    raise DataError(f"not valid JSON: {exc}", path=path, line=number) from None
                if not isinstance(value, dict):
                    raise DataError(
                        f"expected a JSON object per line, got {_json_kind(value)}{_array_hint(line)}",
                        path=path,
                        line=number,
                    )
                records.append(value)
        except UnicodeDecodeError as exc:
            line_number = _first_undecodable_line(path, encoding)
            raise DataError(f"not {encoding} text: {exc.reason}", path=path, line=line_number) from None
    return records


def _object_with_unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {repeated!r} appears twice in one object")
    return obj


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _array_hint(line: str) -> str:
    if line.lstrip().startswith("["):
        return "; a JSON array is not JSON Lines: write one object per line"
    return ""


def _table_from_records(records: list[dict[str, Any]], path: Path) -> pa.Table:
    """Build a table from dicts; a column whose values pyarrow cannot unify becomes strings."""
    names = list(dict.fromkeys(key for record in records for key in record))
    if not names:
        raise DataError("the JSON records have no fields", path=path)
    columns = {}
    for name in names:
        values = [record.get(name) for record in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowException, TypeError, OverflowError):
            columns[name] = pa.array([_as_text(v) for v in values], pa.string())
    return pa.table(columns)


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


# ------------------------------------------------------------------------------------------ parquet


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read as Parquet: {exc}", path=path) from None


# ------------------------------------------------------------------------------------------- images


def read_image_folder(path: str | os.PathLike[str]) -> pa.Table:
    """One sub-folder per class → columns `image` (absolute path) and `label` (the sub-folder name).

    Rows are sorted by (label, path inside the class folder). Images in nested folders of a class count;
    hidden files and folders and files without an image suffix are ignored.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError("not a folder; an image dataset is a folder with one sub-folder per class", path=path)
    classes = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_name)
    if not classes:
        loose = sum(1 for p in root.iterdir() if p.is_file() and _is_image(p))
        hint = f"; it holds {loose} images directly: move them into one sub-folder per class" if loose else ""
        raise DataError(f"no class sub-folders (one sub-folder of images per class){hint}", path=path)
    images: list[str] = []
    labels: list[str] = []
    for folder in classes:
        files = [
            f.relative_to(folder).as_posix()
            for f in folder.rglob("*")
            if _is_image(f) and not any(part.startswith(".") for part in f.relative_to(folder).parts)
        ]
        for name in sorted(files):
            images.append(os.path.abspath(folder / name))
            labels.append(folder.name)
    if not images:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"no images ({suffixes}) in the class sub-folders", path=path)
    table = pa.table({"image": pa.array(images, pa.string()), "label": pa.array(labels, pa.string())})
    return with_source(table, root)


def _name(path: Path) -> str:
    return path.name


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
