"""Text features: normalization, tokenizers fit on the train split, and texts → padded id tensors.

Every tokenizer is a Hugging Face `tokenizers.Tokenizer`, so normalization and tokenization run in
Rust and the fitted tokenizer is saved as a standard `tokenizer.json`:

- bpe / wordpiece: trained subword vocabularies (Chinese characters are merged into words by bpe and
  isolated one per token by wordpiece, as BERT does);
- char: one token per character, the usual strong default for Chinese;
- jieba: Chinese word segmentation (jieba, in Python) in front of a word-level vocabulary;
- pretrained: the tokenizer.json of a Hugging Face model folder, or of a largo language-model bundle
  (`encoder: {from: runs/lm/v1}`), with largo's normalization in front.

Normalization (NFKC, lowercase, punctuation, stop words, whitespace) is the tokenizer's normalizer,
so train and predict time cannot drift apart. Encoding is numpy only (`encode_array`); torch is
imported only by the tensor wrappers (`encode`, `special_ids`, `text_lengths`), so a bundle's text
preprocessing runs in an ONNX Runtime serving image without torch (or scikit-learn: the stop-word
lists load only when a normalizer is built, at fit time or for jieba). Ids are right-padded with
`pad_id`; batches are trimmed to their longest row later (dynamic padding), so a short request never
pays for a long one.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import yaml
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from largo.config import ConfigError, NormalizeConfig, TextFeatureConfig
from largo.config_lm import validate_lm_config
from largo.data.readers import DataError

if TYPE_CHECKING:
    import torch

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4 in every trained vocabulary
# n-gram hash of the bag encoder: a polynomial in the token ids modulo a Mersenne prime, then modulo the
# bucket count (`hash_ngrams_array` here, `largo.models.mlp.hash_ngrams` in torch: the same numbers).
# Every intermediate stays below 2**31 * 2**31, inside int64, whatever the vocabulary or buckets.
# The base must be large and unrelated to round bucket counts: the former base 1_000_003 is 3 modulo
# 200_000 (and 100_000), so with an 8000-word vocabulary a bigram's bucket was nearly 3 * a + b, and
# 240k distinct bigrams shared 52k of 200k buckets (~140k with this base, as a random hash gives).
NGRAM_HASH_MODULUS = 2**31 - 1
NGRAM_HASH_BASE = 1_103_515_245
NGRAM_COUNT_CHUNK = 10_000  # texts encoded at a time when counting the train split's n-grams
STATS_SAMPLE = 50_000  # train-split length statistics are measured on at most about this many texts
_HAN = r"\p{Han}"


# ------------------------------------------------------------------------------------ normalization


def _stopword_set(choice: str | list[str]) -> frozenset[str]:
    """The stop words of a setting; the built-in lists (scikit-learn's English) load only when used."""
    if choice == "none":
        return frozenset()
    from largo.data.stopwords import stopword_set

    return stopword_set(choice)


def _stopword_pattern(words: frozenset[str], ignore_case: bool) -> str | None:
    if not words:
        return None
    latin = sorted((w for w in words if w.isascii()), key=lambda w: (-len(w), w))
    other = sorted((w for w in words if not w.isascii()), key=lambda w: (-len(w), w))
    parts = []
    if latin:
        parts.append(r"\b(?:" + "|".join(re.escape(w) for w in latin) + r")\b")
    if other:
        parts.append("(?:" + "|".join(re.escape(w) for w in other) + ")")
    return ("(?i)" if ignore_case else "") + "|".join(parts)


def build_normalizer(cfg: NormalizeConfig, kind: str) -> normalizers.Normalizer | None:
    """The normalization steps as one HF normalizer (None when every step is off).

    With the jieba tokenizer, stop words are removed after segmentation instead (whole words only);
    otherwise single-character Chinese stop words that are often part of words are kept.
    """
    steps: list[normalizers.Normalizer] = []
    if cfg.nfkc:
        steps.append(normalizers.NFKC())
    if cfg.lowercase and kind != "pretrained":  # a pretrained tokenizer knows whether its model is cased
        steps.append(normalizers.Lowercase())
    if cfg.remove_punctuation:
        steps.append(normalizers.Replace(Regex(r"[\p{P}\p{S}]"), " "))
    if kind != "jieba":
        words = _stopword_set(cfg.stopwords)
        if not isinstance(cfg.stopwords, list) and words:
            from largo.data.stopwords import substring_safe

            words = substring_safe(words)
        pattern = _stopword_pattern(words, ignore_case=not cfg.lowercase or kind == "pretrained")
        if pattern:
            steps.append(normalizers.Replace(Regex(pattern), " "))
    if cfg.collapse_whitespace:
        steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    return normalizers.Sequence(steps) if steps else None


# ------------------------------------------------------------------------------------------- jieba


def _jieba() -> Any:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # it announces building its dictionary on stderr otherwise
    return jieba


def segment(
    texts: Sequence[str], normalizer: normalizers.Normalizer | None, stopwords: frozenset[str]
) -> list[str]:
    """Normalize, cut into words with jieba and join with spaces (the word-level vocabulary's input)."""
    jieba = _jieba()
    out = []
    for text in texts:
        text = normalizer.normalize_str(text) if normalizer is not None else text
        out.append(" ".join(w for w in jieba.lcut(text) if w.strip() and w not in stopwords))
    return out


# ---------------------------------------------------------------------------------------- training


def _new_tokenizer(cfg: TextFeatureConfig) -> tuple[Tokenizer, trainers.Trainer]:
    """An untrained tokenizer of the configured kind and the trainer that fits its vocabulary."""
    t = cfg.tokenizer
    common = {"vocab_size": t.vocab_size, "min_frequency": t.min_frequency, "special_tokens": SPECIAL_TOKENS}
    if t.kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(True)]
        )
        trainer: trainers.Trainer = trainers.BpeTrainer(show_progress=False, **common)
    elif t.kind == "wordpiece":
        # trained as BPE with "##" continuation pieces, then turned into WordPiece (see _as_wordpiece):
        # HF's WordPieceTrainer picks among tied candidates in hash order, a different vocabulary per fit
        tok = Tokenizer(models.BPE(unk_token="[UNK]", continuing_subword_prefix="##"))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_HAN), behavior="isolated"), pre_tokenizers.BertPreTokenizer()]
        )
        trainer = trainers.BpeTrainer(show_progress=False, continuing_subword_prefix="##", **common)
    elif t.kind == "char":
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        trainer = trainers.WordLevelTrainer(show_progress=False, **common)
    elif t.kind == "jieba":
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # jieba's words, joined by spaces
        trainer = trainers.WordLevelTrainer(show_progress=False, **common)
    else:
        raise ValueError(f"tokenizer kind {t.kind!r} is not trained")
    tok.normalizer = build_normalizer(cfg.normalize, t.kind)
    return tok, trainer


