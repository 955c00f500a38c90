"""Raw text for language models: corpus files → byte-level BPE → a memory-mapped token file → windows.

A corpus is .txt / .jsonl (a text field) / .parquet files, of any size: they are read as a stream of
pieces (~4k characters of a .txt file, or one record), never whole. The tokenizer is trained on a
sample spread over the files; the corpus is then tokenized once (HF `tokenizers` encodes each batch
of pieces on all cores) into flat uint16/uint32 token files, one for training and one for the
held-out pieces. Both are cached under a key of the files (path, size, mtime) and the tokenizer, so
later runs on the same corpus reuse them. Training reads random windows straight from the memory map,
so a corpus larger than RAM works.

Fine-tuning pairs: with `data.prompt_field` set, each .jsonl / .parquet record is a prompt and a
completion (`text_field`); the token file holds prompt + completion + EOT per record, and a parallel
uint8 mask file (1 = a completion token or its EOT) makes the prompt tokens context only: windows give
them the IGNORE target, so the loss, its per-token normalization and the held-out perplexity count the
completions alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from largo.config_lm import LMConfig
from largo.data.readers import DataError, _resolve_encoding

EOT = "<|endoftext|>"  # ends every document; generation stops on it
PAD = "<pad>"  # pads fine-tuning batches (never a training target)
IGNORE = -100  # a target id the loss skips: prompt tokens of a pairs corpus, padding (models.gpt uses it)
TEXT_SUFFIXES = (".txt", ".text", ".md")
CORPUS_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
PIECE_CHARS = 4_000
ENCODE_BATCH = 256  # pieces per encode_batch call


# ------------------------------------------------------------------------------------------- files


def corpus_files(paths: list[str]) -> list[Path]:
    """The corpus files named by `paths` (files, or folders searched recursively), in a stable order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in CORPUS_SUFFIXES)
            if not found:
                raise DataError(f"{p}: no {', '.join(CORPUS_SUFFIXES)} files in this folder")
            files += found
        elif p.is_file():
            if p.suffix.lower() not in CORPUS_SUFFIXES:
                raise DataError(f"{p}: not a corpus file; allowed suffixes: {', '.join(CORPUS_SUFFIXES)}")
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return files


def fingerprint(files: list[Path]) -> str:
    """A hash of the files' paths, sizes and modification times (what makes a cache entry stale)."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def iter_pieces(path: Path, text_field: str = "text", encoding: str = "auto") -> Iterator[tuple[str, bool]]:
    """(text, ends a document) pieces of one file, streamed: ~PIECE_CHARS of whole lines of a .txt file
    (the file is one document), or one record's text of a .jsonl / .parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"no column {text_field!r}; columns: {pf.schema_arrow.names}", path=path)
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if isinstance(value, str) and value:
                    yield value, True
        return
    enc = _resolve_encoding(path, encoding)
    with open(path, encoding=enc, newline="") as f:
        if suffix == ".jsonl":
            yield from _jsonl_pieces(f, path, text_field)
            return
        buf: list[str] = []
        size = 0
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= PIECE_CHARS:
                yield "".join(buf), False
                buf, size = [], 0
        yield "".join(buf), True


