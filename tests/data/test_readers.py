"""Tests for largo.data.readers: every format, encodings, exact error locations, image folders."""

from __future__ import annotations

import os
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from largo.data.readers import DataError, detect_encoding, read_image_folder, read_table, table_source

CITIES = "city,count,note\n北京,1,首都\n上海,2,港口\n"


def test_csv_round_trip_types_and_source(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b,c,empty\n1,x,1.5,\n2,y,2.5,\n", encoding="utf-8")
    table = read_table(path)
    assert table.to_pydict() == {"a": [1, 2], "b": ["x", "y"], "c": [1.5, 2.5], "empty": [None, None]}
    assert table.schema.field("a").type == pa.int64()
    assert table.schema.field("empty").type == pa.string()  # all-null column is kept as strings
    assert table_source(table) == os.path.abspath(path)
    assert detect_encoding(path) == "utf-8"


def test_tsv_round_trip_and_quoted_newline(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text('text\tlabel\n"two\nlines"\tpos\nplain, with comma\tneg\n', encoding="utf-8")
    table = read_table(path)
    assert table.to_pydict() == {"text": ["two\nlines", "plain, with comma"], "label": ["pos", "neg"]}
    with pytest.raises(DataError) as info:  # an explicit format wins over the suffix
        read_table(path, format="csv")
    assert info.value.line == 4  # the comma splits line 4; lines 2-3 are one quoted record


def test_jsonl_round_trip_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "你好", "n": 1}\n\n{"text": "b", "n": 2, "extra": true}\n', encoding="utf-8")
    table = read_table(path)
    assert table.column("text").to_pylist() == ["你好", "b"]
    assert table.column("n").to_pylist() == [1, 2]
    assert table.column("extra").to_pylist() == [None, True]


def test_parquet_round_trip_keeps_metadata(tmp_path):
    path = tmp_path / "d.parquet"
    original = pa.table({"x": [1.0, 2.0], "y": ["a", "b"]}).replace_schema_metadata({b"mine": b"1"})
    pq.write_table(original, path)
    table = read_table(path)
    assert table.to_pydict() == original.to_pydict()
    assert table.schema.metadata[b"mine"] == b"1"
    assert table_source(table) == os.path.abspath(path)


def test_corrupt_parquet_names_the_file(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="bad.parquet"):
        read_table(path)


def test_gbk_csv_reads_chinese(tmp_path):
    path = tmp_path / "gbk.csv"
    path.write_bytes(CITIES.encode("gbk"))
    assert detect_encoding(path) == "gb18030"
    table = read_table(path)
    assert table.column("city").to_pylist() == ["北京", "上海"]
    assert table.column("note").to_pylist() == ["首都", "港口"]
    assert read_table(path, encoding="gbk").equals(table)


def test_utf8_bom_csv_has_clean_header(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(CITIES.encode("utf-8-sig"))
    assert detect_encoding(path) == "utf-8-sig"
    table = read_table(path)
    assert table.column_names == ["city", "count", "note"]
    assert table.column("city").to_pylist() == ["北京", "上海"]


def test_undecodable_file_names_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"a\nok\nstill ok\n\xff\xff\n")  # 0xFF is neither UTF-8 nor GB18030
    with pytest.raises(DataError) as info:
        detect_encoding(path)
    assert info.value.line == 4
    assert str(info.value).startswith(f"{path}:4: ")


def test_detect_encoding_across_chunk_boundary(tmp_path, monkeypatch):
    import largo.data.readers as readers

    monkeypatch.setattr(readers, "_CHUNK_BYTES", 5)  # split multi-byte characters across chunks
    path = tmp_path / "u.csv"
    path.write_bytes("中文字\n北京上海\n".encode() + b"x\n\xc3(\n")
    with pytest.raises(DataError) as info:
        readers.detect_encoding(path)
    assert info.value.line == 4
    path.write_bytes("中文字\n北京上海\n".encode())
    assert readers.detect_encoding(path) == "utf-8"


def test_malformed_csv_row_names_file_and_physical_line(tmp_path):
    path = tmp_path / "rows.csv"
    # line 1 header, lines 2-3 one quoted record with a newline, line 4 the bad row, line 6 another one
    path.write_text('a,b,c\n"x\ny",2,3\n4,5\n6,7,8\n9\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_table(path)
    err = info.value
    assert (err.path, err.line) == (str(path), 4)
    assert str(err).startswith(f"{path}:4: ")
    assert "2 fields, expected 3" in str(err)
    assert "2 bad rows" in str(err)


def test_malformed_gbk_row_line(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes("city,n\n北京,1\n上海\n".encode("gbk"))
    with pytest.raises(DataError) as info:
        read_table(path)
    assert info.value.line == 3


def test_empty_csv_is_an_error(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_table(path)


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n{"a": 3}\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_table(path)
    assert info.value.line == 3
    assert str(info.value).startswith(f"{path}:3: not valid JSON")


@pytest.mark.parametrize("line, kind", [("[1, 2]", "array"), ("null", "null"), ("7", "number")])
def test_jsonl_line_that_is_not_an_object(tmp_path, line, kind):
    path = tmp_path / "d.jsonl"
    path.write_text(f'{{"a": 1}}\n{line}\n', encoding="utf-8")
    with pytest.raises(DataError, match=kind) as info:
        read_table(path)
    assert info.value.line == 2


def test_jsonl_duplicate_key_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1, "a": 2}\n', encoding="utf-8")
    with pytest.raises(DataError, match="twice"):
        read_table(path)


def test_jsonl_mixed_types_fall_back_to_strings(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": 1, "v": 1}\n{"id": 2, "v": "x"}\n{"id": 3, "v": null, "w": 2.5}\n')
    table = read_table(path)
    assert table.column("v").type == pa.string()
    assert table.column("v").to_pylist() == ["1", "x", None]
    assert table.column("id").to_pylist() == [1, 2, 3]
    assert table.column("w").to_pylist() == [None, None, 2.5]  # a key first seen late is kept


def test_gbk_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes('{"city": "北京"}\n{"city": "上海"}\n'.encode("gbk"))
    assert read_table(path).column("city").to_pylist() == ["北京", "上海"]


def _png(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2), color).save(path)


def test_image_folder_sorted_with_labels(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "dog" / "b.png", "red")
    _png(root / "dog" / "a.PNG", "red")
    _png(root / "cat" / "z.png", "blue")
    (root / "cat" / "notes.txt").write_text("ignore me")
    _png(root / "cat" / ".hidden.png", "blue")
    _png(root / ".cache" / "x.png", "blue")
    table = read_table(root)
    assert table.column("label").to_pylist() == ["cat", "dog", "dog"]
    names = [os.path.relpath(p, root) for p in table.column("image").to_pylist()]
    assert names == [os.path.join("cat", "z.png"), os.path.join("dog", "a.PNG"), os.path.join("dog", "b.png")]
    assert all(os.path.isabs(p) for p in table.column("image").to_pylist())
    assert table_source(table) == os.path.abspath(root)


def test_image_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        read_image_folder(empty)
    (empty / "cat").mkdir()
    (empty / "cat" / "readme.md").write_text("x")
    with pytest.raises(DataError, match="no images"):
        read_table(empty)
    loose = tmp_path / "loose"
    _png(loose / "a.png", "red")
    with pytest.raises(DataError, match="1 images directly"):
        read_table(loose)


def test_unsupported_suffix_lists_supported(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match=r"unsupported file suffix '\.xlsx'.*\.csv.*\.parquet"):
        read_table(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.csv"
    with pytest.raises(DataError) as info:
        read_table(path)
    assert str(info.value) == f"{path}: file not found"


def test_data_error_format_and_pickle():
    assert str(DataError("bad", path="f.csv", line=3)) == "f.csv:3: bad"
    assert str(DataError("bad", path="f.csv")) == "f.csv: bad"
    assert str(DataError("bad")) == "bad"
    err = pickle.loads(pickle.dumps(DataError("bad", path="f.csv", line=3)))
    assert (str(err), err.path, err.line, err.reason) == ("f.csv:3: bad", "f.csv", 3, "bad")