def _as_wordpiece(bpe: Tokenizer) -> Tokenizer:
    """A trained "##"-prefixed BPE vocabulary as a WordPiece tokenizer (greedy longest match, as BERT).

    Ids are reassigned in a fixed order (special tokens, then the rest sorted), because the trainer
    numbers its "##" alphabet in hash order, which differs from one fit to the next.
    """
    rest = sorted(t for t in bpe.get_vocab() if t not in SPECIAL_TOKENS)
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *rest])}
    model = models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##")
    tok = Tokenizer(model)
    tok.normalizer = bpe.normalizer
    tok.pre_tokenizer = bpe.pre_tokenizer
    tok.add_special_tokens(SPECIAL_TOKENS)  # already in the vocabulary: registers them as special
    return tok


def load_pretrained_tokenizer(cfg: TextFeatureConfig) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder, with largo's normalization in front of its own."""
    folder = Path(cfg.tokenizer.path or "")
    if not folder.is_dir():
        raise DataError(f"text feature {cfg.name!r}: pretrained model folder not found: {folder}")
    file = folder / "tokenizer.json"
    if file.exists():
        tok = Tokenizer.from_file(str(file))
    else:  # only vocab.txt / sentencepiece files: let transformers build the fast tokenizer
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise DataError(
                f"{folder} has no tokenizer.json; install largo[pretrained] to convert it"
            ) from None
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True).backend_tokenizer
    ours = build_normalizer(cfg.normalize, "pretrained")
    if ours is not None:
        tok.normalizer = normalizers.Sequence([ours, tok.normalizer] if tok.normalizer else [ours])
    return tok


