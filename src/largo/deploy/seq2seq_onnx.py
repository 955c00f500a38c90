"""A seq2seq bundle on ONNX Runtime, without torch: beam-search translation, streaming, continuous batching.

`largo export SEQ2SEQ_BUNDLE --format onnx [--quantize int8]` writes two graphs into the bundle (see
`export_seq2seq.py` for how they are made and checked):

    encoder.onnx   source_ids [b, s] int64 (PAD 0 after each source's EOS)
                   → cross_key [layers, b, heads, head_dim, s] (keys transposed), cross_value
                     [layers, b, heads, s, head_dim]: every decoder layer's cross-attention keys and
                     values of the memory, computed once per source
    decoder.onnx   one decoding step: input_ids [b, t], position_ids [b, t], attention_mask [b, past]
                   (1: a column holding this row's token), source_mask [b, s] (1: a real source token),
                   per layer past_key_i / past_value_i (as the language model's graph) and cross_key_i
                   [b, heads, head_dim, s] / cross_value_i [b, heads, s, head_dim]
                   → logits [b, t, vocab], new_key / new_value [layers, b, heads, t, head_dim]

This module serves them with onnxruntime, numpy and tokenizers only (`pip install largo[serve]`):

- `OnnxSeq2Seq` runs the two graphs;
- `OnnxSeq2SeqRows` is the continuous batch (`Seq2SeqRows`' contract), `OnnxRows` with each row's
  memory beside its decoder keys and values; it also holds the rows of a beam search (`add_sources`,
  `reorder`);
- `OnnxTranslator` is `Translator` for `largo serve --runtime onnx`, `largo generate --runtime onnx` and
  `largo.load(path, runtime="onnx")`: beam search by the same bookkeeping as torch's (`models.beams`),
  greedy and sampled streams as `lm_onnx` samples.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from largo.data.pair_text import BOS, EOS, NEVER, PAD, literal_specials
from largo.deploy.lm_onnx import OnnxRows, cpu_session, input_names, stream_numpy
from largo.deploy.lm_text import Sampling
from largo.deploy.metadata import BundleError, check_files, read_json, read_task_config
from largo.deploy.seq2seq_text import Seq2SeqText
from largo.models.beams import Beams, log_softmax, strip_eos
from largo.models.prefill import PromptReader

SEQ2SEQ_ONNX_RUNTIMES = {
    "onnx": ("encoder.onnx", "decoder.onnx"),
    "onnx-int8": ("encoder.int8.onnx", "decoder.int8.onnx"),
}
ENCODER_OUTPUTS = ("cross_key", "cross_value")
DECODER_OUTPUTS = ("logits", "new_key", "new_value")


def decoder_input_names(layers: int) -> list[str]:
    """The decoder graph's inputs, in order."""
    keys, values = input_names(layers)
    cross = [f"cross_key_{i}" for i in range(layers)] + [f"cross_value_{i}" for i in range(layers)]
    return ["input_ids", "position_ids", "attention_mask", "source_mask", *keys, *values, *cross]


