"""Dynamic batching for the server: a bounded asyncio queue and one batcher task.

Requests put their records into the queue (all or none: a full queue is refused at once, never
awaited). The batcher takes the oldest waiting record, waits at most `max_wait_ms` for up to
`max_batch` records, runs one forward pass in a worker thread (the event loop keeps serving) and
answers each record's future. Records that arrive during a forward pass wait in the queue and make up
the next batch at once; a lone client (previous batch of one, nothing else waiting) does not wait.

With `group_by_length` (texts), short texts do not pay for padding to a long one: the batcher drains
up to `pool` x max_batch records and picks the `max_batch` whose lengths are closest to the oldest one's
(the oldest is always in the next batch, so nothing starves), and a batch that still mixes lengths runs
as one forward pass per length group, shortest first.

`swap(run_batch)` changes what runs the batches (the server's hot model swap): a batch captures
`run_batch` when it starts, so every batch, its length groups and retries included, runs on one model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("largo.server")

# (records, seconds each record waited in the queue before its forward pass) → one result per record
RunBatch = Callable[[list[dict[str, Any]], list[float]], list[dict[str, Any]]]


def length_groups(batch: list[Job], slack: int = 16) -> list[list[Job]]:
    """Split a batch into runs of similar length, shortest first: a group's longest record is at most
    twice its shortest plus `slack` characters, so padding at most about doubles a group's work (short
    texts are cheap whatever their spread, hence the slack)."""
    jobs = sorted(batch, key=lambda j: j.length)
    groups: list[list[Job]] = []
    for job in jobs:
        if groups and job.length <= 2 * groups[-1][0].length + slack:
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups


class QueueFullError(RuntimeError):
    """The queue has no room for a request's records."""


@dataclass
class Job:
    """One record waiting for a prediction."""

    record: dict[str, Any]
    future: asyncio.Future
    length: int = 0  # grouping key: characters of the record's texts
    arrived: float = field(default_factory=time.perf_counter)


