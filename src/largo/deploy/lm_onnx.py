"""A language-model bundle on ONNX Runtime, without torch: generation, continuous batching, sampling.

`largo export LM_BUNDLE --format onnx [--quantize int8]` writes model.onnx (model.int8.onnx) into
the bundle: one decoding step of the GPT with its KV cache as inputs and outputs (see `export_lm.py`
for the graph and its parity checks). This module is what serves it, with onnxruntime, numpy and
tokenizers only (`pip install largo[serve]`):

- `OnnxLM` runs the graph: a prompt's pass, or one step of many rows over their past keys and values;
- `OnnxRows` is the continuous batch (`GPTRows`' contract: `add`, `step`, `remove`, `full`, `clear`,
  `sampler`, `next_tokens`): every row keeps its own positions and its keys and values in buffers the
  graph reads in place (doubling in rows and columns as needed, masked past each row's length);
- `sample_rows_numpy` is `models.layers.sample_rows` in numpy (same inverse-CDF rule and float32
  prefix sums, so the same uniform draws pick the same tokens, up to exact ties of two logits), with
  one `numpy.random.Generator` per request;
- `OnnxTextGenerator` is `TextGenerator` for `largo serve --runtime onnx` and the Python API. A seed
  gives reproducible text on this runtime; it is not the text torch's generator draws for that seed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from largo.deploy.chat import ChatTemplate
from largo.deploy.lm_text import LMText, Sampling, check_sampling
from largo.deploy.metadata import EXPORT_RECORD, BundleError, check_files, read_json, read_task_config
from largo.deploy.runtime import _has_torch
from largo.models.prefill import PromptReader

LM_ONNX_FILE = "model.onnx"
LM_INT8_FILE = "model.int8.onnx"
LM_ONNX_RUNTIMES = {"onnx": LM_ONNX_FILE, "onnx-int8": LM_INT8_FILE}
LM_INPUTS = ("input_ids", "position_ids", "attention_mask", "logits_index")  # then the past, per layer
OUTPUTS = ("logits", "new_key", "new_value")  # new keys and values: [layers, b, heads, new, head_dim]
MIN_TEMPERATURE = 1e-4  # models.layers.MIN_TEMPERATURE


def input_names(layers: int) -> tuple[list[str], list[str]]:
    """The graph's past inputs: (past_key_0.., past_value_0..), one of each per layer."""
    return [f"past_key_{i}" for i in range(layers)], [f"past_value_{i}" for i in range(layers)]


def cpu_session(file: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime session on the CPU with `threads` intra-op threads (default: OMP_NUM_THREADS, else
    ONNX Runtime's own choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0) or 0)
    return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])


