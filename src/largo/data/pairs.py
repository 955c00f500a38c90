"""Text pairs for sequence-to-sequence models: a table → cleaned, split pairs → one shared tokenizer → ids.

The table (csv, tsv, jsonl, parquet; UTF-8 or GBK) is read (both columns as text: "007" stays "007")
and cleaned like a classifier's, and split with the same seeded rule. One byte-level BPE is trained on
both columns of the train split (a shared vocabulary lets the tied embedding serve both sides and copies
names and numbers through); any text round-trips exactly, Chinese and English alike. Its first ids are
PAD, BOS and EOS; the same strings inside a text are ordinary text, never those ids. A source becomes
its tokens + EOS, a target BOS + tokens + EOS; longer texts keep their start, and the cut ones are
counted and reported, never dropped silently.

`tokenizer.nfkc` normalizes sources only (full-width letters, digits and punctuation → half-width, so
"ＡＢＣ" and "ABC" read the same); targets are learned as written, so outputs match their references
(a Chinese target keeps its "，" and "！").
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import torch
from tokenizers import Tokenizer, pre_tokenizers, trainers

from largo.config_seq2seq import Seq2SeqConfig
from largo.data.clean import clean_table
from largo.data.corpus import new_byte_bpe
from largo.data.loader import EncodedSplit
from largo.data.pair_text import SPECIAL_TOKENS, literal_specials, normalize_sources, text_ids
from largo.data.readers import DataError, read_table
from largo.data.split import split_tables
from largo.data.text import check_text_column


def read_pairs(path: str, cfg: Seq2SeqConfig) -> tuple[pa.Table, dict[str, int]]:
    """Read a pairs file and clean it; both text columns are checked first."""
    d = cfg.data
    table = read_table(path, format=d.format, encoding=d.encoding, text_columns=(d.source, d.target))
    for column in (d.source, d.target):
        if column in table.column_names:
            check_text_column(table.column(column), column, path)
    return clean_table(table, inputs=[d.source], targets=[d.target], config=d.clean)


def load_pairs(cfg: Seq2SeqConfig) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Read, clean and split the pairs: {'train', 'valid', 'test'} tables and the cleaning counts."""
    return split_tables(cfg.data, lambda path: read_pairs(path, cfg))


def texts(table: pa.Table, column: str) -> list[str]:
    """A text column as Python strings (numbers and other scalars written as text)."""
    return ["" if v is None else str(v) for v in table.column(column).to_pylist()]


def train_pair_tokenizer(train: pa.Table, cfg: Seq2SeqConfig) -> Tokenizer:
    """The shared byte-level BPE, trained on both columns of the train split (or read from
    tokenizer.path, which must have the special tokens at ids 0, 1, 2)."""
    t = cfg.tokenizer
    if t.path is not None:
        tok = Tokenizer.from_file(t.path)
        found = [tok.id_to_token(i) for i in range(len(SPECIAL_TOKENS))]
        if found != SPECIAL_TOKENS:
            raise DataError(
                f"tokenizer.path: {t.path} has {found} at ids 0-2; a seq2seq tokenizer needs {SPECIAL_TOKENS}"
            )
        return literal_specials(tok)
    tok = new_byte_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=t.vocab_size,
        min_frequency=t.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sources(train, cfg) + texts(train, cfg.data.target), trainer)
    return literal_specials(tok)


def sources(table: pa.Table, cfg: Seq2SeqConfig) -> list[str]:
    """The table's source texts, normalized as the encoder reads them."""
    return normalize_sources(texts(table, cfg.data.source), cfg)


def encode_texts(tok: Tokenizer, items: list[str], limit: int, bos: bool) -> tuple[torch.Tensor, int]:
    """Texts → right-padded ids [n, longest] (tokens + EOS, with BOS first when `bos`); the number of
    texts cut to `limit` tokens (EOS included)."""
    rows, cut = text_ids(tok, items, limit, bos)
    return padded(rows), cut


def padded(rows: list[list[int]]) -> torch.Tensor:
    """Id lists → a right-padded (PAD 0) long tensor [n, longest]."""
    out = torch.zeros((len(rows), max((len(r) for r in rows), default=1)), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def encode_pairs(table: pa.Table, cfg: Seq2SeqConfig, tok: Tokenizer, label: str, log: Any) -> EncodedSplit:
    """A cleaned pairs table → an EncodedSplit: inputs {"source", "target"} (both trimmed per batch to
    their longest row), targets {"tokens": target tokens per example} (what the loss counts)."""
    t = cfg.tokenizer
    source, src_cut = encode_texts(tok, sources(table, cfg), t.max_source_length, bos=False)
    target, tgt_cut = encode_texts(tok, texts(table, cfg.data.target), t.max_target_length, bos=True)
    if src_cut or tgt_cut:
        log(
            f"{label}: {src_cut} of {len(source)} sources reach max_source_length {t.max_source_length} and "
            f"{tgt_cut} targets reach max_target_length {t.max_target_length}; they are truncated"
        )
    tokens = (target[:, 1:] != 0).sum(1)
    return EncodedSplit({"source": source, "target": target}, {"tokens": tokens}, {"source": 0, "target": 0})


def truncated(table: pa.Table, cfg: Seq2SeqConfig, tok: Tokenizer) -> dict[str, int]:
    """How many sources and targets of a table are longer than their limits (and are cut)."""
    t = cfg.tokenizer
    return {
        "sources": encode_texts(tok, sources(table, cfg), t.max_source_length, bos=False)[1],
        "targets": encode_texts(tok, texts(table, cfg.data.target), t.max_target_length, bos=True)[1],
    }
