"""Running a request to its end in the request store, for the process that runs it.

Two kinds of process run requests: the session runner (sessions whose traces use several models)
and a model replica (a session on its model alone, sent straight from the ingress: one hop and
one process fewer). Either way the same rules hold, and they live here:

- the process holds a lease on the requests it runs (`watch` claims one; `heartbeat` renews this
  process's leases every HEARTBEAT_S while it runs any), so the store ends the requests of a
  process that died with the ingress that would have retried them. Until a runner claims it, the
  ingress that admitted a request holds it (`Lease`): a request waiting in Serve's queue for a
  replica (one starting, or at its limit) is not an orphan, however long it waits. A runner
  claims a request (and starts watching for its cancel) only once it has run CLAIM_AFTER_S: most
  requests end sooner, with one store call (`finish`) instead of two, while the ingress, which
  waits for them anyway, still holds them; a cancel requested meanwhile is seen at the claim,
  which also carries the request's events waiting to be sent (due at the same time);
- a cancel (DELETE, through the store) or the time limit cancels the work, which stops its forward;
- the outcome is recorded once, with the events still waiting to be sent (`EventSender.settle`)
  in the same store call; a replica answers its ingress first and makes that call just after
  (`answer_first`), since a store round trip was a fifth of a short request's time: the end as
  the store will record it (only a fault that let the store end the request as an orphan makes
  them differ), with its index in the request's event log, which the ingress keeps so that a
  read of the request waits for it (serve_app/recordings.py); the lease is held until the store
  has it. No ObjectRef travels with the answer, nor with the request: each one in a Serve call
  cost about a millisecond more per round trip in a bare Serve app (docs/BENCHMARKS.md);
- a request may start before the store has admitted it (the ingress sends the admit call and the
  request together): the store holds this process's calls for it until the admission is there,
  and drops them if it was refused (the ingress answers 429; the run's claim tells it to stop),
  so nothing of a refused request is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Iterator
from typing import Any

from actors.event_sender import EventSender
from actors.request_store import (
    HEARTBEAT_S,
    StoreClient,
    StoreUnavailable,
    handed_inline,
)
from intervention import timeline
from intervention.errors import location_dict
from intervention.events import CANCELLED, ERROR, STATUS_HOLD_S
from intervention.ir import TraceIR

# A runner claims a request this long after it starts it (module docstring): as long as its first
# events wait (actors/event_sender.py), so a request that ends sooner makes one store call in all.
CLAIM_AFTER_S = STATUS_HOLD_S

# A replica's answer leaves from Serve's own event loop, in another thread, once `run` returns; a
# store call started at that moment competes with it for the interpreter (the call's submission
# alone took ~0.4 ms here), so the end's `finish` call starts this long after an answer-first end.
# A/B in one cluster: 0.8 / 1.0 ms less per seed session, SmolLM2 / tiny (docs/BENCHMARKS.md).
RECORD_AFTER_ANSWER_S = 0.001

# What a request's work returns: the terminal event's kind and data, and the result bytes.
Outcome = tuple[str, dict[str, Any], bytes | None]


class Lease:
    """This process's lease on the requests it holds: renewed in the store every HEARTBEAT_S
    while it holds any (`with lease.holding():`), so they are orphans once the renewals stop."""

    def __init__(self, store: StoreClient):
        self.store = store
        self.id = uuid.uuid4().hex
        self.held = 0
        self.renewals: asyncio.Task | None = None

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        self.take()
        try:
            yield
        finally:
            self.release()

    def take(self) -> None:
        """Hold one more request (until `release`)."""
        if self.renewals is None:
            self.renewals = asyncio.ensure_future(self._renew())
        self.held += 1

    def release(self) -> None:
        self.held -= 1

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if self.held:
                try:
                    await self.store.call("heartbeat", self.id)
                except StoreUnavailable:
                    pass


class Supervisor:
    """Runs this process's requests to their end (see the module's docstring)."""

    def __init__(self, store: StoreClient):
        self.store = store
        self.lease = Lease(store)
        self.recordings: set[asyncio.Task] = set()  # ends answered before the store had them

    async def run(self, request_id: str, work: Awaitable[Outcome], timeout_s: float, *,
                  events: EventSender | None = None, inline_limit: int = 0,
                  answer_first: bool = False) -> dict[str, Any] | None:
        """Run `work` for `request_id` until it ends, is cancelled or passes `timeout_s`, and record
        its end. Returns the end as recorded — {"event", "data", "id" (its index in the request's
        event log), "result" (the result bytes when COMPLETED and at most `inline_limit` bytes:
        the store counts them as fetched), "news" (whether `events` sent anything but status),
        "recorded" (whether the store has it yet)} — or None when the request had ended
        elsewhere or was not admitted. `answer_first` (needs `events`): return the end before the
        store records it, "recorded" False (the module's docstring)."""
        claimed: list = []  # events sent with the claim, which may not have reached the store
        if events is not None:
            events.wait_for_claim()
        with self.lease.holding():
            end = await self._outcome(request_id, work, timeout_s, events, claimed)
            if end is None:
                return None
            kind, data, result = end
            # Again with the end: a claim cut short by the end (a store that was down) never sent
            # them, and the store drops what it has (events are numbered).
            pending = claimed + (await events.settle() if events is not None else [])
            args = (request_id, kind, data, result, pending, inline_limit)
            inline = handed_inline(kind, result, inline_limit)
            if answer_first and events is not None and (result is None or inline):  # no quota can refuse it
                return self._answer_first(args, events, kind, data, result if inline else None)
            recorded = await self.store.call("finish", *args)
        if recorded is None:
            return None
        # The store may have recorded another end (a result over its owner's quota is an ERROR).
        inline = handed_inline(recorded["event"], result, inline_limit)
        return {**recorded, "result": result if inline else None, "news": events is not None and events.news,
                "recorded": True}

    def _answer_first(self, finish_args: tuple, events: EventSender, kind: str, data: dict[str, Any],
                      inline_result: bytes | None) -> dict[str, Any]:
        """The end, as the store will record it once the `finish` call that starts just after
        this answer reaches it (lease held until then)."""
        self.lease.take()  # now: the request must not look like an orphan while the call is out
        recording = asyncio.ensure_future(self._record(finish_args))
        self.recordings.add(recording)
        recording.add_done_callback(self.recordings.discard)
        # The store records RECEIVED, then each event of `events`, then the end.
        return {"id": 1 + events.sent, "event": kind, "data": data, "result": inline_result,
                "news": events.news, "recorded": False}

    async def _record(self, finish_args: tuple) -> None:
        try:
            await asyncio.sleep(RECORD_AFTER_ANSWER_S)
            await self.store.call("finish", *finish_args)
        except StoreUnavailable:
            pass  # the store ends it as an orphan once it is back
        finally:
            self.lease.release()

    async def _outcome(self, request_id: str, work: Awaitable[Outcome], timeout_s: float,
                       events: EventSender | None, claimed: list) -> Outcome | None:
        started = time.perf_counter()
        task = asyncio.ensure_future(work)
        cancel = asyncio.ensure_future(self._cancelled(request_id, events, claimed))
        try:
            done, _ = await asyncio.wait({task, cancel}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the caller gave up on it (e.g. the store refused it): stop the work
            task.cancel()
            cancel.cancel()
            raise
        if task in done:
            timeline.mark(request_id, "run.work_done")
            cancel.cancel()
            kind, data, result = task.result()
            return kind, {**data, "elapsed_s": round(time.perf_counter() - started, 4)}, result
        task.cancel()
        await asyncio.wait([task])
        if cancel in done:
            # else the request ended elsewhere (an orphan sweep): nothing to record
            return (CANCELLED, {}, None) if cancel.result() else None
        cancel.cancel()
        message = f"the request ran longer than its time limit of {timeout_s:g} s and was stopped"
        return ERROR, {"code": "timeout", "message": message, "location": None}, None

    async def _cancelled(self, request_id: str, events: EventSender | None, claimed: list) -> bool:
        """True once a cancel is requested (or the request was not admitted); False once it has
        ended elsewhere. The claim carries the events waiting to be sent (`claimed`): one store
        call fewer for a request that runs longer than CLAIM_AFTER_S."""
        await asyncio.sleep(CLAIM_AFTER_S)
        if events is not None:
            claimed += events.take()  # from here on, the sender sends its own
        try:
            return await self.store.call("watch", request_id, self.lease.id, claimed)
        except StoreUnavailable:
            await asyncio.Event().wait()  # without a store only the time limit stops the work
            raise AssertionError("unreachable") from None


def replica_failure(trace: TraceIR, index: int, exc: BaseException) -> dict[str, Any]:
    """The ERROR of a session whose model replica died twice (from `trace`, the session's trace
    number `index` + 1, on)."""
    message = (
        f"the replica of model '{trace.model}' failed while running the session (from trace {index + 1}) "
        f"({type(exc).__name__}), also when retried once; Serve restarts it: retry the request later"
    )
    return {"code": "replica_failed", "message": message, "location": location_dict(trace.loc), "trace": index + 1,
            "model": trace.model}
