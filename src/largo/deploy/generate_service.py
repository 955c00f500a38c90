"""Serve a language-model bundle: `create_generate_app()`, POST /generate answered as JSON or streamed.

Protocol. POST /generate takes a JSON body (`GenerateRequest`; every field but `prompt` is optional):
    {"prompt": "从前", "max_new_tokens": 100, "temperature": 0.8, "top_k": 50, "top_p": null,
     "seed": null, "stop_at_eot": true, "stream": null}
  A model with a chat template (an imported instruct model) takes `messages` instead of `prompt`:
    {"messages": [{"role": "user", "content": "你好"}], ...}, laid out by the template with the
  assistant's turn opened (`LMText.chat_prompt`); the rendered prompt is what is logged.
- Streamed when `stream` is true, or when it is left out and the request says `Accept: text/event-stream`:
  a `text/event-stream` answer (server-sent events) with one `token` event per piece of text as it is
  generated and one `done` event at the end, whose `text` is all the pieces joined:
      event: token
      data: {"text": " upon"}

      event: done
      data: {"id": "…", "text": " upon a time", "tokens": 4, "finish_reason": "length", "prompt_tokens": 2,
             "prompt_truncated": false, "seed": 1234, "version": null}
  A model error before the first piece is a plain 500 with an error id; one after it (the status line
  is sent) is an `event: error` with `{"detail", "error_id"}`, and the stream ends.
- Otherwise the `done` event's object, as JSON.
`finish_reason` is "stop" (the end-of-text token), "length" (max_new_tokens, or the context is full) or
"cancelled" (the client went away; seen only in /metrics). A prompt longer than the context keeps its
last `context - 1` tokens, as `TextGenerator` does, and says so (`prompt_truncated`); that is not an
error. `seed: null` draws a seed per request and answers it: sending it back gives the same text.
`version` is the registered version that generated it (null for a bundle served from its folder).

Logging and swapping, as on /predict: every finished generation (a cancelled one too; not one that
failed) is one row for the sink, `{id, time, inputs: {prompt, max_new_tokens, temperature, top_k, top_p,
seed, stop_at_eot}, outputs: {text, tokens, finish_reason, prompt_tokens}, latency_ms}` and `version`
when a registered version serves, written before the `done` event is sent: by the decode loop's thread,
the rows of a step in one `log_predictions` call (a slow sink slows every running generation), or by a
worker thread (so the sink must be thread-safe) (default sink: `JsonlSink(<bundle>/serving)`;
`largo serve NAME` writes to the store). `GenerateService.swap(generator, version)` serves another
language model from the next admitted request on; generations already running finish on the model they
started with.

Feedback: POST /feedback `{"prediction_id": "<a generation's id>", "rating": "good" | "bad",
"completion": "what the model should have written after the prompt"}` (either or both) goes to the
sink's `log_feedback` as `{prediction_id, output: "text", label: {rating, completion}, predicted: the
generated text, time}`; an id this server did not generate (nor, with a store, this model) is 404.
`largo feedback export NAME` turns a registered model's feedback into a corpus to fine-tune on.

Limits, as on /predict: a body over `max_body_bytes` is 413, a missing or wrong API key 401, a bad field
422 naming it (a `max_new_tokens` over the server's `max_new_tokens_limit` too). At most
`max_concurrent` generations run, and at most `max_queued` wait for a slot; one more, or one that waited
`queue_timeout_s`, is 503 with Retry-After. A client that disconnects stops its generation at the next
token. On shutdown uvicorn lets in-flight generations finish (its graceful timeout), then the lifespan
stops the threads.

Continuous batching: the running generations are rows of one batch, decoded together in one thread
(`decode_loop.DecodeLoop`: one forward pass per step for all of them; a request joins between two steps
and leaves the step it is done), so N concurrent generations cost about one forward pass per token
rather than N (`bench/generate_serve.py`). A beam search, or a generator without `decode_rows` (or
`batching=False`), runs in a worker thread per generation instead. Either way torch (or ONNX Runtime)
releases the GIL, so the event loop keeps serving, and pieces come back through an asyncio queue with
`call_soon_threadsafe`.

Torch-free at import, like server.py: the generator is any object shaped like `TextGenerator`
(`stream_ids`, `encode`, `eot`, `stops`, `tokenizer`, `context`, `config.name`, `path`, `info()`, and
`decode_rows` to batch), and only `load_generator()` imports torch, unless it loads an exported LM on
ONNX Runtime (`lm_onnx.OnnxTextGenerator`, `--runtime onnx`), which needs none.

A seq2seq bundle is served the same way by its `Translator` (`seq2seq_onnx.OnnxTranslator` on ONNX
Runtime, torch-free too): the prompt is the source, the text is its
target (greedy unless the request names a temperature; the end-of-sequence token stops it, and a
source longer than `context` keeps its start). `"beams": N` asks it for beam search instead: the text
comes whole when the search ends (one `token` event when streamed), as `largo predict` writes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, StreamingResponse

from largo.deploy.generate_request import GenerateRequest, GenerationFeedback, checked_request
from largo.deploy.lm_text import text_pieces
from largo.deploy.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Histogram, ServerMetrics
from largo.deploy.middleware import BodyLimit, NumpyJSONResponse, RequestMetrics
from largo.deploy.page import render_lm_page
from largo.deploy.server import MiB, ModelError, add_error_handlers, find_served, key_check
from largo.deploy.sink import JsonlSink

log = logging.getLogger("largo.server")
TOKEN_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
LM_RUNTIMES = ("auto", "torch", "torch-bf16", "onnx", "onnx-int8")  # LM and seq2seq bundles alike
BEAM_THREADS = 4  # beam searches at once beside a decode loop (each a worker thread)
LM_RECENT_IDS = 10_000  # generations remembered, with their text, for /feedback (a store looks up older ones)


def generate_app_options(options: dict[str, Any]) -> dict[str, Any]:
    """The server options that `create_generate_app` takes, from those of `create_app`: `max_batch`
    (most records per forward pass) is the most generations decoded together, `max_concurrent`; a
    generation joins the running batch at once, so there is no `max_wait_ms` to wait for one to fill."""
    out = {k: v for k, v in options.items() if k not in ("max_batch", "max_wait_ms")}
    if "max_batch" in options:
        out["max_concurrent"] = options["max_batch"]
    return out


def load_generator(path: str | Path, runtime: str = "auto", device: str = "auto") -> Any:
    """An LM bundle's `TextGenerator` (a seq2seq bundle's `Translator`) to serve: fp32 weights (bf16
    weights and KV cache for torch-bf16), on `device` as `predictor.serving_device` reads it (auto: the
    GPU if there is one); runtime onnx / onnx-int8 (a bundle exported with `largo export`) gives an
    `OnnxTextGenerator` (an `OnnxTranslator`), which needs no torch at all. `auto` is the fastest
    runtime that `largo export --benchmark` measured (`lm_onnx.choose_lm_runtime`), torch on a GPU."""
    from largo.deploy.metadata import is_seq2seq_bundle

    seq2seq = is_seq2seq_bundle(path)
    if runtime not in LM_RUNTIMES:
        what = "a seq2seq" if seq2seq else "a language"
        raise ValueError(f"runtime {runtime!r}: {what} model serves on {', '.join(LM_RUNTIMES)}")
    if runtime == "auto":
        from largo.deploy.lm_onnx import LM_ONNX_FILE, choose_lm_runtime
        from largo.deploy.runtime import _has_torch

        runtime = choose_lm_runtime(path, "decoder.onnx" if seq2seq else LM_ONNX_FILE)
        if runtime != "torch" and device != "cpu" and _has_torch():  # the benchmark ran on the CPU
            from largo.deploy.predictor import serving_device

            if serving_device(device).type == "cuda":
                runtime = "torch"
    if runtime.startswith("onnx"):
        if device not in ("auto", "cpu"):
            raise ValueError(f"device {device!r}: ONNX Runtime serves on the CPU here; a GPU serves torch")
        if seq2seq:
            from largo.deploy.seq2seq_onnx import OnnxTranslator

            return OnnxTranslator(path, runtime)
        from largo.deploy.lm_onnx import OnnxTextGenerator

        return OnnxTextGenerator(path, runtime)
    from largo.deploy.generator import TextGenerator
    from largo.deploy.predictor import serving_device
    from largo.deploy.translator import Translator

    precision = "bf16" if runtime == "torch-bf16" else "fp32"
    kind = Translator if seq2seq else TextGenerator
    return kind.load(path, precision=precision, device=serving_device(device))


def runtime_of(generator: Any) -> str:
    """What a generator runs on: onnx / onnx-int8, else torch or torch-bf16 (its weights' precision)."""
    runtime = getattr(generator, "runtime", None)
    if runtime is None:
        runtime = "torch-bf16" if getattr(generator, "precision", "fp32") == "bf16" else "torch"
    return runtime


def default_temperature(generator: Any) -> float:
    """The temperature a request that names none gets: the generator's `default_temperature` (a
    `TextGenerator`: 0.8; a seq2seq `Translator`: 0, greedy)."""
    return float(getattr(generator, "default_temperature", 0.8))


# ------------------------------------------------------------------------------------ a generation


@dataclass(eq=False)
class Generation:
    """One admitted request: its settings, the queue its events come back on, and its tallies.

    The worker thread writes the tallies; the event loop reads them only once the thread is done.
    """

    settings: GenerateRequest
    seed: int
    loop: asyncio.AbstractEventLoop
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # (kind, value): token | done | error
    cancel: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    ended: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str = "length"
    version: int | None = None  # the registered version generating it (set when it starts)
    on_done: Callable[[Generation, dict[str, Any]], None] | None = None  # in the worker, before "done"
    outbox: list | None = None  # the decode loop's: events wait there to go over in one call per step
    stream: bool = True  # False: a JSON answer, which needs no token events (nor the loop's wake-ups)

    def push(self, kind: str, value: Any) -> None:
        """From the worker thread: hand one event to the event loop (a closed loop: stop generating)."""
        if kind == "token" and not self.stream:
            return
        if self.outbox is not None:
            self.outbox.append((self, kind, value))
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:
            self.cancel.set()


def run_generation(generator: Any, job: Generation) -> None:
    """In a worker thread: generate, pushing ("token", piece) events, then ("done", summary) or ("error", e).
    A finished generation is handed to `job.on_done` (the service logs and remembers it) before "done".

    Pieces are cut by `text_pieces`, as `TextGenerator.stream` cuts them (never inside a multi-byte
    character), so they join to `TextGenerator.generate`'s text; the end-of-text token is looked for
    here rather than inside `stream_ids`, so that a stop and a full length are told apart.
    """
    s = job.settings
    sampling = {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "seed": job.seed}

    def generated() -> Iterator[int]:
        if (s.beams or 1) > 1:  # a seq2seq beam search: its tokens come at once, then its end
            found = generator.beam_ids(s.prompt, s.max_new_tokens, s.beams)
            yield from found
            if len(found) < s.max_new_tokens:
                yield generator.eot
            return
        yield from generator.stream_ids(s.prompt, s.max_new_tokens, stop_at_eot=False, **sampling)

    def tokens() -> Iterator[int]:
        ids = generated()
        with contextlib.closing(ids):
            for token in ids:
                if s.stop_at_eot and token in generator.stops:
                    job.finish_reason = "stop"
                    return
                if job.cancel.is_set():  # the client left: no more forward passes
                    job.finish_reason = "cancelled"
                    return
                job.tokens += 1
                job.first_token = job.first_token or time.perf_counter()
                yield token

    try:
        job.prompt_tokens, truncated = generator.prompt_tokens(s.prompt)
        pieces: list[str] = []
        for piece in text_pieces(tokens(), generator.tokenizer):
            pieces.append(piece)
            job.push("token", piece)
        end_generation(job, "".join(pieces), truncated)
    except Exception as exc:  # noqa: BLE001 - answered as a model error; the server keeps serving
        job.push("error", exc)
    finally:
        job.ended = job.ended or time.perf_counter()


def end_generation(job: Generation, text: str, truncated: bool) -> None:
    """A finished generation: its summary to `job.on_done` (logging), then the "done" event."""
    summary = {
        "id": job.id,
        "text": text,
        "tokens": job.tokens,
        "finish_reason": job.finish_reason,
        "prompt_tokens": job.prompt_tokens,
        "prompt_truncated": truncated,
        "seed": job.seed,
        "version": job.version,
    }
    job.ended = time.perf_counter()
    if job.on_done is not None:
        job.on_done(job, summary)
    job.push("done", summary)


def log_generations(sink: Any, done: list[tuple[Generation, dict[str, Any]]]) -> None:
    """The rows of finished generations for the sink, in one call (see the module doc); a sink that fails
    is logged, not raised."""
    try:
        sink.log_predictions([generation_row(job, summary) for job, summary in done])
    except Exception:  # noqa: BLE001 - a full disk must not stop generating
        log.exception("the sink failed to log generations %s", ", ".join(job.id for job, _ in done))


def generation_row(job: Generation, summary: dict[str, Any]) -> dict[str, Any]:
    """One generation's logged row."""
    s = job.settings
    inputs = {"prompt": s.prompt, "max_new_tokens": s.max_new_tokens, "temperature": s.temperature}
    inputs |= {"top_k": s.top_k, "top_p": s.top_p, "seed": job.seed, "stop_at_eot": s.stop_at_eot}
    if s.beams is not None:
        inputs["beams"] = s.beams
    row = {
        "id": job.id,
        "time": time.time(),
        "inputs": inputs,
        "outputs": {k: summary[k] for k in ("text", "tokens", "finish_reason", "prompt_tokens")},
        "latency_ms": round(((job.ended or time.perf_counter()) - job.arrived) * 1000, 3),
    }
    if job.version is not None:
        row["version"] = job.version
    return row


def _event(kind: str, data: dict[str, Any]) -> str:
    """One server-sent event (JSON data is one line: json.dumps escapes newlines)."""
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


# --------------------------------------------------------------------------------------- metrics


class GenerationMetrics(ServerMetrics):
    """The request metrics of every server, plus generated tokens, time to first token, tokens per second
    and the running and queued generations."""

    def __init__(self, active: Callable[[], int], queued: Callable[[], int]):
        super().__init__(queued)
        self.active = active
        self.tokens = 0
        self.finished: Counter[str] = Counter()
        self.first_token = Histogram(LATENCY_BUCKETS)
        self.token_rate = Histogram(TOKEN_RATE_BUCKETS)
        self.decode_rows = Histogram(BATCH_BUCKETS)
        self.decode_seconds = Histogram(LATENCY_BUCKETS)

    def observe_step(self, rows: int, seconds: float) -> None:
        """One batched decode step over `rows` generations (from the decode loop's thread)."""
        self.decode_rows.observe(rows)
        self.decode_seconds.observe(seconds)

    def observe_generation(self, job: Generation) -> None:
        """One finished generation (called in the event loop once its thread is done)."""
        self.tokens += job.tokens
        self.finished[job.finish_reason] += 1
        if job.first_token is not None:
            self.first_token.observe(job.first_token - job.arrived)  # the queue wait and the prompt's pass
            if job.tokens > 1 and job.ended is not None and job.ended > job.first_token:
                self.token_rate.observe((job.tokens - 1) / (job.ended - job.first_token))

    def render(self) -> str:
        """Requests, errors, latency, then the generation metrics (Prometheus text)."""
        out = self.request_lines()
        out += [
            "# HELP largo_generated_tokens_total Tokens generated.",
            "# TYPE largo_generated_tokens_total counter",
            f"largo_generated_tokens_total {self.tokens}",
            "# HELP largo_generations_total Finished generations, by finish reason.",
            "# TYPE largo_generations_total counter",
        ]
        out += [
            f'largo_generations_total{{finish_reason="{r}"}} {n}' for r, n in sorted(self.finished.items())
        ]
        out += self.first_token.block(
            "largo_time_to_first_token_seconds", "Request to first token, queue wait included."
        )
        out += self.token_rate.block(
            "largo_tokens_per_second", "Tokens per second after the first, per generation."
        )
        out += self.decode_rows.block(
            "largo_decode_batch_size", "Generations per batched decode step (continuous batching)."
        )
        out += self.decode_seconds.block("largo_decode_step_seconds", "Seconds per batched decode step.")
        out += [
            "# HELP largo_generations_active Generations running now.",
            "# TYPE largo_generations_active gauge",
            f"largo_generations_active {self.active()}",
            "# HELP largo_generations_queued Generations waiting for a slot.",
            "# TYPE largo_generations_queued gauge",
            f"largo_generations_queued {self.queue_depth()}",
        ]
        return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------- service


class GenerateService:
    """What the LM routes do: admit (bounded slots and queue), run in worker threads, stream, count."""

    def __init__(
        self,
        generator: Any,
        *,
        max_new_tokens_limit: int,
        max_concurrent: int,
        max_queued: int,
        queue_timeout_s: float,
        name: str | None = None,
        version: int | None = None,
        sink: Any = None,
        batching: bool = True,
        prefill_chunk: int | None = None,
    ):
        if max_new_tokens_limit < 1 or max_concurrent < 1 or max_queued < 0 or queue_timeout_s <= 0:
            raise ValueError(
                "max_new_tokens_limit and max_concurrent must be >= 1, max_queued >= 0, queue_timeout_s > 0"
            )
        self.generator, self.version, self.sink = generator, version, sink
        self.name = name or generator.config.name
        self.parameters = generator.info().get("parameters")
        self.task = generator.info().get("task", "lm")  # a swap keeps it: the registry holds one task a name
        self._swap_lock = threading.Lock()
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()  # generation id → its outputs
        self._recent_lock = threading.Lock()  # written by the workers, read by /feedback
        self.limit, self.max_concurrent, self.max_queued = max_new_tokens_limit, max_concurrent, max_queued
        self.queue_timeout_s = queue_timeout_s
        self.active = self.queued = 0  # touched in the event loop only
        self.slots = asyncio.Semaphore(max_concurrent)
        self.running: dict[str, Generation] = {}
        self.metrics = GenerationMetrics(lambda: self.active, lambda: self.queued)
        self.batching, self.prefill_chunk = batching, prefill_chunk
        self.decoder = self._new_decoder(generator)
        self.retired: list[Any] = []  # decode loops of swapped-out models, finishing their generations
        self.stopping = False
        # worker threads: every generation without batching; with it only beam searches, a few at a time
        workers = max_concurrent if self.decoder is None else min(max_concurrent, BEAM_THREADS)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="largo-generate")

    def _new_decoder(self, generator: Any) -> Any:
        """The continuous-batching loop for `generator` (None: one worker thread per generation, for a
        generator without `decode_rows` or with batching off)."""
        if not self.batching or not hasattr(generator, "decode_rows"):
            return None
        from largo.deploy.decode_loop import DecodeLoop

        return DecodeLoop(
            generator, self.max_concurrent, self._ended_elsewhere, self._done_many, self.metrics.observe_step,
            self.prefill_chunk,
        )  # fmt: skip

    def swap(self, generator: Any, version: int | None = None) -> None:
        """Serve `generator` (already loaded) for every request admitted from now on; generations that
        are running finish on the model they started with. Safe to call from any thread. Any language
        model may follow any other: a generation needs nothing of the served model but itself."""
        parameters = generator.info().get("parameters")
        decoder = self._new_decoder(generator)
        with self._swap_lock:
            old = self.decoder
            self.generator, self.version, self.parameters = generator, version, parameters
            self.decoder = decoder
        if old is not None:
            old.close()  # its generations finish on the old model, then its thread stops
            self.retired = [d for d in self.retired if d.thread.is_alive()] + [old]
        log.info("now serving %s version %s from %s", self.name, version, generator.path)

    async def generate(self, body: GenerateRequest, request: Request) -> Any:
        """Continue a prompt: JSON, or server-sent events as the tokens come (protocol: the module doc)."""
        body = checked_request(body, self.generator, self.task, self.limit)
        accept = request.headers.get("accept", "")
        stream = body.stream if body.stream is not None else "text/event-stream" in accept
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        if body.temperature is None:  # the served model's default, written into the logged row too
            body = body.model_copy(update={"temperature": default_temperature(self.generator)})
        await self._admit()
        job = Generation(body, seed, asyncio.get_running_loop(), stream=stream)
        self._start(job)
        if not stream:  # no token events come: only "done" or "error"
            return await self._collect(job, request)
        try:
            first = await job.events.get()  # waited for here, so an error in the prompt's pass is a 500
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        if first[0] == "error":
            raise self._model_error(first[1], job)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
        return StreamingResponse(self._sse(job, first), media_type="text/event-stream", headers=headers)

    async def _admit(self) -> None:
        """Take a generation slot, waiting in the bounded queue; 503 when it is full or the wait too long."""
        if self.active + self.queued >= self.max_concurrent + self.max_queued:
            raise _busy(f"busy: {self.active} generations running and {self.queued} queued")
        self.queued += 1
        try:
            await asyncio.wait_for(self.slots.acquire(), self.queue_timeout_s)
        except TimeoutError:
            raise _busy(f"no generation slot came free in {self.queue_timeout_s:g} s") from None
        finally:
            self.queued -= 1
        self.active += 1

    def _start(self, job: Generation) -> None:
        """Hand the job to the decode loop (a beam search, or a generator that cannot batch: to a worker
        thread); its slot is given back when it has sent its last event, not before."""
        job.on_done = self._done
        with self._swap_lock:  # the model, its version and its loop, read together
            if self.stopping:
                self._release()
                raise _busy("the server is shutting down")
            generator, job.version = self.generator, self.version
            if self.decoder is not None and (job.settings.beams or 1) == 1:
                self.running[job.id] = job
                self.decoder.submit(job)  # under the lock: a swap closes this loop only after it
                return
        try:
            future = job.loop.run_in_executor(self.pool, run_generation, generator, job)
        except RuntimeError:  # the pool is shut down: the server is stopping
            self._release()
            raise _busy("the server is shutting down") from None
        self.running[job.id] = job
        future.add_done_callback(lambda f: self._finished(job, f))

    def _done(self, job: Generation, summary: dict[str, Any]) -> None:
        """In the worker, before the "done" event: log the generation and remember it for /feedback."""
        self._done_many([(job, summary)])

    def _done_many(self, done: list[tuple[Generation, dict[str, Any]]]) -> None:
        """`_done` for the generations a decode step finished: one sink call for all their rows."""
        log_generations(self.sink, done)
        with self._recent_lock:
            for job, summary in done:
                self.recent[job.id] = {"text": summary["text"]}
            while len(self.recent) > LM_RECENT_IDS:
                self.recent.popitem(last=False)

    async def feedback(self, body: GenerationFeedback) -> dict[str, Any]:
        """Store a rating and/or a better completion for a generation (through the sink)."""
        pid = str(body.prediction_id)
        with self._recent_lock:
            remembered = self.recent.get(pid)
        served = await find_served(pid, remembered, self.sink, "generation")
        row = {
            "prediction_id": pid,
            "output": "text",
            "label": {"rating": body.rating, "completion": body.completion},
            "predicted": served.get("text"),
            "time": time.time(),
        }
        await asyncio.to_thread(self.sink.log_feedback, row)
        return {"status": "stored", **row}

    def _finished(self, job: Generation, future: Future) -> None:
        self._ended(job, not future.cancelled() and future.exception() is None)

    def _ended(self, job: Generation, ok: bool) -> None:
        """In the event loop, once a generation sent its last event: free its slot, count it."""
        self.running.pop(job.id, None)
        self._release()
        if ok:
            self.metrics.observe_generation(job)

    def _ended_elsewhere(self, job: Generation, ok: bool) -> None:
        """`_ended`, called from the decode loop's thread."""
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the server has stopped
            job.loop.call_soon_threadsafe(self._ended, job, ok)

    def _release(self) -> None:
        self.active -= 1
        self.slots.release()

    async def _sse(self, job: Generation, event: tuple[str, Any]) -> AsyncIterator[str]:
        """The events as server-sent events, starting with the one already taken off the queue."""
        try:
            while True:
                kind, value = event
                if kind == "token":
                    yield _event("token", {"text": value})
                elif kind == "done":
                    yield _event("done", value)
                    return
                else:
                    error = self._model_error(value, job)
                    yield _event("error", {"detail": str(error), "error_id": error.error_id})
                    return
                event = await job.events.get()
        finally:
            job.cancel.set()  # Starlette cancels this generator when the client goes: stop at the next token

    async def _collect(self, job: Generation, request: Request) -> dict[str, Any]:
        """The done event's summary for a JSON answer; a client that goes away meanwhile cancels the job."""

        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
            job.cancel.set()

        watcher = asyncio.create_task(watch())
        try:
            event = await job.events.get()
            while event[0] == "token":
                event = await job.events.get()
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        finally:
            watcher.cancel()
        if event[0] == "error":
            raise self._model_error(event[1], job)
        return event[1]

    def _model_error(self, exc: BaseException, job: Generation) -> ModelError:
        error_id = str(uuid.uuid4())
        log.error("model error %s (generation %s)", error_id, job.id, exc_info=exc)
        return ModelError(
            f"the model failed on this prompt; the server log has error id {error_id}", error_id
        )

    async def health(self) -> dict[str, Any]:
        """Liveness, the served model, running and queued generations and the limits (no API key needed)."""
        with self._swap_lock:
            generator, version = self.generator, self.version
        return {
            "status": "ok",
            "model": self.name,
            "version": version,
            "task": generator.info().get("task", "lm"),
            "bundle": str(generator.path),
            "runtime": runtime_of(generator),
            "context": generator.context,
            "parameters": self.parameters,
            "active": self.active,
            "queued": self.queued,
            "max_concurrent": self.max_concurrent,
            "batching": self.decoder is not None,
            "prefill_chunk": self.prefill_chunk,
            "max_queued": self.max_queued,
            "max_new_tokens_limit": self.limit,
        }

    async def prometheus(self) -> PlainTextResponse:
        """Requests, errors, latency, generated tokens, time to first token, tokens/s (Prometheus text)."""
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def not_here(self, request: Request) -> None:
        """/predict belongs to classifier bundles: say where to go instead."""
        raise HTTPException(
            404,
            f"{request.url.path} is not served here: this server serves a "
            f"{'seq2seq' if self.task == 'seq2seq' else 'language'} model (task {self.task}); "
            'use POST /generate with {"prompt": "..."}',
        )

    def stop(self) -> None:
        """Stop what still runs (clients uvicorn gave up on at its graceful timeout) and the threads."""
        with self._swap_lock:  # from here on `_start` answers 503
            self.stopping = True
            loops = [d for d in (self.decoder, *self.retired) if d is not None]
        for job in list(self.running.values()):
            job.cancel.set()
        for loop in loops:
            loop.close()
        for loop in loops:
            loop.join(timeout=30)
        self.pool.shutdown(wait=True)