class OnnxLM:
    """An exported GPT step on an ONNX Runtime session (CPU, `threads` intra-op threads)."""

    def __init__(self, file: str | Path, threads: int | None = None):
        self.session = cpu_session(file, threads)
        names = [i.name for i in self.session.get_inputs()]
        self.layers = sum(n.startswith("past_key_") for n in names)
        self.keys, self.values = input_names(self.layers)
        self.indexed = "logits_index" in names  # graphs exported before 2026-12-08 give every logit
        inputs = list(LM_INPUTS if self.indexed else LM_INPUTS[:-1])
        if not self.layers or names != [*inputs, *self.keys, *self.values]:
            raise BundleError(f"{file}: not a graph this largo reads; export the bundle again (largo export)")
        shape = self.session.get_inputs()[len(inputs)].shape  # past_key_0: [b, heads, head_dim, past]
        self.heads, self.head_dim = shape[1], shape[2]
        self.vocab = self.session.get_outputs()[0].shape[2]  # logits [b, t, vocab]

    def run(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        mask: np.ndarray,
        keys: list[np.ndarray],
        values: list[np.ndarray],
        every: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits [b, 1, vocab] after the last new token — with `every`, [b, t, vocab] after each —, new
        keys, new values [layers, b, heads, t, head_dim]) of ids [b, t] at positions [b, t] after each
        layer's past keys [b, heads, head_dim, past] (transposed) and values [b, heads, past, head_dim],
        of which mask [b, past] marks each row's own."""
        t = ids.shape[1]
        feed = {"input_ids": ids, "position_ids": positions, "attention_mask": mask}
        if self.indexed:
            feed["logits_index"] = np.arange(t, dtype=np.int64) if every else np.array([t - 1], np.int64)
        feed |= dict(zip(self.keys, keys, strict=True)) | dict(zip(self.values, values, strict=True))
        logits, k, v = self.session.run(None, feed)
        return (logits if every or self.indexed else logits[:, -1:]), k, v

    def read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits after every token [b, t, vocab], new keys, new values) of ids [b, t] read from position
        0, with no past."""
        b, t = ids.shape
        keys = [np.zeros((b, self.heads, self.head_dim, 0), np.float32)] * self.layers
        values = [np.zeros((b, self.heads, 0, self.head_dim), np.float32)] * self.layers
        positions = np.ascontiguousarray(np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)))
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        return self.run(ids, positions, np.ones((b, 0), np.int64), keys, values, every=True)


# ---------------------------------------------------------------------------------------- sampling


def sample_rows_numpy(
    logits: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    uniform: np.ndarray,
) -> np.ndarray:
    """`models.layers.sample_rows` in numpy: next token ids [n] from logits [n, vocab], each row with
    its own temperature (> 0), top_k (0: all), top_p (1: all the mass) and uniform draw in [0, 1)."""
    vocab = logits.shape[-1]
    k_cap = vocab if bool((top_k <= 0).any()) else min(vocab, int(top_k.max()))
    scaled = logits.astype(np.float32) / np.maximum(temperature, MIN_TEMPERATURE).astype(np.float32)[:, None]
    if np.isnan(scaled).any():  # torch's topk ranks NaN first, and sample_rows refuses it
        raise ValueError("the logits to sample from have no finite largest value (NaN, or every one -inf)")
    if k_cap < vocab:
        order = np.argpartition(-scaled, k_cap - 1, axis=-1)[:, :k_cap]
        order = np.take_along_axis(
            order, np.argsort(-np.take_along_axis(scaled, order, -1), -1, kind="stable"), -1
        )
    else:
        order = np.argsort(-scaled, axis=-1, kind="stable")
    values = np.take_along_axis(scaled, order, -1)  # likeliest first
    if not bool(np.isfinite(values[:, 0]).all()):
        raise ValueError("the logits to sample from have no finite largest value (NaN, or every one -inf)")
    limit = np.where(top_k > 0, top_k, vocab)
    weights = np.exp(values - values[:, :1])
    weights[np.arange(k_cap)[None, :] >= limit[:, None]] = 0.0
    cum = _cumsum(weights)
    mass = np.where(top_p[:, None] < 1.0, top_p[:, None] * cum[:, -1:], math.inf)
    weights[cum - weights >= mass] = 0.0
    cum = _cumsum(weights)
    goal = (uniform.astype(np.float32) * cum[:, -1]).astype(np.float32)
    pick = np.array([np.searchsorted(c, g) for c, g in zip(cum, goal, strict=True)]).clip(max=k_cap - 1)
    return order[np.arange(len(order)), pick]


def _cumsum(weights: np.ndarray) -> np.ndarray:
    """Prefix sums as torch's CPU cumsum gives them for float32: accumulated in float64, each rounded to
    float32 (a float32 running total drifts from it over a vocabulary of thousands)."""
    return np.cumsum(weights, -1, dtype=np.float64).astype(np.float32)


def next_tokens_numpy(
    logits: np.ndarray, settings: list[tuple[float, int | None, float | None]], samplers: list[Any]
) -> list[int]:
    """The next token of each row: greedy rows (sampler None) by argmax, the others sampled in one
    `sample_rows_numpy` pass with their (temperature, top_k, top_p) and one draw of their generator."""
    tokens = logits.argmax(-1)
    sampled = [i for i, s in enumerate(samplers) if s is not None]
    if sampled:
        rows = [settings[i] for i in sampled]
        tokens[sampled] = sample_rows_numpy(
            logits[sampled],
            np.array([t for t, _, _ in rows], dtype=np.float32),
            np.array([k or 0 for _, k, _ in rows], dtype=np.int64),
            np.array([1.0 if p is None else p for _, _, p in rows], dtype=np.float32),
            np.array([samplers[i].random(dtype=np.float32) for i in sampled]),
        )
    return [int(t) for t in tokens]


def stream_numpy(
    rows: Any,
    ids: list[int],
    max_new_tokens: int,
    sampling: Sampling,
    seed: int,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` token ids after `ids`, read into the one row of `rows` (an `OnnxRows`
    or its seq2seq kind): greedy at temperature 0, else sampled with `sampling` (temperature, top_k,
    top_p) and a generator seeded `seed`; stops where the row is full. The caller stops at its end
    token (closing the stream: no step is computed past it)."""
    logits = rows.add(ids)[None]
    sampler = rows.sampler(seed) if sampling[0] > 0 else None
    for i in range(max_new_tokens):
        token = next_tokens_numpy(logits, [sampling], [sampler])[0]
        yield token
        if i + 1 == max_new_tokens or rows.full(0):
            return
        logits = rows.step([token])


