"""A language-model bundle on ONNX Runtime, without torch: generation, continuous batching, sampling.

`largo export LM_BUNDLE --format onnx [--quantize int8]` writes model.onnx (model.int8.onnx) into
the bundle: one decoding step of the GPT with its KV cache as inputs and outputs (see `export_lm.py`
for the graph and its parity checks). This module is what serves it, with onnxruntime, numpy and
tokenizers only (`pip install largo[serve]`):

- `OnnxLM` runs the graph: a prompt's pass, or one step of many rows through their caches;
- `OnnxRows` is the continuous batch (`GPTRows`' contract: `add`, `step`, `remove`, `full`, `clear`,
  `sampler`, `next_tokens`): every row
  keeps its own positions, its cache columns padded on the left to the longest row's and masked, and
  columns no row uses any more are dropped;
- `sample_rows_numpy` is `models.layers.sample_rows` in numpy (same inverse-CDF rule and float32
  prefix sums, so the same uniform draws pick the same tokens, up to exact ties of two logits), with
  one `numpy.random.Generator` per request;
- `OnnxTextGenerator` is `TextGenerator` for `largo serve --runtime onnx` and the Python API. A seed
  gives reproducible text on this runtime; it is not the text torch's generator draws for that seed.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from largo.deploy.lm_text import LMText, check_sampling
from largo.deploy.metadata import EXPORT_RECORD, BundleError, check_files, read_json, read_task_config

LM_ONNX_FILE = "model.onnx"
LM_INT8_FILE = "model.int8.onnx"
LM_ONNX_RUNTIMES = {"onnx": LM_ONNX_FILE, "onnx-int8": LM_INT8_FILE}
INPUTS = ("input_ids", "position_ids", "attention_mask", "past_key", "past_value")
OUTPUTS = ("logits", "present_key", "present_value")
EOT = "<|endoftext|>"  # data.corpus.EOT (which imports torch)
MIN_TEMPERATURE = 1e-4  # models.layers.MIN_TEMPERATURE


class OnnxLM:
    """An exported GPT step on an ONNX Runtime session (CPU, `threads` intra-op threads)."""

    def __init__(self, file: str | Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0) or 0)
        self.session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        shape = self.session.get_inputs()[INPUTS.index("past_key")].shape  # [layers, b, heads, past, d]
        self.layers, self.heads, self.head_dim = shape[0], shape[2], shape[4]
        self.vocab = self.session.get_outputs()[0].shape[2]  # logits [b, t, vocab]

    def empty(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """A past of no tokens for `rows` rows."""
        shape = (self.layers, rows, self.heads, 0, self.head_dim)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def run(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        mask: np.ndarray,
        past: tuple[np.ndarray, np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits [b, t, vocab], present keys, present values) of one step of the graph."""
        feed = dict(zip(INPUTS, (ids, positions, mask, *past), strict=True))
        logits, k, v = self.session.run(None, feed)
        return logits, k, v

    def read(
        self, ids: np.ndarray, past: tuple[np.ndarray, np.ndarray] | None = None, start: int = 0
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """(logits [b, t, vocab], the present keys and values) of ids [b, t] at positions start.. after a
        past every row shares (None: no past)."""
        b, t = ids.shape
        past = past if past is not None else self.empty(b)
        positions = np.broadcast_to(np.arange(start, start + t, dtype=np.int64), (b, t))
        mask = np.ones((b, past[0].shape[3] + t), dtype=np.int64)
        logits, k, v = self.run(
            np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(positions), mask, past
        )
        return logits, (k, v)


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


# ------------------------------------------------------------------------------------------ rows


class OnnxRows:
    """Up to `slots` sequences decoded together on an `OnnxLM`, each at a position of its own (the
    server's continuous batching, as `GPTRows`).

    The rows share cache columns: row r's tokens are its last `lengths[r]` columns (right-aligned), the
    columns before are padding its mask hides. A prompt is read alone and joins right-aligned (widening
    every row on the left when it is longer than the columns so far); a step appends one column to all;
    a row that leaves gives its place to the last row; columns no row reaches any more are dropped.
    """

    def __init__(self, lm: OnnxLM, slots: int, context: int):
        self.lm, self.slots, self.limit = lm, slots, context
        self.clear()

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def clear(self) -> None:
        """Drop every row."""
        self.k, self.v = self.lm.empty(0)
        self.lengths: list[int] = []

    def full(self, row: int) -> bool:
        """Whether the row holds the most tokens the model reads."""
        return self.lengths[row] >= self.limit

    def sampler(self, seed: int) -> np.random.Generator:
        """A request's own seeded generator of uniform draws."""
        return np.random.default_rng(seed)

    def next_tokens(self, logits: np.ndarray, settings: list[tuple], samplers: list[Any]) -> list[int]:
        return next_tokens_numpy(logits, settings, samplers)

    def add(self, ids: list[int]) -> np.ndarray:
        """Read a prompt (1 to context tokens) into the next row → its next-token logits [vocab]."""
        if not 0 < len(ids) <= self.limit:
            raise ValueError(f"a prompt of 1 to {self.limit} tokens (got {len(ids)})")
        if self.rows >= self.slots:
            raise RuntimeError(f"every one of the {self.slots} rows is taken")
        logits, (k, v) = self.lm.read(np.array([ids], dtype=np.int64))  # k, v: [layers, 1, heads, n, d]
        n, width = len(ids), self.k.shape[3]
        if n > width:  # widen every row on the left
            pad = ((0, 0), (0, 0), (0, 0), (n - width, 0), (0, 0))
            self.k, self.v, width = np.pad(self.k, pad), np.pad(self.v, pad), n
        if n < width:
            pad = ((0, 0), (0, 0), (0, 0), (width - n, 0), (0, 0))
            k, v = np.pad(k, pad), np.pad(v, pad)
        self.k, self.v = np.concatenate([self.k, k], axis=1), np.concatenate([self.v, v], axis=1)
        self.lengths.append(n)
        return logits[0, -1]

    def mask(self) -> np.ndarray:
        """[rows, columns + 1]: 1 on each row's own tokens and on the column the step appends."""
        width = self.k.shape[3]
        first = width - np.array(self.lengths, dtype=np.int64)
        return (np.arange(width + 1)[None, :] >= first[:, None]).astype(np.int64)

    def step(self, tokens: list[int]) -> np.ndarray:
        """Feed one token id per live row (in row order) → next-token logits [rows, vocab]."""
        ids = np.array(tokens, dtype=np.int64)[:, None]
        positions = np.array(self.lengths, dtype=np.int64)[:, None]
        logits, self.k, self.v = self.lm.run(ids, positions, self.mask(), (self.k, self.v))
        self.lengths = [n + 1 for n in self.lengths]
        return logits[:, -1]

    def remove(self, row: int) -> None:
        """Free a row; the last row moves into it (the caller mirrors the move)."""
        last = self.rows - 1
        if row != last:
            self.k[:, row], self.v[:, row] = self.k[:, last], self.v[:, last]
            self.lengths[row] = self.lengths[last]
        self.lengths.pop()
        self.k, self.v = self.k[:, :last], self.v[:, :last]
        drop = self.k.shape[3] - max(self.lengths, default=0)
        if drop:  # columns no row reaches
            self.k, self.v = self.k[:, :, :, drop:], self.v[:, :, :, drop:]
        if not self.lengths:
            self.clear()


def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def choose_lm_runtime(path: str | Path) -> str:
    """The runtime `--runtime auto` serves an LM bundle on: the fastest at the most rows in the
    `benchmark` that `largo export --benchmark` wrote into export.json, among those whose check passed
    (torch's only when torch is installed); without a benchmark torch, or onnx without torch."""
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
    if (Path(path) / LM_ONNX_FILE).exists():
        return "onnx"
    raise BundleError(
        f"{path}: torch is not installed and the bundle has no {LM_ONNX_FILE}; export it where torch is "
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
        eot = self.tokenizer.token_to_id(EOT)
        if eot is None:
            raise BundleError(f"{self.path}: the tokenizer has no {EOT} token")
        self.eot, self.runtime, self.device = eot, runtime, "cpu"
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
        rows = self.decode_rows(1)
        logits = rows.add(self.prompt_ids(prompt))[None]
        sampler = rows.sampler(0 if seed is None else seed) if temperature > 0 else None
        for i in range(max_new_tokens):
            token = next_tokens_numpy(logits, [(temperature, top_k, top_p)], [sampler])[0]
            if stop_at_eot and token == self.eot:
                return
            yield token
            if i + 1 == max_new_tokens or rows.full(0):
                return
            logits = rows.step([token])

    def info(self) -> dict[str, Any]:
        """What the bundle holds: sizes, parameter count, held-out perplexity, the runtime."""
        history = self.metrics.get("history") or []
        return {
            "path": str(self.path),
            "name": self.config.name,
            "task": "lm",
            "runtime": self.runtime,
            "model": self.config.model.model_dump(mode="json"),
            "parameters": self.metrics.get("parameters"),
            "vocab_size": self.tokenizer.get_vocab_size(),
            "valid": self.metrics.get("valid"),
            "steps": history[-1]["step"] if history else None,
        }