class Batcher:
    """Collects records from concurrent requests into batches and runs them one at a time."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        queue_size: int = 1024,
        group_by_length: bool = False,
        pool: int = 4,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and queue_size must be >= 1 and max_wait_ms >= 0")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.queue_size = queue_size
        self.group_by_length = group_by_length
        self.pool_size = max_batch * pool if group_by_length else max_batch
        self.on_batch = on_batch
        self.queue: asyncio.Queue[Job] | None = None
        self.pending: list[Job] = []  # taken from the queue, not yet run (at most pool_size)
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running = 0  # records in the forward pass now
        self._last_size = 1  # records in the previous batch

    @property
    def depth(self) -> int:
        """Records waiting for a forward pass (in the queue or in the pool)."""
        return (self.queue.qsize() if self.queue else 0) + len(self.pending)

    async def start(self) -> None:
        """Create the queue and start the batcher task (inside the running event loop)."""
        self.queue = asyncio.Queue(maxsize=self.queue_size)
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="largo-forward")
        self._task = asyncio.create_task(self._loop(), name="largo-batcher")

    async def stop(self, timeout: float = 30.0) -> None:
        """Answer every queued record (up to `timeout` seconds), then stop the task and the thread."""
        deadline = time.perf_counter() + timeout
        while (self.depth or self._running) and time.perf_counter() < deadline and not self._task_done():
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in self._take_all():
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server stopped before this record was predicted"))
        if self._executor:
            self._executor.shutdown(wait=True)

    def swap(self, run_batch: RunBatch) -> None:
        """Run batches with `run_batch` from the next batch on; the batch running now ends on the old one."""
        self.run_batch = run_batch

    def submit(self, records: list[dict[str, Any]], lengths: list[int] | None = None) -> list[asyncio.Future]:
        """Queue records (all or none); returns one future per record. Raises QueueFullError."""
        assert self.queue is not None and self._arrived is not None, "Batcher.start() was not awaited"
        if self.queue.maxsize - self.queue.qsize() < len(records):
            raise QueueFullError(f"queue full ({self.queue.qsize()} of {self.queue.maxsize} records waiting)")
        loop = asyncio.get_running_loop()
        futures = []
        for i, record in enumerate(records):
            job = Job(record, loop.create_future(), lengths[i] if lengths else 0)
            self.queue.put_nowait(job)  # no await between the check and the puts: all fit
            futures.append(job.future)
        self._arrived.set()
        return futures

    # ---------------------------------------------------------------------------------- the task

    def _task_done(self) -> bool:
        return self._task is None or self._task.done()

    def _take_all(self) -> list[Job]:
        jobs, self.pending = self.pending, []
        while self.queue and not self.queue.empty():
            jobs.append(self.queue.get_nowait())
        return jobs

    def _drain(self) -> None:
        """Move queued jobs into the pool, up to its size."""
        assert self.queue is not None
        while len(self.pending) < self.pool_size and not self.queue.empty():
            self.pending.append(self.queue.get_nowait())

    async def _collect(self, busy: asyncio.Task | None) -> list[Job]:
        """Wait for the next batch: up to max_batch jobs, or what came within max_wait of the oldest.

        While the previous batch is still in the worker (`busy`), records pile up in the queue at no
        cost; the pool then fills from them (up to `pool` x max_batch when grouping by length) and the
        deadline counts only if the batch is still short once the worker is free.
        """
        assert self.queue is not None and self._arrived is not None
        while not self.pending:
            self._arrived.clear()
            self._drain()
            if not self.pending:
                await self._arrived.wait()
        if busy is not None:
            await busy  # never raises: _run answers every error to its futures
        self._drain()
        if len(self.pending) == 1 and self._last_size == 1:
            return self._pick()  # a lone client: waiting for company would only add latency
        deadline = self.pending[0].arrived + self.max_wait
        while True:
            self._arrived.clear()
            self._drain()
            remaining = deadline - time.perf_counter()
            if len(self.pending) >= self.max_batch or remaining <= 0:
                break
            if self.queue.empty():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
        return self._pick()

    def _pick(self) -> list[Job]:
        """Take the next batch out of the pool: FIFO, or the oldest job and its nearest lengths."""
        b = self.max_batch
        if len(self.pending) <= b:
            batch, self.pending = self.pending, []
            return batch
        if not self.group_by_length:
            batch, self.pending = self.pending[:b], self.pending[b:]
            return batch
        order = sorted(range(len(self.pending)), key=lambda i: self.pending[i].length)
        pos = order.index(0)  # where the oldest job sits in length order
        starts = range(max(0, pos - b + 1), min(pos, len(order) - b) + 1)
        lengths = [self.pending[i].length for i in order]
        start = min(starts, key=lambda s: lengths[s + b - 1] - lengths[s])
        chosen = set(order[start : start + b])
        batch = [self.pending[i] for i in sorted(chosen)]
        self.pending = [j for i, j in enumerate(self.pending) if i not in chosen]
        return batch

    async def _loop(self) -> None:
        """Collect the next batch while the previous one runs; one forward pass at a time."""
        running: asyncio.Task | None = None
        while True:
            batch = await self._collect(running)
            batch = [j for j in batch if not j.future.done()]  # a client that went away
            running = None
            if batch:
                self._running = self._last_size = len(batch)  # counted from now: stop() cannot miss it
                running = asyncio.create_task(self._run(batch))

    async def _run(self, batch: list[Job]) -> None:
        """Forward passes in the worker thread (one per length group), answering every job."""
        run = self.run_batch  # one model for the whole batch, even if swap() is called meanwhile
        try:
            for group in length_groups(batch) if self.group_by_length else [batch]:
                await self._forward(group, run)
        except Exception as exc:  # noqa: BLE001 - a bug here must not stop serving
            log.exception("batcher: unexpected error")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
        finally:
            self._running = 0

    async def _forward(self, batch: list[Job], run: RunBatch) -> None:
        """Run the batch; a failing batch is retried record by record."""
        loop = asyncio.get_running_loop()
        records = [j.record for j in batch]
        t = time.perf_counter()
        waited = [t - j.arrived for j in batch]
        try:
            results = await loop.run_in_executor(self._executor, run, records, waited)
        except Exception as exc:  # noqa: BLE001 - the error goes to the request(s) it belongs to
            results = await self._one_by_one(records, waited, run) if len(records) > 1 else [exc]
        if self.on_batch:
            self.on_batch(len(batch), time.perf_counter() - t)
        for job, result in zip(batch, results, strict=True):
            if job.future.done():
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    async def _one_by_one(
        self, records: list[dict[str, Any]], waited: list[float], run: RunBatch
    ) -> list[Any]:
        """Run each record alone, so one bad record fails only its own request."""
        loop = asyncio.get_running_loop()
        out: list[Any] = []
        for record, w in zip(records, waited, strict=True):
            try:
                out.extend(await loop.run_in_executor(self._executor, run, [record], [w]))
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
        return out
