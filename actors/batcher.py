"""The replica's batch scheduler: traces of every request and user that wait for this replica
run together, as programs of one engine run, in the fair order of intervention/batching.py.

Each request's `run_segment` hands its traces here one at a time (its next one after the previous
one's result, so a session's traces keep their order and may join different batches). A single
worker task takes the next batch — the first trace in fair order and the compatible ones behind
it, within the model's limits — and runs it in the forward thread, one batch at a time. When the
replica was idle it first waits up to `batch_wait_ms` for more traces to join, if any may come:
when a request it serves has no trace waiting (a session between two traces) or its last batch
held several programs (requests are arriving together). A replica that serves one request at a
time starts its trace at once: waiting would only add latency. Per-request things stay with each
program: its cancel flag, byte budgets and events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from intervention.batching import (
    BatchLimits,
    FairQueue,
    Waiting,
    batch_key,
    select_batch,
    trace_size,
)
from intervention.engine import run_forward
from intervention.program import Program, ProgramResult

logger = logging.getLogger(__name__)

# Beyond the first few places only these positions are reported to a waiting trace: every batch
# moves everyone, and O(n) events per move would make a long queue slower still.
_REPORTED_UNTIL = 4
_REPORT_EVERY = 8


@dataclass(eq=False)
class Job:
    program: Program
    on_start: Callable[[int, int], None]  # (batch number, programs in the batch): RUNNING
    on_queued: Callable[[int], None]  # its position: QUEUED
    done: asyncio.Future
    reported: int = -1  # the last position reported


class Batcher:
    def __init__(self, model: torch.nn.Module, tokenizer: Any, limits: BatchLimits, pool: Executor):
        self.model, self.tokenizer, self.limits, self.pool = model, tokenizer, limits, pool
        generation = getattr(model, "generation_config", None)
        self.samples_by_default = bool(getattr(generation, "do_sample", False))
        self.queue = FairQueue()
        self.running = 0  # programs in the batch running now
        self.batches = 0  # batches started so far (the last one's number)
        self.serving = 0  # requests in progress here (`with batcher.request():`), waiting or not
        self.last_size = 0  # programs in the last batch
        self.sizes: Counter[int] = Counter()  # programs per batch -> how many batches had that many
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    def stats(self) -> dict[str, Any]:
        return {"waiting": len(self.queue), "running": self.running, "batches": self.batches,
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())}}

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Count a request in progress while its traces come here, one after another: one
        between two traces may send the next soon, worth the idle replica's short wait."""
        self.serving += 1
        try:
            yield
        finally:
            self.serving -= 1

    async def run(self, user: str, program: Program, on_start: Callable[[int, int], None],
                  on_queued: Callable[[int], None]) -> ProgramResult:
        """Run `program` in the next batch it fits; its result. Cancelled while it waits, it
        leaves the queue; while its batch runs, the caller's cancel flag ends it alone."""
        key = batch_key(program.trace, samples_by_default=self.samples_by_default)
        rows, width = trace_size(self.tokenizer, program.trace, program.tensors)
        job = Job(program, on_start, on_queued, asyncio.get_running_loop().create_future())
        item = Waiting(user, key, rows, width, job)
        self.queue.push(item)
        self._start_worker()
        self._wake.set()
        self._report()
        try:
            return await asyncio.shield(job.done)
        except asyncio.CancelledError:
            if self.queue.remove(item):
                self._report()
            raise

    def _start_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = asyncio.ensure_future(self._work())

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not len(self.queue):
                self._wake.clear()
                await self._wake.wait()
                await self._gather()  # the replica was idle: let a few more traces join
            batch = select_batch(self.queue.order(), self.limits)
            if not batch:
                continue
            self.queue.take(batch)
            self.batches += 1
            self.sizes[len(batch)] += 1
            self.last_size = len(batch)
            self.running = len(batch)
            jobs: list[Job] = [w.payload for w in batch]
            for job in jobs:
                _quietly(job.on_start, self.batches, len(batch))
            self._report()
            try:
                results = await loop.run_in_executor(self.pool, _forward, self.model, self.tokenizer,
                                                     [j.program for j in jobs])
            except Exception as exc:  # noqa: BLE001 - not a program's error (those are results): the run itself broke
                for job in jobs:
                    if not job.done.done():
                        job.done.set_exception(exc)
                continue
            finally:
                self.running = 0
            for job, result in zip(jobs, results, strict=True):
                if not job.done.done():
                    job.done.set_result(result)

    async def _gather(self) -> None:
        """Wait up to batch_wait_ms while the waiting traces do not fill a batch, if more may come
        (see the module's docstring). Each request has at most one trace waiting at a time."""
        wait = self.limits.batch_wait_ms / 1000
        more_may_come = self.last_size > 1 or self.serving > len(self.queue)
        if wait <= 0 or not more_may_come:
            return
        deadline = asyncio.get_running_loop().time() + wait
        while sum(w.rows for w in self.queue.order()) < self.limits.max_batch_size:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    def _report(self) -> None:
        """Tell waiting traces their place: how many traces are served before them in the fair
        order, the batch running now counting as one. Only changed places are sent, and while the
        replica is idle none (the next batch starts within batch_wait_ms)."""
        if not self.running:
            return
        order = self.queue.order()
        for index, item in enumerate(order):
            job: Job = item.payload
            position = index + 1
            if position == job.reported:
                continue
            if position < _REPORTED_UNTIL or position % _REPORT_EVERY == 0 or index == len(order) - 1 or job.reported < 0:
                job.reported = position
                _quietly(job.on_queued, position)


def _quietly(fn: Callable, *args: Any) -> None:
    """An event callback: whatever it raises must not stop the worker every request waits on
    (events are best effort; the request's outcome is recorded by its runner)."""
    try:
        fn(*args)
    except Exception:
        logger.warning("an event callback failed", exc_info=True)


def _forward(model: torch.nn.Module, tokenizer: Any, programs: list[Program]) -> list[ProgramResult]:
    """In the forward thread: one driver run of the batch, then each program's result (saves are
    copied there, off the event loop)."""
    run_forward(model, tokenizer, programs)
    return [p.result() for p in programs]
