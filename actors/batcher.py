"""The replica's batch scheduler: traces of every request and user that wait for this replica
run together, as programs of one engine run, in the fair order of intervention/batching.py.

Each request hands its traces here one at a time, as a chain (`run_chain`: its next one made
after the previous one's result, so a session's traces keep their order and may join different
batches). A single worker task takes the next batch — the first trace in fair order and the
compatible ones behind it, within the model's limits — and runs it in the forward thread, one
batch at a time. When the replica was idle it first waits up to `batch_wait_ms` for more traces
to join, if any may come: when a request it serves has no trace waiting (a session between two
traces) or its last batch held several programs (requests are arriving together). A replica that
serves one request at a time starts its trace at once: waiting would only add latency; and while
it serves that one request, the forward thread runs the chain's next trace itself, each as a
batch of its own, instead of handing the result to the event loop and waiting for the next trace
to come back (two thread wake-ups per trace: 0.7-0.8 ms per seed session on the benchmark
machine). Per-request things stay with each program: its cancel flag, byte budgets and events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

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


class Chain(Protocol):
    """A request's traces that run one after another (actors/model_deployment.py: a segment's).
    Its calls come one at a time, from the event loop or the forward thread."""

    def next(self) -> tuple[Program, Callable[[int, int], None]] | None:
        """The next trace's program and its `on_start` (RUNNING: batch number, programs in the
        batch), made from the results recorded so far; None once the chain has ended."""

    def record(self, program: Program, result: ProgramResult) -> None: ...

    def on_queued(self, position: int) -> None: ...  # QUEUED


@dataclass(eq=False)
class Job:
    program: Program
    on_start: Callable[[int, int], None]  # (batch number, programs in the batch): RUNNING
    on_queued: Callable[[int], None]  # its position: QUEUED
    done: asyncio.Future
    chain: Chain | None = None  # the program's chain, which the forward thread records its result in
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
        return await self._run(user, Job(program, on_start, on_queued, asyncio.get_running_loop().create_future()))

    async def run_chain(self, user: str, chain: Chain) -> None:
        """Run the chain's programs in order, each as `run` runs one, their results recorded in
        the chain; while the replica serves this request alone, the forward thread goes on to the
        next ones itself (the module's docstring)."""
        while (step := chain.next()) is not None:
            program, on_start = step
            job = Job(program, on_start, chain.on_queued, asyncio.get_running_loop().create_future(), chain)
            await self._run(user, job)

    async def _run(self, user: str, job: Job) -> ProgramResult | None:
        key = batch_key(job.program.trace, samples_by_default=self.samples_by_default)
        rows, width = trace_size(self.tokenizer, job.program.trace, job.program.tensors)
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
            jobs: list[Job] = [w.payload for w in batch]
            self._start_batch([j.on_start for j in jobs])
            self._report()
            try:
                results = await loop.run_in_executor(self.pool, self._forward, jobs)
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

    def _start_batch(self, on_starts: list[Callable[[int, int], None]]) -> None:
        """Count a batch of these programs (by their `on_start`) and tell each it starts."""
        self.batches += 1
        self.sizes[len(on_starts)] += 1
        self.last_size = self.running = len(on_starts)
        for on_start in on_starts:
            _quietly(on_start, self.batches, len(on_starts))

    def _forward(self, jobs: list[Job]) -> list[ProgramResult | None]:
        """In the forward thread: one driver run of the batch, then each program's result (saves
        are copied here, off the event loop); a chain's is recorded in it (None in the list). A
        lone chain goes on here while its request is the only one this replica serves: a request
        that comes meanwhile waits for one forward at most, as it would for a running batch."""
        run_forward(self.model, self.tokenizer, [j.program for j in jobs])
        results: list[ProgramResult | None] = [j.program.result() for j in jobs]
        for i, job in enumerate(jobs):
            if job.chain is not None:
                job.chain.record(job.program, results[i])
                results[i] = None
        chain = jobs[0].chain if len(jobs) == 1 else None
        while chain is not None and self.serving == 1 and not len(self.queue) and (step := chain.next()) is not None:
            program, on_start = step
            self._start_batch([on_start])
            run_forward(self.model, self.tokenizer, [program])
            chain.record(program, program.result())
        return results

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

