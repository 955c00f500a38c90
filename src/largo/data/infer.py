"""Guess feature types from a table, so `largo train data.csv --target label` needs no config.

A string column is text when its values read like sentences: three or more words on average, or
mostly Chinese characters. Its tokenizer, max length (covering 95% of the texts) and encoder follow
the language and the data size (`default_text_feature`): a fast bag of words below `LARGE_TEXT_ROWS`
rows, a Transformer above. A free-text target with one text column beside it is a seq2seq task
(`seq2seq_config`): translation, summarization, rewriting.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from largo.data.readers import source_dir

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_CATEGORY_UNIQUE = 1000  # more distinct strings than this looks like free text or an id
LARGE_TEXT_ROWS = 50_000  # from here on the default text encoder is a Transformer
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


@dataclass
class Inferred:
    """Inferred input and output feature dicts, and why any column was left out."""

    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    rows: int = 0  # rows in the table the features were inferred from


def _is_image_column(col: pa.ChunkedArray) -> bool:
    values = pc.drop_null(col).to_pylist()[:200]
    if not values:
        return False
    hits = sum(1 for v in values if isinstance(v, str) and v.lower().endswith(IMAGE_SUFFIXES))
    return hits >= 0.9 * len(values)


def _default_augment(table: pa.Table, col: pa.ChunkedArray) -> dict[str, Any]:
    """Random shifts of about 1/14 of the image side (1 px at 8x8, 2 px at 28x28), from the first image.

    Flips are left off: they are wrong for digits, text and anything with a handedness.
    """
    first = pc.drop_null(col)[0].as_py()
    path = Path(first)
    base = source_dir(table)
    if not path.is_absolute() and base:
        path = Path(base) / path
    try:
        with Image.open(path) as img:
            side = min(img.size)
    except OSError:
        return {}
    return {"crop": max(1, round(side / 14))}


@dataclass
class TextProfile:
    """What a sample of a string column looks like."""

    words: float  # mean whitespace-separated words per value
    chars_p95: float  # 95th percentile of characters per value
    words_p95: float
    cjk: float  # share of characters that are Chinese

    @property
    def is_text(self) -> bool:
        """Sentences rather than labels or ids."""
        return self.words >= 3 or (self.cjk >= 0.3 and self.chars_p95 >= 6)


def text_profile(col: pa.ChunkedArray, sample: int = 2000) -> TextProfile:
    """Word counts, lengths and the Chinese share of up to `sample` values."""
    values = [v for v in pc.drop_null(col).slice(0, sample).to_pylist() if isinstance(v, str)]
    if not values:
        return TextProfile(0.0, 0.0, 0.0, 0.0)
    words = np.array([len(v.split()) for v in values], dtype=float)
    chars = np.array([len(v) for v in values], dtype=float)
    cjk = sum(len(_CJK.findall(v)) for v in values) / max(1.0, chars.sum())
    return TextProfile(
        float(words.mean()), float(np.percentile(chars, 95)), float(np.percentile(words, 95)), cjk
    )


def default_text_feature(name: str, profile: TextProfile, rows: int) -> dict[str, Any]:
    """Tokenizer, max length and encoder for a text column of `rows` rows.

    Small data gets a fastText-style bag: for Chinese, characters and character 2- and 3-grams, mean
    pooled; elsewhere WordPiece words and word bigrams, mean and max pooled. On the review benchmarks
    (bench/text_quality.py) it is ahead of TF-IDF + logistic regression and trains in a minute or two,
    ahead of the TextCNN and the GRU trained from scratch. Large data gets the Transformer, over
    characters for Chinese. Tokens seen once stay out of the vocabulary (min_frequency 2), so [UNK] is
    trained on them and new ones at predict time land on a learned vector rather than a random one.
    """
    chinese = profile.cjk >= 0.3
    large = rows >= LARGE_TEXT_ROWS
    if chinese and large:
        tokenizer: dict[str, Any] = {"kind": "char", "vocab_size": 8000}
        estimate = profile.chars_p95 * 1.1  # tokens per text
    elif chinese:
        tokenizer = {"kind": "char", "vocab_size": 30000}
        estimate = profile.chars_p95 * 1.1
    else:  # a small vocabulary for small data: rare words overfit (10k reviews: 8000 beat 4000 and 16000)
        tokenizer = {"kind": "wordpiece", "vocab_size": 16000 if large else 8000}
        estimate = profile.words_p95 * 1.5 + 2
    max_length = int(min(512, max(32, 16 * math.ceil(estimate / 16))))
    # word bigrams as TF-IDF uses them: those seen twice in train (the rest only memorize their text),
    # scaled by 0.2, i.e. learning at a fifth of the words' rate (Adam moves a rare bigram's vector far
    # on each sighting): on the benchmarks +0.4-0.8 macro-F1 points over words alone, over 6 seeds
    encoder: dict[str, Any] = {
        "kind": "bag",
        "dim": 64,
        "pooling": "mean_max",
        "ngrams": 2,
        "ngram_min_count": 2,
        "ngram_scale": 0.2,
    }
    if chinese:
        # character 1-3-grams, the features TF-IDF does best with on Chinese, seen twice in train, at
        # full scale and mean pooled. 4M hash buckets: 17k reviews hold ~680k distinct 2-3-grams, most
        # of them seen once; at 200k buckets nearly every one shared a bucket with others (and made it
        # "seen twice"), which cost ~1.2 macro-F1 points (0.835 vs 0.847 over 3 seeds). Only the kept
        # buckets get a row, so the table stays small (~190k rows here) and the bucket map is int32.
        encoder = {
            "kind": "bag",
            "dim": 64,
            "pooling": "mean",
            "ngrams": 3,
            "ngram_min_count": 2,
            "ngram_scale": 1.0,
            "ngram_buckets": 4_000_000,
        }
    if large:
        encoder = {"kind": "transformer", "dim": 256, "layers": 4, "heads": 4}
    return {
        "name": name,
        "type": "text",
        "tokenizer": {**tokenizer, "max_length": max_length},
        "encoder": encoder,
    }


def infer_target_type(col: pa.ChunkedArray) -> str:
    """'category' for strings, booleans and integers with few values; 'number' otherwise."""
    t = col.type
    if pa.types.is_floating(t):
        values = pc.drop_null(col)
        all_int = len(values) > 0 and pc.all(pc.equal(values, pc.round(values))).as_py()
        return "category" if all_int and pc.count_distinct(values).as_py() <= 20 else "number"
    if pa.types.is_integer(t):
        return "category" if pc.count_distinct(col).as_py() <= 20 else "number"
    return "category"


def infer_features(table: pa.Table, targets: list[str]) -> Inferred:
    """Infer one feature per column: number, category or image; targets become outputs."""
    result = Inferred(rows=table.num_rows)
    for name in targets:
        if name not in table.column_names:
            raise ValueError(f"--target {name!r} is not a column; columns: {', '.join(table.column_names)}")
        result.outputs.append({"name": name, "type": infer_target_type(table.column(name))})
    n = max(1, table.num_rows)
    for name in table.column_names:
        if name in targets:
            continue
        col = table.column(name)
        t = col.type
        if col.null_count == len(col):
            result.skipped[name] = "every value is missing"
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            result.inputs.append({"name": name, "type": "number"})
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            if _is_image_column(col):
                result.inputs.append({"name": name, "type": "image", "augment": _default_augment(table, col)})
                continue
            unique = pc.count_distinct(col).as_py()
            profile = text_profile(col)
            if unique > 20 and profile.is_text:
                result.inputs.append(default_text_feature(name, profile, table.num_rows))
            elif unique > MAX_CATEGORY_UNIQUE or (unique > 50 and unique > 0.5 * n):
                result.skipped[name] = f"{unique} distinct values in {n} rows: an id or free text"
            else:
                result.inputs.append({"name": name, "type": "category"})
        else:
            result.skipped[name] = f"unsupported column type {t}"
    return result


def is_free_text(col: pa.ChunkedArray) -> bool:
    """A string column of mostly distinct values that read like text (a translation, a summary), not
    labels: what a seq2seq model writes rather than a class to pick."""
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)) or _is_image_column(col):
        return False
    values = pc.drop_null(col)
    unique = pc.count_distinct(values).as_py()
    return unique > MAX_CATEGORY_UNIQUE or (unique > 50 and unique > 0.5 * max(1, len(values)))


def seq2seq_config(data: str, table: pa.Table, target: str, name: str) -> dict[str, Any] | None:
    """A `task: seq2seq` config when `target` is free text and exactly one other column is text (the
    source), else None. Lengths cover 95% of each column (a byte-level BPE of 8,000 writes ~1 token per
    Chinese character and ~0.3 per character of English)."""
    if not is_free_text(table.column(target)):
        return None
    sources = [
        c for c in table.column_names
        if c != target and (is_free_text(table.column(c)) or (
            pa.types.is_string(table.column(c).type) and text_profile(table.column(c)).is_text))
    ]  # fmt: skip
    if len(sources) != 1:
        return None

    def tokens(column: str) -> int:
        profile = text_profile(table.column(column))
        per_char = 1.0 if profile.cjk >= 0.3 else 0.3
        return int(min(512, max(16, 16 * math.ceil(profile.chars_p95 * per_char * 1.2 / 16))))

    return {
        "task": "seq2seq",
        "name": name,
        "data": {"train": data, "source": sources[0], "target": target, "valid": 0.05, "test": 0.05},
        "tokenizer": {"max_source_length": tokens(sources[0]), "max_target_length": tokens(target)},
    }


def default_config(data: str, inferred: Inferred, name: str) -> dict[str, Any]:
    """A sensible starting config for the inferred features (a CNN for images, an MLP otherwise)."""
    has_image = any(f["type"] == "image" for f in inferred.inputs)
    text = [f for f in inferred.inputs if f["type"] == "text"]
    if text and not has_image:
        kinds = {f["encoder"]["kind"] for f in text}
        bag = kinds == {"bag"}
        lr = 5e-4 if "transformer" in kinds else 3e-3 if bag else 1e-3
        # text models grow over-confident long before they stop improving: valid.loss rises while
        # valid F1 still climbs, so stop on F1 (one category output) and regularize hard (Kim's 0.5)
        single = len(inferred.outputs) == 1 and inferred.outputs[0]["type"] == "category"
        train: dict[str, Any] = {"epochs": 15}
        if bag:
            # a bag fits a few thousand reviews within ~3 epochs and then overfits: ~700 optimizer steps
            # (at least 5 epochs) lets the cosine schedule anneal around that point, and an average of
            # the weights over about the last epoch (EMA) steadies the result (bench/text_quality.py)
            steps = max(1, math.ceil(inferred.rows * 0.8 / 64))
            train = {"epochs": min(30, max(5, round(700 / steps))), "ema": round(1 - 1 / max(10, steps), 4)}
        # a lone Chinese bag is read out linearly, as fastText does: the hidden layer overfit its many
        # n-gram features (0.840-0.844 against 0.847 macro-F1 without it)
        lone_chinese_bag = len(inferred.inputs) == 1 and text[0]["tokenizer"]["kind"] == "char" and bag
        return {
            "name": name,
            "data": {"train": data, "valid": 0.1, "test": 0.1},
            "inputs": inferred.inputs,
            "outputs": inferred.outputs,
            "model": {"hidden": [] if lone_chinese_bag else [128], "dropout": 0.5},
            "train": {
                **train,
                "batch_size": 64,
                "optimizer": {"name": "adamw", "lr": lr, "weight_decay": 0.01},
                "schedule": {"name": "cosine", "warmup": 0.05},
                "clip_grad_norm": 1.0,
                "early_stopping": {"metric": "valid.f1_macro" if single else "valid.loss", "patience": 3},
            },
        }
    return {
        "name": name,
        "data": {"train": data, "valid": 0.1, "test": 0.1},
        "inputs": inferred.inputs,
        "outputs": inferred.outputs,
        "model": {"hidden": [128] if has_image else [128, 64], "dropout": 0.2 if has_image else 0.1},
        "train": {
            "epochs": 30 if has_image else 50,
            "batch_size": 64,
            "optimizer": {"name": "adamw", "lr": 2e-3 if has_image else 1e-3, "weight_decay": 0.01},
            "schedule": {"name": "cosine", "warmup": 0.05},
            "early_stopping": {"metric": "valid.loss", "patience": 8},
        },
    }