# ------------------------------------------------------------------------------------------ rows


class OnnxRows:
    """Up to `slots` sequences decoded together on an `OnnxLM`, each at a position of its own (the
    server's continuous batching, as `GPTRows`).

    Keys and values live in buffers the graph reads in place: per layer, keys transposed
    [rows, heads, head_dim, columns] and values [rows, heads, columns, head_dim], row r's tokens in
    its first `lengths[r]` columns (the mask hides the rest). A step passes the live rows' prefix of
    the buffers (contiguous: no copy) and writes each row's new key and value into its next column;
    the columns double when a row needs one more (up to the context), the rows when a request needs a
    row (up to `slots`). A prompt is read alone and copied into its row; a row that leaves gives its
    place to the last row.
    """

    def __init__(self, lm: OnnxLM, slots: int, context: int):
        self.lm, self.slots, self.limit = lm, slots, context
        self._allocate(min(slots, 2), min(context, 32))  # doubled as rows join and grow
        self.lengths: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def _allocate(self, rows: int, columns: int) -> None:
        """Buffers for `rows` rows of `columns` columns, the live rows copied over."""
        lm = self.lm
        k = np.zeros((lm.layers, rows, lm.heads, lm.head_dim, columns), np.float32)
        v = np.zeros((lm.layers, rows, lm.heads, columns, lm.head_dim), np.float32)
        if hasattr(self, "k"):
            n, c = min(self.rows, rows), min(self.k.shape[4], columns)
            k[:, :n, :, :, :c], v[:, :n, :, :c] = self.k[:, :n, :, :, :c], self.v[:, :n, :, :c]
        self.k, self.v = k, v

    def clear(self) -> None:
        """Drop every row (the buffers narrow back to their first width)."""
        self.lengths = []
        self._narrow()

    def _narrow(self) -> None:
        """Halve the columns (down to 32) while the longest live row fills under a quarter of them:
        every step attends over all the columns, so after a long generation leaves, the others should
        not pay for its width (a quarter, not a half, so a row at the edge does not shrink and grow back
        each step)."""
        columns, need = self.k.shape[4], max(self.lengths, default=0) + 1
        narrow = columns
        while narrow > 32 and need <= narrow // 4:
            narrow //= 2
        if narrow < columns:
            self._allocate(self.k.shape[1], narrow)

    def full(self, row: int) -> bool:
        """Whether the row holds the most tokens the model reads."""
        return self.lengths[row] >= self.limit

    def sampler(self, seed: int) -> np.random.Generator:
        """A request's own seeded generator of uniform draws."""
        return np.random.default_rng(seed)

    def next_tokens(self, logits: np.ndarray, settings: list[tuple], samplers: list[Any]) -> list[int]:
        return next_tokens_numpy(logits, settings, samplers)

    def _room(self, rows: int, columns: int) -> None:
        """Grow the buffers (doubling) to hold `rows` rows of `columns` columns."""
        have_rows, have_columns = self.k.shape[1], self.k.shape[4]
        if rows > have_rows or columns > have_columns:
            while have_rows < rows:
                have_rows = min(self.slots, 2 * have_rows)
            while have_columns < columns:
                have_columns = min(self.limit, 2 * have_columns)
            self._allocate(have_rows, have_columns)

    def add(self, ids: list[int]) -> np.ndarray:
        """Read a prompt (1 to context tokens) into the next row → its next-token logits [vocab]."""
        return self.reader(ids).read()

    def reader(self, ids: list[int]) -> PromptReader:
        """The prompt to read in passes (`GPTRows.reader`): each `read(n)` runs the next n tokens after
        the ones read, whose keys and values it keeps; the last copies them into the next row and
        returns its next-token logits [vocab]. The live rows are untouched until then."""
        if not 0 < len(ids) <= self.limit:
            raise ValueError(f"a prompt of 1 to {self.limit} tokens (got {len(ids)})")
        if self.rows >= self.slots:
            raise RuntimeError(f"every one of the {self.slots} rows is taken")
        lm = self.lm
        keys = [np.zeros((1, lm.heads, lm.head_dim, 0), np.float32)] * lm.layers
        values = [np.zeros((1, lm.heads, 0, lm.head_dim), np.float32)] * lm.layers

        def run(tokens: list[int], start: int) -> np.ndarray:
            part = np.array([tokens], dtype=np.int64)
            positions = np.arange(start, start + len(tokens), dtype=np.int64)[None]
            logits, k, v = lm.run(part, positions, np.ones((1, start), np.int64), keys, values)
            for i in range(lm.layers):
                keys[i] = np.concatenate([keys[i], k[i].transpose(0, 1, 3, 2)], -1)
                values[i] = np.concatenate([values[i], v[i]], 2)
            return logits[0, -1]

        def finish() -> None:
            if self.rows >= self.slots:
                raise RuntimeError(f"every one of the {self.slots} rows is taken")
            n, row = len(ids), self.rows
            self._room(row + 1, min(self.limit, n + 1))
            for i in range(lm.layers):
                self.k[i, row, :, :, :n], self.v[i, row, :, :n] = keys[i][0], values[i][0]
            self.k[:, row, :, :, n:], self.v[:, row, :, n:] = 0.0, 0.0  # nothing of a row that left stays
            self.lengths.append(n)

        return PromptReader(ids, run, finish)

    def step(self, tokens: list[int]) -> np.ndarray:
        """Feed one token id per live row (in row order) → next-token logits [rows, vocab]."""
        n = self.rows
        if len(tokens) != n or (n and max(self.lengths) >= self.limit):
            raise ValueError(f"one token per live row ({n}), none of them full (got {len(tokens)})")
        logits, k, v = self._run(tokens, slice(0, n))
        for r, at in enumerate(self.lengths):  # each row's new key and value into its next column
            self.k[:, r, :, :, at] = k[:, r, :, 0]
            self.v[:, r, :, at] = v[:, r, :, 0]
        self.lengths = [at + 1 for at in self.lengths]
        if self.lengths and max(self.lengths) < self.limit:
            self._room(n, max(self.lengths) + 1)  # a column for the next step
        return logits[:, -1]

    def _run(self, tokens: list[int], rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The graph on one new token for each of `rows` (consecutive rows of the buffers, read in
        place), at its row's next position → (logits, new keys, new values)."""
        return self.lm.run(*self._inputs(tokens, rows))

    def _inputs(self, tokens: list[int], rows: slice) -> tuple[Any, ...]:
        """(ids [n, 1], positions [n, 1], past mask [n, columns], each layer's keys, each layer's values)
        of one new token for each of `rows`."""
        lengths = np.array(self.lengths[rows], dtype=np.int64)
        mask = (np.arange(self.k.shape[4])[None, :] < lengths[:, None]).astype(np.int64)
        ids, layers = np.array(tokens, dtype=np.int64)[:, None], range(self.lm.layers)
        keys, values = [self.k[i, rows] for i in layers], [self.v[i, rows] for i in layers]
        return ids, lengths[:, None], mask, keys, values

    def remove(self, row: int) -> None:
        """Free a row; the last row moves into it (the caller mirrors the move)."""
        last = self.rows - 1
        if row != last:
            n = self.lengths[last]
            self.k[:, row, :, :, :n] = self.k[:, last, :, :, :n]
            self.v[:, row, :, :n] = self.v[:, last, :, :n]
            self.lengths[row] = n
        self.lengths.pop()
        self._narrow()


def choose_lm_runtime(path: str | Path, onnx_file: str = LM_ONNX_FILE) -> str:
    """The runtime `--runtime auto` serves an LM (or seq2seq) bundle on: the fastest at the most rows in
    the `benchmark` that `largo export --benchmark` wrote into export.json, among those whose check
    passed (torch's only when torch is installed); without a benchmark torch, or onnx without torch
    (when the bundle has `onnx_file`: a seq2seq bundle's is its decoder.onnx)."""
    record = read_json(Path(path) / EXPORT_RECORD)
    torch_ok = _has_torch()
    measured = (record.get("benchmark") or {}).get("runtimes") or {}
    formats = record.get("formats") or {}
    best, best_speed = None, 0.0
    for name, m in measured.items():
        if (name.startswith("torch") and not torch_ok) or not m.get("parity_passed"):
            continue
        if name.startswith("onnx") and not (formats.get(name) or {}).get("parity", {}).get("passed"):
            continue  # the file's latest check failed
        speed = max(m["tokens_per_s"].items(), key=lambda kv: int(kv[0]))[1]
        if speed > best_speed:
            best, best_speed = name, speed
    if best is not None:
        return best
    if torch_ok:
        return "torch"
    if (Path(path) / onnx_file).exists():
        return "onnx"
    raise BundleError(
        f"{path}: torch is not installed and the bundle has no {onnx_file}; export it where torch is "
        f"(`largo export {path} --format onnx`) or install torch"
    )


# ------------------------------------------------------------------------------------- generator


class OnnxTextGenerator(LMText):
    """An exported LM bundle generating on ONNX Runtime (`runtime` 'onnx' or 'onnx-int8'): the API of
    `TextGenerator` (generate, stream, stream_ids, decode_rows, info) without torch."""

    def __init__(self, path: str | Path, runtime: str = "onnx", threads: int | None = None):
        from largo.config_lm import validate_lm_config

        if runtime not in LM_ONNX_RUNTIMES:
            raise ValueError(f"runtime {runtime!r}: one of {', '.join(LM_ONNX_RUNTIMES)}")
        self.path = Path(path)
        file = LM_ONNX_RUNTIMES[runtime]
        check_files(self.path, ("config.yaml", "tokenizer.json"))
        if not (self.path / file).exists():
            quantize = " --quantize int8" if runtime == "onnx-int8" else ""
            raise BundleError(
                f"{self.path}: no {file}; run `largo export {self.path} --format onnx{quantize}`"
            )
        self.config = read_task_config(self.path, "lm", validate_lm_config)
        self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self.read_special_ids(self.path)
        self.chat_template = ChatTemplate.read(self.path)
        self.runtime, self.device = runtime, "cpu"
        self.lm = OnnxLM(self.path / file, threads)
        self.metrics = read_json(self.path / "metrics.json")

    def decode_rows(self, slots: int) -> OnnxRows:
        """A batch of up to `slots` sequences decoded together (the server's continuous batching)."""
        return OnnxRows(self.lm, slots, self.context)

    def stream_ids(
        self,
        prompt: str,
        max_new_tokens: int = 100,
        temperature: float = 0.8,
        top_k: int | None = 50,
        top_p: float | None = None,
        seed: int | None = 0,
        use_cache: bool = True,
        stop_at_eot: bool = True,
    ) -> Iterator[int]:
        """Yield generated token ids one at a time (the arguments of `TextGenerator.stream_ids`; the
        graph always reads through its cache, so `use_cache` changes nothing)."""
        del use_cache
        check_sampling(max_new_tokens, top_k, top_p)
        sampling, seed = (temperature, top_k, top_p), 0 if seed is None else seed
        for token in stream_numpy(
            self.decode_rows(1), self.prompt_ids(prompt), max_new_tokens, sampling, seed
        ):
            if stop_at_eot and token in self.stops:
                return
            yield token

    def info(self) -> dict[str, Any]:
        """What the bundle holds (`LMText.lm_info`) and the runtime."""
        return {**self.lm_info(self.metrics, self.metrics.get("parameters")), "runtime": self.runtime}
