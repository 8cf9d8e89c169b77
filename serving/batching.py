"""Micro-batching: requests wait briefly in a bounded queue and run together, grouped by parameters, in one thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("serving")

RunBatch = Callable[[list[Any], Any], Sequence[Any]]


class QueueFullError(RuntimeError):
    """The queue holds as many images as allowed: answer 503 with Retry-After."""


@dataclass
class _Job:
    items: list[Any]
    params: Hashable
    future: asyncio.Future
    counted: bool = True  # its items still count as waiting


class ModelThread:
    """One daemon thread running model calls one after another; a call that never returns blocks neither the event
    loop nor the process's exit, and ``busy_seconds`` tells how long the current call has been running."""

    def __init__(self, name: str = "caption-model") -> None:
        self._calls: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._busy_since: float | None = None
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Queue ``fn(*args)``; the returned future (of the running loop) gets its result or exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._calls.put((loop, future, fn, args))
        return future

    def busy_seconds(self) -> float:
        """How long the current call has been running (0 when idle)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def stop(self) -> None:
        """Let the thread end after the current call (``join`` waits for that)."""
        self._calls.put(None)

    def join(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for the thread to end; False if a call is still running (it is left behind)."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            loop, future, fn, args = call
            self._busy_since = time.monotonic()
            try:
                outcome: tuple[Any, Any] = (fn(*args), None)
            except Exception as exc:
                outcome = (None, exc)
            finally:
                self._busy_since = None
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, *outcome)


def _settle(future: asyncio.Future, result: Any, error: Exception | None) -> None:
    """Resolve a future unless its waiter gave up (cancelled)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class MicroBatcher:
    """Collects jobs for up to ``max_wait_ms`` (or ``max_batch_size`` items) and runs them in ONE model thread.

    ``run_batch(items, params)`` must return one result per item. Jobs with different ``params`` in the same batch run
    as separate calls. If a call with several jobs raises, each job is retried alone so that the failure reaches only
    the job that causes it. ``queue_size`` bounds the number of items waiting (not yet running); a job whose waiter
    gives up (its deadline passed) stops counting and is skipped.
    """

    def __init__(self, run_batch: RunBatch, max_batch_size: int = 16, max_wait_ms: float = 5.0,
                 queue_size: int = 64) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.waiting = 0  # items queued, not yet taken into a batch
        self.batches_run = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._carry: _Job | None = None
        self._task: asyncio.Task | None = None
        self._model: ModelThread | None = None

    async def start(self) -> None:
        """Start the collector task and the model thread (call from the running event loop)."""
        self._queue = asyncio.Queue()
        self._model = ModelThread()
        self._task = asyncio.create_task(self._collect_forever(), name="micro-batcher")

    def busy_seconds(self) -> float:
        """How long the model thread has been running its current batch (0 when idle)."""
        return self._model.busy_seconds() if self._model is not None else 0.0

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop collecting, fail the jobs still waiting, and let the model thread finish its current batch for up to
        grace_s (a stuck one is left behind: it is a daemon thread and does not keep the process alive)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        pending = [self._carry] if self._carry else []
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        if self._model is not None:
            self._model.stop()
            if not await asyncio.to_thread(self._model.join, grace_s):
                logger.warning("the model thread is still running a batch after %g s; leaving it behind", grace_s)
        self._task = self._model = self._queue = self._carry = None

    async def submit(self, items: list[Any], params: Hashable) -> list[Any]:
        """Queue the items and wait for their results; raises QueueFullError at once if they do not fit."""
        if self._queue is None:
            raise RuntimeError("the batcher is not running")
        if not items:
            return []
        if self.waiting + len(items) > self.queue_size:
            raise QueueFullError(f"{self.waiting} images are waiting (queue size {self.queue_size})")
        job = _Job(list(items), params, asyncio.get_running_loop().create_future())
        self.waiting += len(items)
        self._queue.put_nowait(job)
        try:
            return await job.future
        except asyncio.CancelledError:  # the waiter gave up: if still queued, free its place (and its images) now
            if job.counted:
                self._release(job)
                job.items = []
            raise

    def _release(self, job: _Job) -> None:
        """Stop counting a job's items as waiting (once)."""
        if job.counted:
            self.waiting -= len(job.items)
            job.counted = False

    async def _collect_forever(self) -> None:
        """Take a batch, run it, repeat; an unexpected error is logged and never stops the loop."""
        while True:
            jobs = await self._next_batch()
            try:
                await self._run_groups(jobs)
            except asyncio.CancelledError:
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(RuntimeError("the server is shutting down"))
                raise
            except Exception as exc:  # pragma: no cover - defensive: _run already resolves every future
                logger.exception("micro-batcher: unexpected error")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)

    async def _next_batch(self) -> list[_Job]:
        """The first waiting job plus whatever arrives within max_wait, up to max_batch_size items."""
        assert self._queue is not None
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        jobs, count = [first], len(first.items)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while count < self.max_batch_size:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if count + len(job.items) > self.max_batch_size:
                self._carry = job  # keep it whole for the next batch
                break
            jobs.append(job)
            count += len(job.items)
        for job in jobs:
            self._release(job)
        return [job for job in jobs if not job.future.done()]  # clients that gave up are skipped

    async def _run_groups(self, jobs: list[_Job]) -> None:
        """One model call per distinct parameter set, in order of first arrival."""
        groups: dict[Hashable, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(job.params, []).append(job)
        for params, group in groups.items():
            await self._run(group, params)

    async def _run(self, jobs: list[_Job], params: Hashable) -> None:
        """Run jobs of equal parameters in the model thread and resolve their futures."""
        items = [item for job in jobs for item in job.items]
        assert self._model is not None
        try:
            results = await self._model.run(self.run_batch, items, params)
            if len(results) != len(items):
                raise RuntimeError(f"the model returned {len(results)} results for {len(items)} images")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if len(jobs) > 1:
                logger.warning("batch of %d requests failed (%r); retrying them one by one", len(jobs), exc)
                for job in jobs:
                    if not job.future.done():
                        await self._run([job], params)
                return
            logger.error("captioning failed: %r", exc, exc_info=exc)
            if not jobs[0].future.done():
                jobs[0].future.set_exception(exc)
            return
        self.batches_run += 1
        start = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(list(results[start:start + len(job.items)]))
            start += len(job.items)
