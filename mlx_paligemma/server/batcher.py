"""Requests that arrive together are generated together: a queue in front of Model.stream_batch.

One thread owns the model. It takes the first waiting job, waits at most `wait_s` for more to
arrive (up to `max_batch`), and runs them as one batch, each row with its own settings; text
pieces go back to each request's event loop as they come. A job cancelled while queued is
dropped; one cancelled while running (client gone, timeout) has its row ended between two steps,
and the batch stops as soon as every row has ended. A request that arrives while a batch runs
waits for the next one (the loop's batch is fixed once its prefill is done).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..sampling import SamplingParams


class QueueFull(Exception):
    """Raised by `submit` when `max_queue` jobs are already waiting."""


@dataclass(eq=False)
class Job:
    """One request's generation. Events on `events` (in the request's loop): ("piece", text) when
    streaming, then ("done", (Generation, extra)) or ("error", exception)."""

    image: Any
    prompt: str
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    finish: Callable | None = None  # Generation -> extra data, run on the model's thread (masks)
    stream: bool = False  # send ("piece", text) events (else only the end)
    cancelled: bool = False
    next_check: float = 0.0  # when the request's handler next asks whether its client is still there
    _row: tuple | None = None  # (BatchStream, row) while running

    def emit(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the request's loop is gone (server shutting down)
            pass

    def attach(self, stream, row: int) -> None:
        self._row = (stream, row)
        if self.cancelled:
            stream.cancel(row)

    def cancel(self) -> None:
        """Stop this job: dropped if queued, its row ended if running (safe from any thread)."""
        self.cancelled = True
        running = self._row
        if running is not None:
            running[0].cancel(running[1])


class Batcher:
    def __init__(self, model, max_batch: int = 8, wait_s: float = 0.05, max_queue: int = 32):
        self.model = model
        self.max_batch, self.wait_s, self.max_queue = max_batch, wait_s, max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._running: list[Job] = []
        self._closed = False
        self.batches = self.served = self.cancelled = self.largest_batch = 0
        self._batch_s = 1.0  # a running average of a batch's duration: the Retry-After estimate
        self._thread = threading.Thread(target=self._work, name="paligemma-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for job in list(self._waiting) + self._running:
                job.cancel()
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting, the limit is {self.max_queue}")
            self._waiting.append(job)
            self._cv.notify_all()

    def retry_after_s(self) -> int:
        """Seconds a refused client should wait: the batches ahead of it, at the recent batch duration."""
        batches_ahead = 1 + len(self._waiting) // max(self.max_batch, 1)
        return max(1, round(self._batch_s * batches_ahead))

    def state(self) -> dict:
        with self._cv:
            return {"queued": len(self._waiting), "running": len(self._running),
                    "batches": self.batches, "served": self.served, "cancelled": self.cancelled,
                    "largest_batch": self.largest_batch, "max_batch": self.max_batch, "max_queue": self.max_queue}

    def _next_batch(self) -> list[Job] | None:
        with self._cv:
            while not self._closed:
                self._drop_cancelled()
                if self._waiting:
                    break
                self._cv.wait()
            if self._closed:
                return None
            # a bounded wait for others to join the first one
            deadline = time.monotonic() + self.wait_s
            while len(self._waiting) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            self._drop_cancelled()
            batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
            self._running = batch
            return batch

    def _drop_cancelled(self) -> None:
        kept = [j for j in self._waiting if not j.cancelled]
        self.cancelled += len(self._waiting) - len(kept)
        self._waiting = collections.deque(kept)

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                start = time.monotonic()
                self._run(batch)
                self._batch_s = 0.7 * self._batch_s + 0.3 * (time.monotonic() - start)
            with self._cv:
                self._running = []

    def _run(self, jobs: list[Job]) -> None:
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(jobs))
        try:
            stream = self.model.stream_batch([j.image for j in jobs], [j.prompt for j in jobs], [j.params for j in jobs])
            for row, job in enumerate(jobs):
                job.attach(stream, row)
            for row, piece in stream:
                if jobs[row].stream:
                    jobs[row].emit("piece", piece)
            results = stream.results
        except Exception as e:  # the model failed: every request of the batch gets the error, the server goes on
            for job in jobs:
                job.emit("error", e)
            return
        for job, out in zip(jobs, results):
            if out.finished_by == "cancelled":
                self.cancelled += 1
                job.emit("error", asyncio.CancelledError())
                continue
            try:
                extra = job.finish(out) if job.finish is not None else None
            except Exception as e:
                job.emit("error", e)
                continue
            self.served += 1
            job.emit("done", (out, extra))
