"""What a seq2seq model's text side needs without torch: its special ids, source normalization and ids.

`data/pairs.py` (training, tensors) and the torch-free runtime (`deploy/seq2seq_onnx.py`) both read
sources through these, so a source becomes the same ids whichever runtime decodes it.
"""

from __future__ import annotations

import unicodedata

from tokenizers import Tokenizer

from largo.config_seq2seq import Seq2SeqConfig

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: PAD, BOS, EOS
PAD, BOS, EOS = 0, 1, 2
NEVER = [PAD, BOS]  # never a target, so never generated


def literal_specials(tok: Tokenizer) -> Tokenizer:
    """`tok` reading "<pad>" or "</s>" inside a text as text, not as the special ids (set again after
    loading a tokenizer file: the setting is not saved in it)."""
    tok.encode_special_tokens = True
    return tok


def normalize_sources(items: list[str], cfg: Seq2SeqConfig) -> list[str]:
    """Sources as the encoder reads them: NFKC when `tokenizer.nfkc` (targets are never normalized)."""
    return [unicodedata.normalize("NFKC", x) for x in items] if cfg.tokenizer.nfkc else items


def text_ids(tok: Tokenizer, items: list[str], limit: int, bos: bool) -> tuple[list[list[int]], int]:
    """Texts → their ids (tokens + EOS, with BOS first when `bos`), each cut to `limit` ids with EOS
    kept last; and the number of texts cut."""
    body = limit - 1  # room for EOS
    rows, cut = [], 0
    for enc in tok.encode_batch(items, add_special_tokens=False):
        ids = enc.ids
        cut += len(ids) > body
        rows.append(([BOS] if bos else []) + ids[:body] + [EOS])
    return rows, cut


def source_ids(tok: Tokenizer, items: list[str], cfg: Seq2SeqConfig) -> list[list[int]]:
    """Sources to translate → the ids the encoder reads (normalized as in training, cut to
    max_source_length)."""
    return text_ids(tok, normalize_sources(items, cfg), cfg.tokenizer.max_source_length, bos=False)[0]
