"""Continuous batching for POST /generate: one thread decodes every running generation together.

Without it each generation runs alone in a worker thread, so N concurrent requests cost N forward passes
of one token each per step, fighting over the same cores. `DecodeLoop` instead keeps the running
generations as rows of one batch (the generator's `decode_rows`: `GPTRows`, `Seq2SeqRows`, or
`lm_onnx.OnnxRows` on ONNX Runtime) and runs one forward pass per step for all of them, as vLLM and TGI
do:

- a request joins between two steps: its prompt is read alone (its own forward passes), its first
  token sampled, and from the next step on it is one more row. With `prefill_chunk`, prompts are read
  at most that many tokens in all between two steps of the running rows (chunked prefill, as vLLM and
  TGI schedule it; the rows' `reader` reads a prompt in passes), so a running stream's next token waits
  for one chunk at most rather than for a whole long prompt; short prompts go first, but not past one
  that has waited `patience` steps; when nothing runs, the oldest prompt is read whole (no one waits);
- every step feeds each row its last token and samples each row's next one with that request's own
  settings (temperature, top-k, top-p) and its own seeded generator (the rows' `sampler`: a
  `torch.Generator`, numpy's on ONNX Runtime), so a seed gives the same text as the generator's
  `stream_ids` alone (tokens equal up to float rounding of a batched matmul);
- a row leaves as soon as it is done (end-of-text, `max_new_tokens`, the context full, or its client
  gone), and the next waiting request takes its row at the next step.

Events go back to each request as they do from `run_generation` (`Generation.push`: token pieces cut by
`TextPieces`, then "done" with the same summary, or "error"), so the service streams, logs and counts
both paths alike; a step's events go over in one `call_soon_threadsafe`, so the event loop wakes once
a step rather than once a token. A model error in a step fails the generations of that step (each gets
the error) and the loop goes on with the next requests.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from largo.deploy.generate_service import Generation, end_generation
from largo.deploy.lm_text import TextPieces
from largo.models.prefill import PromptReader

log = logging.getLogger("largo.server")
PATIENCE = 4  # steps a waiting prompt lets shorter ones be read first, then it goes first


@dataclass(eq=False)
class _Row:
    """A running generation: its request, its sampler, its text so far, and the token to feed next."""

    job: Generation
    sampler: Any  # the rows' seeded generator of uniform draws; None: greedy
    pieces: TextPieces
    text: list[str]
    truncated: bool
    last: int = -1
    since: int = 0  # the decode loop's step count when the request joined


class DecodeLoop:
    """Decode up to `slots` generations of one generator together, in one thread of its own.

    `submit(job)` hands a generation over (the service has already bounded how many run); its prompt is
    read at most `prefill_chunk` tokens between two steps (None: whole). In the loop's
    thread: `on_done([(job, summary), ...])` gets the generations a step finished, before their "done"
    events (the service logs them, in one sink call); `on_end(job, ok)` each job once its last event is
    sent; `on_step(rows, seconds)` every batched step (metrics). `close()` lets the running generations
    finish, then stops the thread (a swap closes the old model's loop while the new one starts); a job
    submitted after it is refused with a RuntimeError.
    """

    def __init__(
        self,
        generator: Any,
        slots: int,
        on_end: Callable[[Generation, bool], None],
        on_done: Callable[[list[tuple[Generation, dict[str, Any]]]], None] | None = None,
        on_step: Callable[[int, float], None] | None = None,
        prefill_chunk: int | None = None,
        patience: int = PATIENCE,
    ):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk: must be ≥ 1 (got {prefill_chunk})")
        self.generator, self.slots, self.prefill_chunk = generator, slots, prefill_chunk
        self.patience = patience
        self.rows = generator.decode_rows(slots)
        self.on_end, self.on_done, self.on_step = on_end, on_done, on_step
        self.closed = False
        self.done: list[tuple[Generation, dict[str, Any]]] = []  # finished this step, for `on_done`
        self.inbox: queue.SimpleQueue[Generation | None] = queue.SimpleQueue()
        self.live: list[_Row] = []  # one per row of `self.rows`, in row order
        self.pending: list[tuple[_Row, PromptReader]] = []  # prompts being read (a row each, reserved)
        self.steps = 0  # batched steps taken
        self.outbox: list[tuple[Generation, str, Any]] = []  # events of this step, sent together
        self.ended: list[tuple[Generation, bool]] = []  # for `on_end`, after their last events
        self.thread = threading.Thread(target=self._run, name="largo-decode", daemon=True)
        self.thread.start()

    def submit(self, job: Generation) -> None:
        if self.closed:
            raise RuntimeError("this decode loop is closed")
        self.inbox.put(job)

    def close(self) -> None:
        """Finish the generations already handed over, then stop the thread."""
        if not self.closed:
            self.closed = True
            self.inbox.put(None)

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    # ------------------------------------------------------------------------------- the thread

    def _run(self) -> None:
        closing = False
        while not (closing and not self.live and not self.pending):
            try:
                closing = self._admit(closing)
                self._prefill()
                self._flush()  # the new rows' first tokens go out before the step
                if self.live:
                    self._step()
                self._flush()
            except Exception as exc:  # noqa: BLE001 - a bug here must not leave requests hanging
                log.exception("the decode loop failed; its running generations fail with it")
                self._fail_all(exc, pending=True)
                self._flush()

    def _admit(self, closing: bool) -> bool:
        """Take waiting requests into free rows (waiting for one when nothing runs); whether close came."""
        block = not self.live and not self.pending and not closing  # nothing to do: wait for a request
        while len(self.live) + len(self.pending) < self.slots:
            try:
                job = self.inbox.get(block=block)
            except queue.Empty:
                break
            block = False
            if job is None:
                closing = True
            else:
                self._join(job)
        if closing and not self.live and not self.pending:
            with contextlib.suppress(queue.Empty):  # jobs handed over just before close
                while (job := self.inbox.get_nowait()) is not None:
                    self._join(job)
        return closing

    def _flush(self) -> None:
        """Send this step's events to each event loop in one call (one wake-up of the loop a step, not one
        a token), then report the jobs that ended."""
        if self.done:  # logged before their "done" events go out
            done, self.done = self.done, []
            if self.on_done is not None:
                self.on_done(done)
        by_loop: dict[Any, list[tuple[Generation, str, Any]]] = {}
        for item in self.outbox:
            by_loop.setdefault(item[0].loop, []).append(item)
        self.outbox.clear()
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: its clients are gone
                for job, _, _ in items:
                    job.cancel.set()
        ended, self.ended = self.ended, []
        for job, ok in ended:
            self.on_end(job, ok)

    def _join(self, job: Generation) -> None:
        """Start reading the job's prompt for a new row (or end it at once)."""
        s = job.settings
        job.outbox = self.outbox
        job.on_done = lambda job, summary: self.done.append((job, summary))
        try:
            job.prompt_tokens, truncated = self.generator.prompt_tokens(s.prompt)
            row = _Row(
                job, self._sampler(job), TextPieces(self.generator.tokenizer), [], truncated, since=self.steps
            )
            if job.cancel.is_set() or s.max_new_tokens == 0:
                job.finish_reason = "cancelled" if job.cancel.is_set() else "length"
                self._end(row)
                return
            reader = self.rows.reader(self.generator.prompt_ids(s.prompt))
        except Exception as exc:  # noqa: BLE001 - this request fails; the loop keeps serving
            self._fail(job, exc)
            return
        self.pending.append((row, reader))

    def _prefill(self) -> None:
        """Read waiting prompts. While no row runs, the oldest whole (no one waits); once rows run,
        passes of `prefill_chunk` prompt tokens in all before the next step (a seq2seq source is read
        in one pass whatever its length), the prompt with the fewest tokens left first, so a short
        prompt does not wait behind a long one, unless the oldest has waited `patience` steps: then it
        goes first, so a stream of short prompts cannot starve a long one. A prompt read in full becomes
        a row, and its first token is taken."""
        for row, reader in [p for p in self.pending if p[0].job.cancel.is_set()]:
            self.pending.remove((row, reader))
            row.job.finish_reason = "cancelled"
            self._end(row)
        budget, spent = self.prefill_chunk, 0
        while self.pending:
            busy = bool(self.live) and budget is not None
            if busy and spent >= budget:
                break
            i = 0  # the oldest: while no row runs, or once it has waited long enough
            if busy and self.steps - self.pending[0][0].since < self.patience:
                i = min(range(len(self.pending)), key=lambda j: self.pending[j][1].unread)
            row, reader = self.pending[i]
            unread = reader.unread
            try:
                logits = reader.read(budget - spent if busy else None)
            except Exception as exc:  # noqa: BLE001 - this request fails; the loop keeps serving
                self.pending.pop(i)
                self._fail(row.job, exc)
                continue
            spent += (unread - reader.unread) if busy else 0
            if logits is None:
                continue
            self.pending.pop(i)
            self.live.append(row)  # the reader put its row last: `live` mirrors the rows
            index = len(self.live) - 1
            if self._emit(row, self._tokens([row], logits[None])[0], index):
                self._drop([index])

    def _sampler(self, job: Generation) -> Any:
        return self.rows.sampler(job.seed) if job.settings.temperature else None

    def _step(self) -> None:
        """One token for every live row; the rows that are done leave."""
        cancelled = [i for i, row in enumerate(self.live) if row.job.cancel.is_set()]
        for i in cancelled:
            self.live[i].job.finish_reason = "cancelled"
        self._drop(cancelled)
        if not self.live:
            return
        start = time.perf_counter()
        try:  # the tokens are on the host after this: the step is done
            next_tokens = self._tokens(self.live, self.rows.step([row.last for row in self.live]))
        except Exception as exc:  # noqa: BLE001 - these generations fail; the loop keeps serving
            self._fail_all(exc)
            return
        self.steps += 1
        if self.on_step is not None:
            self.on_step(len(self.live), time.perf_counter() - start)
        done = [self._emit(row, t, i) for i, (row, t) in enumerate(zip(self.live, next_tokens, strict=True))]
        self._drop([i for i, d in enumerate(done) if d])

    def _tokens(self, rows: list[_Row], logits: Any) -> list[int]:
        """The next token of each row, with its request's own settings and seeded sampler (the rows'
        `next_tokens`: greedy rows by argmax, the sampled ones in one pass)."""
        settings = [(r.job.settings.temperature, r.job.settings.top_k, r.job.settings.top_p) for r in rows]
        return self.rows.next_tokens(logits, settings, [r.sampler for r in rows])

    def _emit(self, row: _Row, token: int, index: int) -> bool:
        """Send one token's text (or end at the end-of-text token); whether the generation is done."""
        job, s = row.job, row.job.settings
        if s.stop_at_eot and token in self.generator.stops:
            job.finish_reason = "stop"
            return True
        job.tokens += 1
        job.first_token = job.first_token or time.perf_counter()
        if piece := row.pieces.push(token):
            row.text.append(piece)
            job.push("token", piece)
        row.last = token
        if job.tokens >= s.max_new_tokens or self.rows.full(index):
            job.finish_reason = "length"
            return True
        return False

    def _drop(self, indexes: list[int]) -> None:
        """End the generations at these rows and free the rows (the last row moves into each)."""
        for i in sorted(indexes, reverse=True):
            row = self.live[i]
            self.rows.remove(i)
            self.live[i] = self.live[-1]
            self.live.pop()
            self._end(row)

    def _end(self, row: _Row) -> None:
        if piece := row.pieces.end():
            row.text.append(piece)
            row.job.push("token", piece)
        try:
            end_generation(row.job, "".join(row.text), row.truncated)
        except Exception as exc:  # noqa: BLE001
            self._fail(row.job, exc)
            return
        self.ended.append((row.job, True))

    def _fail_all(self, exc: BaseException, pending: bool = False) -> None:
        """Every running generation (with `pending`, every prompt being read too) fails with `exc`; the
        rows are emptied for the next requests."""
        for row in self.live:
            self._fail(row.job, exc)
        self.live.clear()
        self.rows.clear()
        if pending:
            for row, _ in self.pending:
                self._fail(row.job, exc)
            self.pending.clear()

    def _fail(self, job: Generation, exc: BaseException) -> None:
        job.push("error", exc)
        job.ended = job.ended or time.perf_counter()
        self.ended.append((job, False))


def _deliver(items: list[tuple[Generation, str, Any]]) -> None:
    """In the event loop: put each event on its generation's queue."""
    for job, kind, value in items:
        job.events.put_nowait((kind, value))
