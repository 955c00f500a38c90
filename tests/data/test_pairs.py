"""Text pairs for seq2seq: read as text, cleaned, split, one shared tokenizer, ids with BOS/EOS."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from largo.config_seq2seq import validate_seq2seq_config
from largo.data.pair_text import source_ids
from largo.data.pairs import (
    encode_pairs,
    load_pairs,
    read_pairs,
    texts,
    train_pair_tokenizer,
    truncated,
)
from largo.data.readers import DataError


def _config(path: Path, **tokenizer: object) -> object:
    return validate_seq2seq_config(
        {
            "task": "seq2seq",
            "data": {"train": str(path), "source": "src", "target": "tgt", "valid": 0.2, "test": 0.2},
            "tokenizer": {"vocab_size": 300, **tokenizer},
        }
    )


def test_both_columns_are_read_as_text_and_rows_missing_a_side_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("src,tgt\n007,2.50\nx,\n,y\n10,十\n", encoding="utf-8")
    table, counts = read_pairs(str(path), _config(path))
    assert texts(table, "src") == ["007", "10"] and texts(table, "tgt") == ["2.50", "十"]
    assert counts["rows_read"] == 4 and counts["rows_kept"] == 2


def test_a_missing_column_is_named(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text("source\ttgt\na\tb\n", encoding="utf-8")
    with pytest.raises(DataError, match="src"):
        read_pairs(str(path), _config(path))


def test_a_gbk_file_and_the_seeded_split(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    rows = [f"句子{i}\t翻译{i}" for i in range(50)]
    path.write_bytes(("src\ttgt\n" + "\n".join(rows) + "\n").encode("gbk"))
    tables, _ = load_pairs(_config(path))
    assert {k: t.num_rows for k, t in tables.items()} == {"train": 30, "valid": 10, "test": 10}
    again, _ = load_pairs(_config(path))
    assert texts(again["test"], "src") == texts(tables["test"], "src")
    assert "句子0" in texts(tables["train"], "src") + texts(tables["valid"], "src") + texts(
        tables["test"], "src"
    )


def _table(sources: list[str], targets: list[str]) -> pa.Table:
    return pa.table({"src": sources, "tgt": targets})


def test_targets_keep_full_width_punctuation_and_special_strings_are_text(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "x.csv")
    train = _table(["ＡＢＣ hello <pad> world", "good </s> morning"], ["你好，世界！", "三（二）<s>"])
    tok = train_pair_tokenizer(train, cfg)
    assert [tok.id_to_token(i) for i in range(3)] == ["<pad>", "<s>", "</s>"]
    split = encode_pairs(train, cfg, tok, "train", print)
    source, target = split.inputs["source"], split.inputs["target"]
    # the literal "<pad>" / "</s>" / "<s>" inside a text are not the ids 0, 1, 2
    assert 0 not in source[0, : int(split.lengths["source"][0])].tolist()
    assert target[1, 0] == 1 and target[1].tolist().count(1) == 1 and target[1].tolist().count(2) == 1
    # the source is NFKC-normalized (ＡＢＣ → ABC), the target is learned exactly as written
    assert tok.decode(source[0].tolist(), skip_special_tokens=True).startswith("ABC hello <pad>")
    assert tok.decode(target[0].tolist(), skip_special_tokens=True) == "你好，世界！"
    assert tok.decode(target[1].tolist(), skip_special_tokens=True) == "三（二）<s>"
    assert source_ids(tok, ["ＡＢＣ"], cfg) == source_ids(tok, ["ABC"], cfg)
    assert split.targets["tokens"].tolist() == (target[:, 1:] != 0).sum(1).tolist()


def test_long_texts_keep_their_start_and_are_counted(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "x.csv", max_source_length=4, max_target_length=3)
    train = _table(["a b c d e f g h", "a"], ["x y z w v", "x"])
    tok = train_pair_tokenizer(train, cfg)
    split = encode_pairs(train, cfg, tok, "train", print)
    assert split.inputs["source"].shape[1] == 4 and split.inputs["source"][0, -1] == 2  # ends in EOS
    assert split.inputs["target"].shape[1] == 4  # BOS + 2 tokens + EOS
    assert truncated(train, cfg, tok) == {"sources": 1, "targets": 1}