def _jsonl_records(f: Any, path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line; bad JSON names the file and line."""
    for number, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON: {exc.msg}", path=path, line=number) from None


def _jsonl_pieces(f: Any, path: Path, text_field: str) -> Iterator[tuple[str, bool]]:
    for number, record in _jsonl_records(f, path):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str | type(None)):
            raise DataError(f"expected an object with a string {text_field!r} field", path=path, line=number)
        if record.get(text_field):
            yield record[text_field], True


def iter_pairs(
    path: Path, prompt_field: str, text_field: str = "text", encoding: str = "auto"
) -> Iterator[tuple[str, str]]:
    """(prompt, completion) of each record of a .jsonl / .parquet file; records without a completion
    are skipped, a missing prompt is empty."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        pf = pq.ParquetFile(path)
        missing = [c for c in (prompt_field, text_field) if c not in pf.schema_arrow.names]
        if missing:
            raise DataError(f"no column {missing[0]!r}; columns: {pf.schema_arrow.names}", path=path)
        for batch in pf.iter_batches(columns=[prompt_field, text_field], batch_size=1024):
            for prompt, text in zip(*(c.to_pylist() for c in batch.columns), strict=True):
                if isinstance(text, str) and text:
                    yield (prompt if isinstance(prompt, str) else ""), text
        return
    if suffix != ".jsonl":
        raise DataError(
            f"data.prompt_field is set, and a {suffix} file has no fields: prompt/completion pairs come "
            "from .jsonl or .parquet files",
            path=path,
        )
    with open(path, encoding=_resolve_encoding(path, encoding), newline="") as f:
        for number, record in _jsonl_records(f, path):
            ok = isinstance(record, dict) and all(
                isinstance(record.get(k), str | type(None)) for k in (prompt_field, text_field)
            )
            if not ok:
                raise DataError(
                    f"expected an object with string {prompt_field!r} and {text_field!r} fields",
                    path=path,
                    line=number,
                )
            if record.get(text_field):
                yield record.get(prompt_field) or "", record[text_field]


def iter_conversations(
    path: Path, field: str, chat: Any, encoding: str = "auto"
) -> Iterator[tuple[str, str, str]]:
    """(prompt, answer, turn end) of each conversation of a .jsonl file: the prompt is every turn but
    the last laid out by the chat template (a `ChatTemplate`: the assistant's turn opened), the answer
    the last turn's content, the assistant's, and the turn end what the template writes after it.
    DataError naming the file and line of a record that is not one."""
    if path.suffix.lower() != ".jsonl":
        raise DataError(
            f"data.messages_field is set: conversations come from .jsonl files, not {path.suffix}", path=path
        )
    with open(path, encoding=_resolve_encoding(path, encoding), newline="") as f:
        for number, record in _jsonl_records(f, path):
            messages = record.get(field) if isinstance(record, dict) else None
            last = messages[-1] if isinstance(messages, list) and messages else None
            if not (
                isinstance(last, dict)
                and last.get("role") == "assistant"
                and isinstance(last.get("content"), str)
            ):
                raise DataError(
                    f"expected an object whose {field!r} is a list of messages ending with the assistant's",
                    path=path,
                    line=number,
                )
            try:
                prompt, end = chat.render(messages[:-1]), chat.turn_end(messages)
            except ValueError as e:
                raise DataError(f"{field}: {e}", path=path, line=number) from None
            if last["content"]:
                yield prompt, last["content"], end


def _conversation_pieces(
    path: Path, tok: Tokenizer, conversations: tuple[str, Any, set[int]], encoding: str
) -> Iterator[tuple[str, str, bool]]:
    """(prompt, answer + its end of turn, whether the end-of-text token must follow: the end of turn
    holds none of the stopping tokens) of each conversation of a file."""
    field, chat, stops = conversations
    closed: dict[str, bool] = {}  # per end of turn: one for every record, as a rule
    for prompt, answer, end in iter_conversations(path, field, chat, encoding):
        if end not in closed:
            closed[end] = bool(stops & set(tok.encode(end, add_special_tokens=False).ids))
        yield prompt, answer + end, not closed[end]


# --------------------------------------------------------------------------------------- tokenizer


def new_byte_bpe() -> Tokenizer:
    """An untrained byte-level BPE (GPT-2's scheme: any text round-trips exactly, no unknown token)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _texts(path: Path, text_field: str, encoding: str, prompt_field: str | None) -> Iterator[str]:
    if prompt_field is None:
        yield from (text for text, _ in iter_pieces(path, text_field, encoding))
    else:
        yield from (prompt + text for prompt, text in iter_pairs(path, prompt_field, text_field, encoding))


def _sample(
    files: list[Path], budget_chars: int, text_field: str, encoding: str, prompt_field: str | None = None
) -> Iterator[str]:
    """Up to budget_chars of text (prompts included), an equal share from the start of each file."""
    share = max(1, budget_chars // len(files))
    for path in files:
        taken = 0
        for text in _texts(path, text_field, encoding, prompt_field):
            yield text
            taken += len(text)
            if taken >= share:
                break


def train_byte_bpe(
    files: list[Path],
    vocab_size: int,
    sample_mb: float,
    min_frequency: int,
    text_field: str,
    encoding: str,
    prompt_field: str | None = None,
    eot: str = EOT,
    pad: str = PAD,
) -> Tokenizer:
    """A byte-level BPE trained on a sample of the corpus, with the end-of-text (`eot`) and padding
    (`pad`) tokens as its first ids."""
    tok = new_byte_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eot, pad],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_sample(files, int(sample_mb * 1e6), text_field, encoding, prompt_field), trainer)
    return tok


def special_id(tok: Tokenizer, token: str) -> int:
    """The id of a special token the LM tokenizer must have."""
    i = tok.token_to_id(token)
    if i is None:
        raise DataError(
            f"the tokenizer has no {token} token; an LM tokenizer needs its end-of-text and padding "
            f"tokens (tokenizer.eot, tokenizer.pad: default {EOT}, {PAD}) and any bos or stop it names"
        )
    return i


# -------------------------------------------------------------------------------------- token file


@dataclass
class TokenData:
    """The tokenized corpus: memory-mapped train and valid token streams and what they were made of."""

    train: np.ndarray
    valid: np.ndarray
    meta: dict[str, Any]
    train_mask: np.ndarray | None = None  # a pairs corpus: 1 where a token is a target (a completion's)
    valid_mask: np.ndarray | None = None

    @property
    def chars_per_token(self) -> float:
        """Characters of held-out text per held-out target token (for bits per character)."""
        return self.meta["valid_chars"] / max(1, self.meta.get("valid_targets", self.meta["valid_tokens"]))


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _is_valid_piece(index: int, fraction: float) -> bool:
    # every (1/fraction)-th piece, spread evenly over the corpus: the held-out share is exact and the
    # same pieces are held out on every run (a hash of the index strays far from the share on few pieces)
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def tokenize_corpus(
    files: list[Path],
    tok: Tokenizer,
    out_dir: Path,
    valid: float,
    text_field: str,
    encoding: str,
    prompt_field: str | None = None,
    eot_token: str = EOT,
    bos_token: str | None = None,
    conversations: tuple[str, Any, set[int]] | None = None,
) -> dict[str, Any]:
    """Tokenize every file into out_dir/{train,valid}.bin (`eot_token` after each document, `bos_token`
    before it when given); returns meta.json.

    With `conversations` (the messages field, the `ChatTemplate` and the ids that stop a generation),
    every .jsonl record is a conversation, tokenized as a pair (`iter_conversations`): the template's
    prompt (which holds the beginning-of-text token where the template puts it, so none is added) and
    the assistant's answer with the template's end of turn; `eot_token` follows only when that end
    holds no stopping token.

    With `prompt_field`, every record is a prompt and a completion: the .bin files hold prompt +
    completion + EOT, and {train,valid}.mask (uint8) mark the completion tokens and the EOT as targets;
    `*_targets` in the meta count them, `*_chars` count the completions' characters.
    Written to a temporary folder renamed into place at the end, so an interrupted run leaves no
    half-written cache entry.
    """
    dtype = token_dtype(tok.get_vocab_size())
    eot = special_id(tok, eot_token)
    # a conversation's template writes the beginning-of-text token where it wants it
    bos = [] if bos_token is None or conversations is not None else [special_id(tok, bos_token)]
    pairs = prompt_field is not None or conversations is not None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokens-", dir=out_dir.parent))
    counts = {"train_tokens": 0, "valid_tokens": 0, "train_chars": 0, "valid_chars": 0}
    if pairs:
        counts |= {"train_targets": 0, "valid_targets": 0}
    names = ("train.bin", "valid.bin") + (("train.mask", "valid.mask") if pairs else ())
    try:
        with contextlib.ExitStack() as files_open:
            handles = [files_open.enter_context(open(tmp / name, "wb")) for name in names]
            out = {"train": handles[0], "valid": handles[1]}
            masks = {"train": handles[2], "valid": handles[3]} if pairs else {}
            index = 0
            # (prompt, text, starts a document, ends one, held out)
            batch: list[tuple[str, str, bool, bool, bool]] = []

            def flush() -> None:
                texts = tok.encode_batch([piece[1] for piece in batch], add_special_tokens=False)
                prompts = (
                    tok.encode_batch([piece[0] for piece in batch], add_special_tokens=False)
                    if pairs
                    else None
                )
                for k, ((_, text, starts, ends, held_out), e) in enumerate(zip(batch, texts, strict=True)):
                    split = "valid" if held_out else "train"
                    context = (bos if starts else []) + (prompts[k].ids if prompts is not None else [])
                    ids = context + e.ids + ([eot] if ends else [])
                    out[split].write(np.asarray(ids, dtype=dtype).tobytes())
                    counts[f"{split}_tokens"] += len(ids)
                    counts[f"{split}_chars"] += len(text)
                    if pairs:
                        masks[split].write(bytes(len(context)) + b"\x01" * (len(ids) - len(context)))
                        counts[f"{split}_targets"] += len(ids) - len(context)
                batch.clear()

            for path in files:
                if conversations is not None:
                    pieces: Iterator[tuple[str, str, bool]] = _conversation_pieces(
                        path, tok, conversations, encoding
                    )
                elif pairs:
                    pieces = ((p, t, True) for p, t in iter_pairs(path, prompt_field, text_field, encoding))
                else:
                    pieces = (("", t, ends) for t, ends in iter_pieces(path, text_field, encoding))
                starts = True  # a file starts a document; so does the piece after one that ends
                for prompt, text, ends in pieces:
                    batch.append((prompt, text, starts, ends, _is_valid_piece(index, valid)))
                    index, starts = index + 1, ends
                    if len(batch) >= ENCODE_BATCH:
                        flush()
            flush()
        meta = {"dtype": dtype.name, "vocab_size": tok.get_vocab_size(), "pieces": index, "pairs": pairs}
        (tmp / "meta.json").write_text(json.dumps(meta | counts, indent=1), encoding="utf-8")
        if out_dir.exists():  # another process finished the same entry first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the files are closed by now
        raise
    return json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))


def open_tokens(folder: Path) -> TokenData:
    """Memory-map a tokenized corpus folder (and its target masks, for a pairs corpus)."""
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    dtype = np.dtype(meta["dtype"])

    def mapped(name: str, kind: np.dtype) -> np.ndarray:
        path = folder / name
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=kind)
        return np.memmap(path, dtype=kind, mode="r")

    masks = (
        [mapped(f"{s}.mask", np.dtype(np.uint8)) for s in ("train", "valid")]
        if meta.get("pairs")
        else [None] * 2
    )
    return TokenData(mapped("train.bin", dtype), mapped("valid.bin", dtype), meta, *masks)


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def _fields(d: Any) -> tuple[str, ...]:
    """What of the corpus config the cache keys depend on (a plain corpus keeps its old keys)."""
    fields = (d.text_field, d.encoding) + (
        (f"prompt:{d.prompt_field}",) if d.prompt_field is not None else ()
    )
    return fields + ((f"messages:{d.messages_field}",) if d.messages_field is not None else ())


def prepare_corpus(
    cfg: LMConfig, tokenizer: Tokenizer | None = None, log: Any = None, chat: Any = None
) -> tuple[Tokenizer, TokenData]:
    """The run's tokenizer (given, read from tokenizer.path, cached, or trained) and token files
    (cached, or made now) for the config's corpus; `chat` (the base model's `ChatTemplate`) lays out
    a corpus of conversations (data.messages_field)."""
    say = log or (lambda _msg: None)
    d = cfg.data
    if not d.paths:
        raise DataError("data.paths: no corpus files or folders named")
    if d.messages_field is not None and (chat is None or tokenizer is None):
        raise DataError(
            "data.messages_field: conversations are laid out by a chat template; train.init_from must name "
            "a model that has one (an imported instruct model)"
        )
    files = corpus_files(d.paths)
    fp = fingerprint(files)
    if tokenizer is None and cfg.tokenizer.path:
        tokenizer = Tokenizer.from_file(cfg.tokenizer.path)
    if tokenizer is None:
        t = cfg.tokenizer
        trained = t.model_dump_json(exclude={"eot", "bos", "pad", "stop"})
        tdir = cfg.cache_dir / "tokenizers" / _key(fp, trained, *_fields(d), *t.named())
        if (tdir / "tokenizer.json").exists():
            tokenizer = Tokenizer.from_file(str(tdir / "tokenizer.json"))
            say(f"tokenizer: reused {tdir / 'tokenizer.json'}")
        else:
            say(f"tokenizer: training a byte-level BPE of {t.vocab_size} on up to {t.sample_mb:g} MB")
            tokenizer = train_byte_bpe(
                files, t.vocab_size, t.sample_mb, t.min_frequency, d.text_field, d.encoding, d.prompt_field,
                t.eot, t.pad,
            )  # fmt: skip
            tdir.mkdir(parents=True, exist_ok=True)
            tokenizer.save(str(tdir / "tokenizer.json"))
    eot, bos = cfg.tokenizer.eot, cfg.tokenizer.bos
    for token in cfg.tokenizer.special_tokens():
        special_id(tokenizer, token)
    tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    named = cfg.tokenizer.named()
    if d.messages_field is not None:  # another template lays the same records out otherwise
        named += (hashlib.sha256(chat.source.encode()).hexdigest()[:16],)
    folder = cfg.cache_dir / "tokens" / _key(fp, tok_hash, *_fields(d), repr(d.valid), *named)
    if (folder / "meta.json").exists():
        say(f"token files: reused {folder}")
    else:
        say(f"token files: tokenizing {len(files)} file(s) into {folder}")
        stops = {special_id(tokenizer, t) for t in (eot, *cfg.tokenizer.stop)}
        conversations = (d.messages_field, chat, stops) if d.messages_field is not None else None
        tokenize_corpus(
            files,
            tokenizer,
            folder,
            d.valid,
            d.text_field,
            d.encoding,
            d.prompt_field,
            eot,
            bos,
            conversations,
        )
    data = open_tokens(folder)
    if len(data.train) <= cfg.model.context:
        raise DataError(
            f"the corpus has {len(data.train)} training tokens, fewer than one window of model.context "
            f"= {cfg.model.context}; give more text or a shorter context"
        )
    return tokenizer, data


# ----------------------------------------------------------------------------------------- windows


def window_starts(n_tokens: int, count: int, context: int, seed: int) -> np.ndarray:
    """`count` random start offsets of (context + 1)-token windows in a stream of n_tokens."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_tokens - context, size=count)


def windows(
    tokens: np.ndarray, starts: np.ndarray, context: int, mask: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, int64 [len(starts), context] each, read from the token stream;
    with a target mask (a pairs corpus), targets the mask does not mark are IGNORE.

    Both are contiguous (not two strided views of one array): a compiled model specializes on its
    inputs' strides, and the loss flattens the targets.
    """
    rows = np.stack([np.asarray(tokens[s : s + context + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(rows)
    x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
    if mask is not None:
        keep = np.stack([np.asarray(mask[s + 1 : s + context + 1], dtype=bool) for s in starts])
        y = torch.where(torch.from_numpy(keep), y, IGNORE)  # new memory: x may share y's (one row)
    return x, y