class OnnxSeq2Seq:
    """An exported encoder-decoder on two ONNX Runtime sessions (CPU, `threads` intra-op threads)."""

    def __init__(self, folder: str | Path, runtime: str = "onnx", threads: int | None = None):
        encoder, decoder = (Path(folder) / f for f in SEQ2SEQ_ONNX_RUNTIMES[runtime])
        self.encoder, self.decoder = cpu_session(encoder, threads), cpu_session(decoder, threads)
        names = [i.name for i in self.decoder.get_inputs()]
        self.layers = sum(n.startswith("past_key_") for n in names)
        encoder_names = [i.name for i in self.encoder.get_inputs()]
        if not self.layers or names != decoder_input_names(self.layers) or encoder_names != ["source_ids"]:
            raise BundleError(
                f"{folder}: graphs this largo does not read; export the bundle again (largo export)"
            )
        shape = self.decoder.get_inputs()[4].shape  # past_key_0: [b, heads, head_dim, past]
        self.heads, self.head_dim = shape[1], shape[2]
        self.vocab = self.decoder.get_outputs()[0].shape[2]
        self._names = names

    def encode(self, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source ids [b, s] → (cross keys [layers, b, heads, head_dim, s], values [layers, b, heads, s,
        head_dim])."""
        keys, values = self.encoder.run(None, {"source_ids": np.ascontiguousarray(source, dtype=np.int64)})
        return keys, values

    def run(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        mask: np.ndarray,
        source_mask: np.ndarray,
        tensors: list[np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits [b, t, vocab], new keys, new values [layers, b, heads, t, head_dim]) of target ids
        [b, t] at positions [b, t]; `tensors`: every layer's past keys, then past values, cross keys,
        cross values (the graph's input order)."""
        feed = dict(zip(self._names, [ids, positions, mask, source_mask, *tensors], strict=True))
        logits, k, v = self.decoder.run(None, feed)
        return logits, k, v

    def read(self, source: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Teacher-forced logits [b, t, vocab] of target ids [b, t] (BOS first) for sources [b, s], read
        whole with no past."""
        keys, values = self.encode(source)
        b, t = target.shape
        past_k = [np.zeros((b, self.heads, self.head_dim, 0), np.float32)] * self.layers
        past_v = [np.zeros((b, self.heads, 0, self.head_dim), np.float32)] * self.layers
        positions = np.ascontiguousarray(np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)))
        tensors = [*past_k, *past_v, *keys, *values]
        source_mask = (source != PAD).astype(np.int64)
        ids = np.ascontiguousarray(target, dtype=np.int64)
        return self.run(ids, positions, np.ones((b, 0), np.int64), source_mask, tensors)[0]


class OnnxSeq2SeqRows(OnnxRows):
    """Up to `slots` targets decoded together on an `OnnxSeq2Seq`, each at its own position: `OnnxRows`
    (the decoder's keys and values, doubling buffers read in place) with each row's memory — its
    source's cross-attention keys and values, up to `source_length` columns, masked to the source —
    kept in buffers beside them. `add` encodes one source into a new row and returns the logits of its
    first target token; `add_sources` fills rows with a batch of sources (each repeated for beams);
    `reorder` permutes the rows (a beam search's survivors). PAD and BOS get -inf logits."""

    def __init__(self, model: OnnxSeq2Seq, slots: int, context: int, source_length: int):
        self.model, self.source_length = model, source_length
        self.sources: list[int] = []  # each row's source length
        super().__init__(model, slots, context)

    def _allocate(self, rows: int, columns: int) -> None:
        """The decoder's buffers as `OnnxRows` has them; the memory's grow with the rows."""
        super()._allocate(rows, columns)
        if hasattr(self, "mk") and self.mk.shape[1] == rows:
            return
        m, s = self.model, self.source_length
        mk = np.zeros((m.layers, rows, m.heads, m.head_dim, s), np.float32)
        mv = np.zeros((m.layers, rows, m.heads, s, m.head_dim), np.float32)
        if hasattr(self, "mk"):
            n = min(len(self.sources), rows)
            mk[:, :n], mv[:, :n] = self.mk[:, :n], self.mv[:, :n]
        self.mk, self.mv = mk, mv

    def _run(self, tokens: list[int], rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, positions, mask, keys, values = self._inputs(tokens, rows)
        sources = np.array(self.sources[rows], dtype=np.int64)
        source_mask = (np.arange(self.source_length)[None, :] < sources[:, None]).astype(np.int64)
        layers = range(self.model.layers)
        memory = [self.mk[i, rows] for i in layers] + [self.mv[i, rows] for i in layers]
        logits, k, v = self.model.run(ids, positions, mask, source_mask, keys + values + memory)
        logits[..., NEVER] = -math.inf
        return logits, k, v

    def add_sources(self, sources: list[list[int]], repeat: int = 1) -> np.ndarray:
        """Encode sources (1 to source_length ids each, EOS last) in one pass into the next rows, each
        `repeat` times in a row (a beam search's rows) → the logits [rows added, vocab] of their first
        target tokens."""
        if not sources or any(not 0 < len(ids) <= self.source_length for ids in sources):
            raise ValueError(f"sources of 1 to {self.source_length} tokens each")
        start, n = self.rows, len(sources) * repeat
        if start + n > self.slots:
            raise RuntimeError(f"{n} more rows do not fit in {self.slots} (taken: {start})")
        width = max(len(ids) for ids in sources)
        batch = np.zeros((len(sources), width), np.int64)
        for i, ids in enumerate(sources):
            batch[i, : len(ids)] = ids
        keys, values = self.model.encode(batch)
        self._room(start + n, min(self.limit, 2))
        rows = slice(start, start + n)
        self.mk[:, rows], self.mv[:, rows] = 0.0, 0.0  # nothing of a row that left stays
        self.mk[:, rows, :, :, :width] = np.repeat(keys, repeat, axis=1)
        self.mv[:, rows, :, :width] = np.repeat(values, repeat, axis=1)
        self.k[:, rows], self.v[:, rows] = 0.0, 0.0
        self.sources += [len(ids) for ids in sources for _ in range(repeat)]
        self.lengths += [0] * n
        try:
            logits, k, v = self._run([BOS] * n, rows)  # BOS at position 0, over no past
        except BaseException:  # the rows that were there stay as they were
            del self.sources[start:], self.lengths[start:]
            raise
        self.k[:, rows, :, :, 0], self.v[:, rows, :, 0] = k[:, :, :, 0], v[:, :, :, 0]
        self.lengths[rows] = [1] * n
        return logits[:, -1]

    def add(self, ids: list[int]) -> np.ndarray:
        """Encode a source (1 to source_length ids, EOS last) into the next row → the logits [vocab] of
        its target's first token."""
        if self.rows >= self.slots:
            raise RuntimeError(f"every one of the {self.slots} rows is taken")
        return self.add_sources([ids])[0]

    def reader(self, ids: list[int]) -> PromptReader:
        """`add` as the decode loop reads prompts: a source is encoded in one pass."""
        return PromptReader.at_once(ids, self.add)

    def remove(self, row: int) -> None:
        """Free a row; the last row moves into it (the caller mirrors the move)."""
        last = self.rows - 1
        if row != last:
            self.mk[:, row], self.mv[:, row] = self.mk[:, last], self.mv[:, last]
            self.sources[row] = self.sources[last]
        self.sources.pop()
        super().remove(row)

    def clear(self) -> None:
        self.sources = []
        super().clear()

    def reorder(self, index: np.ndarray, memory: bool = True) -> None:
        """Row r takes what row index[r] holds, for every live row (a beam search's survivors; its beams
        of one source share their memory, so it passes `memory=False` and only the decoder's keys and
        values move). Only the columns in use are copied."""
        n, used = self.rows, max(self.lengths, default=0)
        self.k[:, :n, :, :, :used] = self.k[:, index, :, :, :used]
        self.v[:, :n, :, :used] = self.v[:, index, :, :used]
        if memory:
            self.mk[:, :n], self.mv[:, :n] = self.mk[:, index], self.mv[:, index]
            self.sources = [self.sources[i] for i in index]
        self.lengths = [self.lengths[i] for i in index]


def search_numpy(
    rows: OnnxSeq2SeqRows,
    sources: list[list[int]],
    max_new_tokens: int,
    beams: int,
    length_penalty: float,
) -> list[list[int]]:
    """The best target ids of each source by beam search on ONNX Runtime (`models.beams`, as torch's
    `beam_search`), greedy with one beam, in `rows` (empty, len(sources) · beams slots); at most
    `max_new_tokens` and never more than the rows' context."""
    steps = min(max_new_tokens, rows.limit)
    logits = rows.add_sources(sources, beams)
    if beams == 1:
        out: list[list[int]] = [[] for _ in sources]
        done = np.zeros(len(sources), bool)
        for step in range(steps):
            tokens = logits.argmax(-1)
            for i in np.flatnonzero(~done):
                out[i].append(int(tokens[i]))
            done |= tokens == EOS
            if done.all() or step + 1 == steps:
                break
            logits = rows.step(tokens.tolist())
        return [strip_eos(row) for row in out]
    search = Beams(len(sources), beams, steps, length_penalty)
    while not search.over:
        top, index = search.top(log_softmax(logits))
        order = search.advance(top, index, logits.shape[-1])
        if search.over:
            break
        rows.reorder(order, memory=False)  # a source's beams stay in its rows: the same memory
        logits = rows.step(search.tokens.tolist())
    return search.best()


class OnnxTranslator(Seq2SeqText):
    """An exported seq2seq bundle on ONNX Runtime (`runtime` 'onnx' or 'onnx-int8'): the API of
    `Translator` (translate, beam_ids, generate, stream, stream_ids, decode_rows, info) without torch."""

    def __init__(self, path: str | Path, runtime: str = "onnx", threads: int | None = None):
        from largo.config_seq2seq import validate_seq2seq_config

        if runtime not in SEQ2SEQ_ONNX_RUNTIMES:
            raise ValueError(f"runtime {runtime!r}: one of {', '.join(SEQ2SEQ_ONNX_RUNTIMES)}")
        self.path = Path(path)
        self.config = read_task_config(self.path, "seq2seq", validate_seq2seq_config)
        check_files(self.path, ("tokenizer.json",))
        missing = [f for f in SEQ2SEQ_ONNX_RUNTIMES[runtime] if not (self.path / f).exists()]
        if missing:
            quantize = " --quantize int8" if runtime == "onnx-int8" else ""
            command = f"largo export {self.path} --format onnx{quantize}"
            raise BundleError(f"{self.path}: no {', '.join(missing)}; run `{command}`")
        self.tokenizer = literal_specials(Tokenizer.from_file(str(self.path / "tokenizer.json")))
        self.runtime, self.device = runtime, "cpu"
        self.model = OnnxSeq2Seq(self.path, runtime, threads)
        self.metrics = read_json(self.path / "metrics.json")
        self._rows: dict[int, list[OnnxSeq2SeqRows]] = {}  # beam-search rows kept by their slots
        self._lock = threading.Lock()

    @property
    def target_context(self) -> int:
        """The most target tokens the decoder reads (BOS included)."""
        return self.config.model.context

    def decode_rows(self, slots: int) -> OnnxSeq2SeqRows:
        """A batch of up to `slots` sources decoded together (the server's continuous batching)."""
        return OnnxSeq2SeqRows(self.model, slots, self.target_context, self.context)

    def search(
        self, sources: list[list[int]], max_new_tokens: int, beams: int, length_penalty: float
    ) -> list[list[int]]:
        """The best target ids of each source by beam search on ONNX Runtime (`search_numpy`), in rows
        kept for the next batch of the same size (their buffers are not allocated and touched anew)."""
        slots = len(sources) * beams
        with self._lock:
            spare = self._rows.get(slots) or []
            rows = spare.pop() if spare else self.decode_rows(slots)
        try:
            return search_numpy(rows, sources, max_new_tokens, beams, length_penalty)
        finally:
            rows.clear()
            with self._lock:
                kept = self._rows.setdefault(slots, [])
                if len(kept) < 2:  # a few at most: concurrent searches (the server's beam threads)
                    kept.append(rows)

    def sample_ids(self, ids: list[int], max_new_tokens: int, sampling: Sampling, seed: int) -> Iterator[int]:
        """Target ids of one source decoded in a row of its own (`lm_onnx.stream_numpy`: numpy sampling
        with a generator seeded `seed`)."""
        return stream_numpy(self.decode_rows(1), ids, max_new_tokens, sampling, seed)

    def info(self) -> dict[str, Any]:
        """What the bundle holds: sizes, parameter count, test scores, the runtime."""
        return {
            "path": str(self.path),
            "name": self.config.name,
            "task": "seq2seq",
            "runtime": self.runtime,
            "model": self.config.model.model_dump(mode="json"),
            "parameters": self.metrics.get("parameters"),
            "vocab_size": self.tokenizer.get_vocab_size(),
            "test": self.metrics.get("test"),
            "decode": self.config.decode.model_dump(mode="json"),
        }