LM_BUNDLE_FILES = ("config.yaml", "tokenizer.json", "model.safetensors")  # deploy/generator.py writes them


def read_lm_model_config(path: str, feature: str | None = None) -> dict[str, Any]:
    """The GPT sizes (vocab_size included) of the LM bundle that `encoder: {from: path}` names (see
    `read_lm_bundle_config`)."""
    return read_lm_bundle_config(path, feature).model.model_dump(mode="json")


def read_lm_bundle_config(path: str, feature: str | None = None) -> Any:
    """The LMConfig of the LM bundle that `encoder: {from: path}` names.

    Raises DataError naming `encoder.from` (and the feature) when the folder is missing or is not a
    language-model bundle, with a hint for the usual mix-ups (a run folder, a Hugging Face folder).
    """
    folder = Path(path)
    where = f"text feature {feature!r}: encoder.from" if feature else "encoder.from"
    if not folder.is_dir():
        raise DataError(f"{where}: no LM bundle folder at {str(path)!r}")
    config_file = folder / "config.yaml"
    data = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
    if not isinstance(data, dict) or data.get("task") != "lm":
        if (folder / "config.json").is_file():
            hint = (
                "; it looks like a Hugging Face model folder: use `pretrained: PATH` for that (a causal "
                "LM: `largo import PATH --out DIR`, then encoder.from: DIR)"
            )
        elif versions := sorted(p.parent.name for p in folder.glob("v*/config.yaml")):
            hint = f"; it holds the versions {', '.join(versions)} of a run: name one of them"
        elif isinstance(data, dict):
            hint = "; its config.yaml is a classifier's, not a language model's (task: lm)"
        else:
            hint = "; an LM bundle is what `largo pretrain` writes (runs/<name>/<version>)"
        raise DataError(f"{where}: {str(path)!r} is not a language-model bundle{hint}")
    missing = [name for name in LM_BUNDLE_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{where}: the LM bundle {str(path)!r} lacks {', '.join(missing)} (unfinished run?)")
    try:
        return validate_lm_config(data, str(config_file))
    except ConfigError as e:
        raise DataError(f"{where}: {e}") from None


def _pad_id(tok: Tokenizer, model_config: dict[str, Any] | None, feature: str) -> int:
    if tok.padding is not None:
        return int(tok.padding["pad_id"])
    for token in ("[PAD]", "<pad>", "<|padding|>"):
        if (i := tok.token_to_id(token)) is not None:
            return i
    if model_config and model_config.get("pad_token_id") is not None:
        return int(model_config["pad_token_id"])
    eos = (model_config or {}).get("eos_token_id")
    if isinstance(eos, int) and tok.id_to_token(eos) is not None:
        # GPT-2 and other causal models ship without a padding token; their end-of-text token pads
        # (as `tokenizer.pad_token = tokenizer.eos_token` does with transformers). The attention mask
        # and the pooling leave every pad position out, so only a text's trailing end-of-text is lost
        return eos
    raise DataError(
        f"text feature {feature!r}: the tokenizer has no padding token ([PAD], <pad>) and the model "
        "config no pad_token_id or eos_token_id; a real token cannot double as padding"
    )


# ------------------------------------------------------------------------------------ the processor


def hash_ngrams_array(ids: np.ndarray, n: int, buckets: int) -> np.ndarray:
    """Hash every window of n consecutive ids [b, t] into [0, buckets) → int64 [b, t - n + 1]."""
    ids = ids.astype(np.int64)
    windows = ids.shape[1] - n + 1
    h = np.full((ids.shape[0], max(0, windows)), n, dtype=np.int64)
    for k in range(n):
        h = (h * NGRAM_HASH_BASE + ids[:, k : k + windows] + 1) % NGRAM_HASH_MODULUS
    return h % buckets


def count_ngrams(ids: np.ndarray, pad_id: int, ngrams: int, buckets: int) -> np.ndarray:
    """How many times each n-gram bucket occurs in right-padded ids [b, t] (n = 2..ngrams, windows wholly
    inside a text only) → int64 [buckets]."""
    counts = np.zeros(buckets, dtype=np.int64)
    inside = ids != pad_id
    for n in range(2, ngrams + 1):
        if ids.shape[1] >= n:  # right padding: a window is inside the text iff its last token is
            h = hash_ngrams_array(ids, n, buckets)[inside[:, n - 1 :]]
            counts += np.bincount(h, minlength=buckets)
    return counts


class TextProcessor:
    """Fits a tokenizer on the train split and turns texts into right-padded int32 id tensors.

    For a bag encoder with `ngram_min_count` > 1 it also records which n-gram hash buckets occur that
    often in the train split (`ngram_kept`, sorted); the encoder leaves the other n-grams out.
    """

    def __init__(self, config: TextFeatureConfig, state: dict[str, Any] | None = None):
        self.config = config
        self.tokenizer: Tokenizer | None = None
        self.pad_id = 0
        self.stats: dict[str, Any] = {}
        self.model_config: dict[str, Any] | None = None  # a pretrained model's config.json
        self.ngram_kept: list[int] | None = None  # n-gram buckets seen ngram_min_count times in train
        if state is not None:
            self.tokenizer = Tokenizer.from_str(state["tokenizer"])
            self.pad_id = int(state["pad_id"])
            self.stats = state.get("stats", {})
            self.model_config = state.get("model_config")
            self.ngram_kept = state.get("ngram_kept")
        # jieba normalizes and drops stop words in Python, before segmenting: built once, not per call
        self._jieba = config.tokenizer.kind == "jieba"
        self._jieba_normalizer = build_normalizer(config.normalize, "jieba") if self._jieba else None
        self._stopwords = _stopword_set(config.normalize.stopwords) if self._jieba else frozenset()

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the embedding table's rows)."""
        assert self.tokenizer is not None, "fit() first"
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def unk_id(self) -> int | None:
        """Id of the unknown token ([UNK] or the pretrained tokenizer's own), if there is one."""
        assert self.tokenizer is not None, "fit() first"
        for token in ("[UNK]", "<unk>"):
            if (i := self.tokenizer.token_to_id(token)) is not None:
                return i
        return None

    @property
    def special_ids(self) -> torch.Tensor:
        """Ids of the special tokens (padding, [CLS], [SEP], [MASK] …) as an int tensor."""
        import torch

        assert self.tokenizer is not None, "fit() first"
        decoder = self.tokenizer.get_added_tokens_decoder()
        ids = {i for i, t in decoder.items() if t.special} | {self.pad_id}
        return torch.tensor(sorted(ids), dtype=torch.int32)

    @property
    def max_length(self) -> int:
        """Longest sequence in tokens; longer texts are truncated (to an LM encoder's context too)."""
        limit = self.config.tokenizer.max_length
        if self.config.encoder.kind == "lm" and self.model_config is not None:
            limit = min(limit, int(self.model_config["context"]))
        return limit

    def texts(self, column: pa.ChunkedArray | pa.Array | Sequence[Any]) -> list[str]:
        """Raw values → strings: missing becomes '' (an empty text); numbers are written out; other
        types (lists, dicts, bytes) are an error naming the row."""
        values = column.to_pylist() if isinstance(column, pa.ChunkedArray | pa.Array) else list(column)
        out = []
        for i, v in enumerate(values):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                out.append("")
            elif isinstance(v, str):
                out.append(v)
            elif isinstance(v, int | float | bool):
                out.append(str(v))
            else:
                raise DataError(
                    f"text feature {self.config.name!r}: row {i + 1} holds a {type(v).__name__}, not a string"
                )
        return out

    def _prepare(self, texts: list[str]) -> list[str]:
        if not self._jieba:
            return texts
        return segment(texts, self._jieba_normalizer, self._stopwords)

    def fit(self, column: pa.ChunkedArray | Sequence[Any]) -> None:
        """Train the tokenizer on the train split (or load a pretrained one); record length stats."""
        texts = self.texts(column)
        t = self.config.tokenizer
        prepared = self._prepare(texts)  # jieba segments once, here, for training and the stats
        enc = self.config.encoder
        if enc.kind == "lm":  # checked first, so a wrong folder is reported as encoder.from
            lm = read_lm_bundle_config(enc.path, self.config.name)
            self.model_config, self.lm_pad = lm.model.model_dump(mode="json"), lm.tokenizer.pad
            tok = load_pretrained_tokenizer(self.config)
            self._check_lm_tokenizer(tok)
        elif t.kind == "pretrained":
            tok = load_pretrained_tokenizer(self.config)
            encoder_path = getattr(enc, "path", None)  # the model may differ from the tokenizer
            config_file = Path(encoder_path or t.path or "") / "config.json"
            if config_file.exists():  # the architecture, so a bundle rebuilds it without the folder
                model_config = json.loads(config_file.read_text(encoding="utf-8"))
                self.model_config = {k: v for k, v in model_config.items() if k != "_name_or_path"}
        else:
            tok, trainer = _new_tokenizer(self.config)
            tok.train_from_iterator(_batches(prepared), trainer=trainer, length=len(prepared))
            if t.kind == "wordpiece":
                tok = _as_wordpiece(tok)
        tok.no_padding()
        tok.no_truncation()
        self.tokenizer = tok
        if enc.kind == "lm":  # the LM's own padding token; a stray [PAD] in its vocabulary is text
            self.pad_id = int(tok.token_to_id(self.lm_pad))
        else:
            self.pad_id = _pad_id(tok, self.model_config, self.config.name)
        self._configure()
        sample = prepared[:: max(1, len(prepared) // STATS_SAMPLE)]
        ids = self._encode_prepared(sample)
        lengths = array_lengths(ids, self.pad_id)
        unk = tok.token_to_id("[UNK]")
        share = len(texts) / max(1, len(sample))
        self.stats = {
            "texts": len(texts),
            "empty": round(float((lengths == 0).sum()) * share),
            "truncated": round(float((lengths >= self.max_length).sum()) * share),
            "mean_length": float(lengths.mean()) if len(lengths) else 0.0,
            "p95_length": float(np.percentile(lengths, 95)) if len(lengths) else 0.0,
            "unk_rate": float((ids == unk).sum() / max(1, lengths.sum())) if unk is not None else 0.0,
        }
        enc = self.config.encoder
        if enc.kind == "bag" and enc.ngrams > 1 and enc.ngram_min_count > 1:
            counts = np.zeros(enc.ngram_buckets, dtype=np.int64)
            for start in range(0, len(prepared), NGRAM_COUNT_CHUNK):
                chunk = self._encode_prepared(prepared[start : start + NGRAM_COUNT_CHUNK])
                counts += count_ngrams(chunk, self.pad_id, enc.ngrams, enc.ngram_buckets)
            self.ngram_kept = np.flatnonzero(counts >= enc.ngram_min_count).tolist()
            self.stats["ngram_buckets_kept"] = len(self.ngram_kept)

    def _check_lm_tokenizer(self, tok: Tokenizer) -> None:
        """An LM encoder's tokenizer must have the LM's padding token and fit its embedding table."""
        assert self.model_config is not None
        name, vocab = self.config.name, int(self.model_config["vocab_size"])
        if tok.token_to_id(self.lm_pad) is None:
            raise DataError(
                f"text feature {name!r}: tokenizer.path: the tokenizer has no {self.lm_pad} token"
            )
        if tok.get_vocab_size(with_added_tokens=True) > vocab:
            raise DataError(
                f"text feature {name!r}: tokenizer.path: {tok.get_vocab_size()} tokens do not fit the LM's "
                f"vocabulary of {vocab}; leave tokenizer.path unset to use the LM bundle's own tokenizer"
            )

    def _configure(self) -> None:
        """Truncate to max_length from the configured side; pad each encoded batch to its longest row."""
        assert self.tokenizer is not None
        t = self.config.tokenizer
        pad_token = self.tokenizer.id_to_token(self.pad_id) or "[PAD]"
        self.tokenizer.enable_truncation(self.max_length, direction=t.truncation)
        self.tokenizer.enable_padding(pad_id=self.pad_id, pad_token=pad_token)

    def encode_array(self, column: pa.ChunkedArray | Sequence[Any]) -> np.ndarray:
        """Texts → int32 ids [n, longest row], right-padded with pad_id, truncated to max_length."""
        if self.tokenizer is None:
            raise RuntimeError("TextProcessor.encode before fit")
        if self.tokenizer.truncation is None:
            self._configure()
        return self._encode_prepared(self._prepare(self.texts(column)))

    def encode(self, column: pa.ChunkedArray | Sequence[Any]) -> torch.Tensor:
        """`encode_array` as a torch tensor (shares the memory)."""
        import torch

        return torch.from_numpy(self.encode_array(column))

    def _encode_prepared(self, texts: list[str]) -> np.ndarray:
        assert self.tokenizer is not None
        if not texts:
            return np.zeros((0, 1), dtype=np.int32)
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int32)
        if ids.shape[1] == 0:  # every text empty: keep one (padding) column so shapes stay 2-d
            ids = np.full((len(texts), 1), self.pad_id, dtype=np.int32)
        return ids

    def state(self) -> dict[str, Any]:
        """JSON-serializable fitted state (the tokenizer as its tokenizer.json text)."""
        assert self.tokenizer is not None
        state: dict[str, Any] = {
            "kind": self.config.tokenizer.kind,
            "tokenizer": self.tokenizer.to_str(),
            "pad_id": self.pad_id,
            "vocab_size": self.vocab_size,
            "stats": self.stats,
        }
        if self.model_config is not None:
            state["model_config"] = self.model_config
        if self.ngram_kept is not None:
            state["ngram_kept"] = self.ngram_kept
        return state


def check_text_column(column: pa.ChunkedArray, feature: str, path: str | None) -> None:
    """A text column must hold strings (numbers and nulls pass): name the first row that does not."""
    t = column.type
    if pa.types.is_dictionary(t):  # pandas categoricals in parquet files
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t):
        return
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return
    first = next((i for i, v in enumerate(column.to_pylist()) if v is not None), 0)
    raise DataError(f"text feature {feature!r}: data row {first + 1} holds {t} values, not text", path=path)


def _batches(texts: list[str], size: int = 1000) -> Iterator[list[str]]:
    for lo in range(0, len(texts), size):
        yield texts[lo : lo + size]


def text_lengths(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Length of each row of a right-padded id tensor: the last non-padding position + 1.

    Not a count of non-padding ids: a text that itself contains the padding token ("[PAD]") must not
    lose its last tokens when a batch is cut to its longest row.
    """
    import torch

    positions = torch.arange(1, ids.shape[1] + 1, device=ids.device)
    return torch.where(ids != pad_id, positions, 0).amax(dim=1) if ids.shape[1] else ids.new_zeros(len(ids))


def array_lengths(ids: np.ndarray, pad_id: int) -> np.ndarray:
    """`text_lengths` for a numpy id array [n, t] → int64 [n] (the torch-free serving path)."""
    if ids.shape[1] == 0:
        return np.zeros(len(ids), dtype=np.int64)
    positions = np.arange(1, ids.shape[1] + 1, dtype=np.int64)
    return np.where(ids != pad_id, positions, 0).max(axis=1)
