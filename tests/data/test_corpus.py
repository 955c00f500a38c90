"""The LM corpus pipeline: files, byte-level BPE, token files (round trip, cache), windows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from largo.config_lm import validate_lm_config
from largo.data.corpus import (
    EOT,
    PAD,
    corpus_files,
    iter_pieces,
    prepare_corpus,
    tokenize_corpus,
    train_byte_bpe,
    windows,
)
from largo.data.readers import DataError
from tests.lm_corpus import write_corpus


def test_corpus_files_expand_folders_in_order_and_reject_others(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.txt", "a.jsonl", "b/1.txt", "notes.csv"):
        (tmp_path / name).write_text("x\n", encoding="utf-8")
    files = corpus_files([str(tmp_path)])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a.jsonl", "b/1.txt", "b/2.txt"]
    with pytest.raises(DataError, match="not a corpus file"):
        corpus_files([str(tmp_path / "notes.csv")])
    with pytest.raises(DataError, match="no such file"):
        corpus_files([str(tmp_path / "missing.txt")])


def test_pieces_of_txt_jsonl_parquet_and_gbk(tmp_path):
    txt = tmp_path / "zh.txt"
    txt.write_text("第一行中文\n第二行\n", encoding="gbk")
    assert "".join(t for t, _ in iter_pieces(txt)) == "第一行中文\n第二行\n"  # GBK detected
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n', encoding="utf-8")
    assert list(iter_pieces(jsonl)) == [("one", True), ("two", True)]
    pq.write_table(pa.table({"body": ["alpha", None, "beta"]}), tmp_path / "t.parquet")
    assert [t for t, _ in iter_pieces(tmp_path / "t.parquet", "body")] == ["alpha", "beta"]
    with pytest.raises(DataError, match="no column 'text'"):
        list(iter_pieces(tmp_path / "t.parquet"))


def test_malformed_jsonl_row_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        list(iter_pieces(bad))
    assert "bad.jsonl:2: not valid JSON" in str(err.value)  # file:line, as the table readers say
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match="string 'text' field"):
        list(iter_pieces(wrong))


def test_byte_bpe_round_trips_any_text(tmp_path):
    corpus = write_corpus(tmp_path, lines=400)
    tok = train_byte_bpe([corpus], 400, 1.0, 2, "text", "auto")
    assert tok.token_to_id(EOT) == 0 and tok.token_to_id(PAD) == 1
    assert tok.get_vocab_size() == 400
    for text in ("the cat sat on the mat.", "经济发展需要科技创新。", "unseen ñ 😀 Ωmega\n\ttabs"):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text  # byte level: nothing is unknown, nothing is lost
    # merges learned: common words become single tokens, far shorter than bytes
    assert len(tok.encode("the cat sat on the mat").ids) < len(b"the cat sat on the mat") / 2


def test_token_files_round_trip_the_corpus(tmp_path):
    corpus = write_corpus(tmp_path, lines=1500)
    tok = train_byte_bpe([corpus], 300, 1.0, 2, "text", "auto")
    meta = tokenize_corpus([corpus], tok, tmp_path / "tokens", 0.2, "text", "auto")
    train = np.fromfile(tmp_path / "tokens" / "train.bin", dtype=np.uint16)
    valid = np.fromfile(tmp_path / "tokens" / "valid.bin", dtype=np.uint16)
    assert meta["dtype"] == "uint16"
    assert (meta["train_tokens"], meta["valid_tokens"]) == (len(train), len(valid))
    assert len(valid) > 0 and 0.05 < len(valid) / (len(train) + len(valid)) < 0.5
    assert meta["train_chars"] + meta["valid_chars"] == len(corpus.read_text(encoding="utf-8"))
    # every piece went to exactly one side: the decoded streams hold every line of the file once
    text = tok.decode(train.tolist()) + tok.decode(valid.tolist())
    lines = corpus.read_text(encoding="utf-8").splitlines()
    assert sorted(text.replace(EOT, "").splitlines()) == sorted(lines)
    assert (train == 0).sum() + (valid == 0).sum() == 1  # one document: one end-of-text token


def test_a_named_bos_token_starts_every_document_and_pair(tmp_path):
    corpus = write_corpus(tmp_path, lines=300)
    tok = train_byte_bpe([corpus], 300, 1.0, 2, "text", "auto")
    tok.add_special_tokens(["<s>"])
    bos = tok.token_to_id("<s>")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"the cat {i}", "q": f"q{i}"}) + "\n" for i in range(6)))
    tokenize_corpus([docs, corpus], tok, tmp_path / "t", 0.0, "text", "auto", None, EOT, "<s>")
    ids = np.fromfile(tmp_path / "t" / "train.bin", dtype=np.uint16).tolist()
    # six records and the .txt file (one document however many pieces): seven documents
    assert ids.count(bos) == 7 == ids.count(tok.token_to_id(EOT))
    ends = [i for i, t in enumerate(ids) if t == tok.token_to_id(EOT)]
    assert ids[0] == bos and tok.decode(ids[1 : ends[0]]) == "the cat 0"
    assert all(ids[i + 1] == bos for i in ends[:-1])  # each next document starts with it
    meta = tokenize_corpus([docs], tok, tmp_path / "p", 0.0, "text", "auto", "q", EOT, "<s>")
    pairs = np.fromfile(tmp_path / "p" / "train.bin", dtype=np.uint16).tolist()
    mask = np.fromfile(tmp_path / "p" / "train.mask", dtype=np.uint8).tolist()
    assert pairs[0] == bos and mask[0] == 0  # context, never a target
    assert pairs.count(bos) == 6 and meta["train_targets"] == sum(mask)


def _config(corpus, runs):
    return validate_lm_config(
        {
            "runs_dir": str(runs),
            "data": {"paths": [str(corpus)], "valid": 0.1},
            "tokenizer": {"vocab_size": 300},
            "model": {"dim": 32, "layers": 1, "heads": 2, "context": 32},
        }  # fmt: skip
    )


def test_prepare_corpus_caches_tokenizer_and_tokens_until_the_files_change(tmp_path):
    corpus = write_corpus(tmp_path / "c", lines=800)
    cfg = _config(corpus, tmp_path / "runs")
    said: list[str] = []
    tok1, data1 = prepare_corpus(cfg, log=said.append)
    assert any("training a byte-level BPE" in s for s in said) and any("tokenizing" in s for s in said)
    said.clear()
    tok2, data2 = prepare_corpus(cfg, log=said.append)
    assert any("tokenizer: reused" in s for s in said) and any("token files: reused" in s for s in said)
    assert tok1.to_str() == tok2.to_str()
    assert np.array_equal(np.asarray(data1.train), np.asarray(data2.train))
    assert isinstance(data2.train, np.memmap)  # read from disk, not held in memory
    with open(corpus, "a", encoding="utf-8") as f:
        f.write("a new line changes the corpus.\n")
    said.clear()
    prepare_corpus(cfg, log=said.append)
    assert any("training" in s for s in said) and any("tokenizing" in s for s in said)
    assert len(list((cfg.cache_dir / "tokens").iterdir())) == 2
    meta = json.loads(next((cfg.cache_dir / "tokens").iterdir()).joinpath("meta.json").read_text())
    assert meta["vocab_size"] == 300


def test_too_small_corpus_is_a_clear_error(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words\n", encoding="utf-8")
    cfg = _config(tiny, tmp_path / "runs")
    with pytest.raises(DataError, match="fewer than one window"):
        prepare_corpus(cfg)


def test_windows_are_inputs_and_next_token_targets():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = windows(tokens, np.array([0, 10, 89]), 10)
    assert x.shape == y.shape == (3, 10) and x.dtype.is_floating_point is False
    assert x[1].tolist() == list(range(10, 20)) and y[1].tolist() == list(range(11, 21))
    assert y[2, -1] == 99


def test_a_pairs_corpus_trains_on_completions_only(tmp_path):
    """data.prompt_field: prompt tokens are context (mask 0, IGNORE targets), completions and their
    end-of-text token are the targets; held-out records, counts and the cache key follow."""
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon"]
    records = []
    for i in range(200):
        prompt = " ".join(rng.choice(words, 3)) + " ->"
        records.append({"q": prompt, "a": f" answer {i % 7}", "noise": 1})
    records.append({"q": "an unanswered prompt", "a": ""})  # no completion: skipped
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    runs = tmp_path / "runs"
    plain = _config(path, runs)
    cfg = plain.model_copy(
        update={"data": plain.data.model_copy(update={"text_field": "a", "prompt_field": "q"})}
    )
    tok, data = prepare_corpus(cfg)
    assert data.meta["pairs"] and data.meta["pieces"] == 200
    assert len(data.train_mask) == len(data.train) and len(data.valid_mask) == len(data.valid)
    assert data.meta["train_targets"] == int(np.asarray(data.train_mask).sum())
    # decode each side: masked tokens are exactly the prompts, marked ones the completions + EOT
    train, mask = np.asarray(data.train), np.asarray(data.train_mask).astype(bool)
    assert tok.decode(train[mask].tolist(), skip_special_tokens=False).count(EOT) == 180
    targets = tok.decode(train[mask].tolist(), skip_special_tokens=False).split(EOT)[:-1]
    prompts = tok.decode(train[~mask].tolist())
    assert all(t.startswith(" answer ") for t in targets) and "answer" not in prompts
    assert prompts.count("->") == 180 and len(data.valid) > 0  # 20 records held out (valid 0.1)
    starts = np.array([0, 5, 101])
    x, y = windows(data.train, starts, 32, data.train_mask)
    for row, s in enumerate(starts):  # each row's targets: the next tokens, IGNORE where the mask is 0
        marked = np.asarray(data.train_mask[s + 1 : s + 33]).astype(bool)
        following = np.asarray(data.train[s + 1 : s + 33]).astype(np.int64)
        assert y[row].tolist() == np.where(marked, following, -100).tolist()
        assert x[row].tolist() == np.asarray(data.train[s : s + 32]).tolist()  # inputs keep the prompts
    # the same file read as plain text (no prompt_field) is another cache entry, without masks
    plain_text = plain.model_copy(update={"data": plain.data.model_copy(update={"text_field": "a"})})
    _, unmasked = prepare_corpus(plain_text, tok)
    assert unmasked.train_mask is None and len(unmasked.train) < len(data.train)  # no prompt tokens
    assert len(list((cfg.cache_dir / "tokens").iterdir())) == 2
    from largo.data.corpus import _fields

    assert _fields(plain.data) == ("text", "auto")  # a plain corpus keeps the cache key it always had
    with pytest.raises(ValueError, match="prompt_field"):
        plain.data.model_validate({**plain.data.model_dump(), "prompt_field": ""})
    with pytest.raises(DataError, match="a .txt file has no fields"):
        txt = tmp_path / "plain.txt"
        txt.write_text("hello\n", encoding="utf-8")
        prepare_corpus(cfg.model_copy(update={"data": cfg.data.model_copy(update={"paths": [str(txt)]})}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "fine", "a": "ok"}\n{"q": 3, "a": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with string 'q' and 'a' fields"):
        prepare_corpus(cfg.model_copy(update={"data": cfg.data.model_copy(update={"paths": [str(bad)]})}))