def _busy(why: str) -> HTTPException:
    return HTTPException(503, f"{why}; retry shortly", headers={"Retry-After": "1"})


def create_generate_app(
    generator: Any,
    *,
    max_new_tokens_limit: int = 512,
    max_concurrent: int = 8,
    max_queued: int = 16,
    queue_timeout_s: float = 60.0,
    max_body_bytes: int = 1 * MiB,
    api_key: str | None = None,
    name: str | None = None,
    version: int | None = None,
    sink: Any = None,
    batching: bool = True,
    prefill_chunk: int | None = 256,
) -> FastAPI:
    """A FastAPI app serving one language model: POST /generate, POST /feedback, GET /health, GET /metrics,
    GET /.

    Args:
        generator: a `TextGenerator` (or an object shaped like one; see the module doc).
        max_new_tokens_limit: the most `max_new_tokens` a request may ask for; more is 422.
        max_concurrent: most generations running at once: the rows of the continuous batch (a row's KV
            cache is allocated when it is first used, doubling the rows held up to this many).
        max_queued: most requests waiting for a running slot; more are answered 503 with Retry-After.
        queue_timeout_s: longest a request waits for a slot before it is answered 503.
        max_body_bytes: larger request bodies are answered 413.
        api_key: when set, /generate, /feedback and /metrics need `Authorization: Bearer <key>`.
        name: the served name in /health and the page (default: the config's name).
        version: the registered version served, in /health, every answer and every logged row.
        sink: gets `log_predictions(rows)` (a row per generation) and `log_feedback(row)`, from the
            decode loop's and worker threads; with `find_prediction(id)` it also answers feedback on
            older generations. Default: `JsonlSink(<bundle>/serving)`.
        batching: decode the running generations together (continuous batching); False runs each in a
            worker thread of its own (what `bench/generate_serve.py` compares against).
        prefill_chunk: with batching, at most this many prompt tokens are read between two steps of
            the running generations, so a long prompt stalls them by one chunk, not its whole length
            (chunked prefill; 0 or None: every prompt whole; `bench/prefill_chunk.py`).
    """
    service = GenerateService(
        generator,
        max_new_tokens_limit=max_new_tokens_limit,
        max_concurrent=max_concurrent,
        max_queued=max_queued,
        queue_timeout_s=queue_timeout_s,
        name=name,
        version=version,
        sink=sink if sink is not None else JsonlSink(Path(generator.path) / "serving"),
        batching=batching,
        prefill_chunk=prefill_chunk or None,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        how = "decoded together" if service.decoder is not None else "a thread each"
        log.info("serving %s (max_concurrent=%d, %s)", generator.path, max_concurrent, how)
        yield
        await asyncio.to_thread(service.stop)  # uvicorn stopped accepting and let in-flight requests finish

    app = FastAPI(
        title=f"largo: {service.name}",
        version="1",
        lifespan=lifespan,
        default_response_class=NumpyJSONResponse,
    )
    app.state.service = service
    endpoints = {"/", "/generate", "/feedback", "/health", "/metrics", "/openapi.json", "/predict"}
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=service.metrics, endpoints=endpoints)
    add_error_handlers(app)
    key = [key_check(api_key)]
    sse = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events"}}
    app.post("/generate", dependencies=key, summary="Continue a prompt", responses=sse)(service.generate)
    app.post("/feedback", dependencies=key, summary="Rate a generation or correct it")(service.feedback)
    app.get("/health", summary="Liveness and generations")(service.health)
    app.get("/metrics", dependencies=key, response_class=PlainTextResponse)(service.prometheus)
    app.api_route("/predict", methods=["GET", "POST"], include_in_schema=False)(service.not_here)
    page = render_lm_page(
        service.name,
        generator.context,
        max_new_tokens_limit,
        auth=api_key is not None,
        temperature=default_temperature(generator),
        task=service.task,
    )
    app.get("/", response_class=HTMLResponse, include_in_schema=False)(lambda: HTMLResponse(page))
    return app
