"""The request store: one detached actor that remembers every accepted request.

It holds each request's owner, state, event log (what the SSE route streams) and result bytes,
outside the ingress, so an ingress replica restarting loses nothing. Readers wait on new events
with a condition instead of polling. Results are dropped a grace period after they are fetched,
or when the TTL passes; per-user concurrency is admitted here, atomically.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import ray

STORE_NAME = "raysight-requests"
NAMESPACE = "raysight"
TERMINAL = ("COMPLETED", "ERROR", "CANCELLED")
FETCH_GRACE_S = 60.0


@dataclass
class _Request:
    owner: str
    created: float
    n_traces: int
    state: str = "RECEIVED"
    events: list[dict] = field(default_factory=list)
    result: bytes | None = None
    finished: float | None = None
    fetched: float | None = None
    cancel_requested: bool = False
    held: dict[str, dict[int, tuple]] = field(default_factory=dict)  # numbered events, early
    next_number: dict[str, int] = field(default_factory=dict)
    # Per request, so an event wakes only that request's readers, not every open stream.
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


@ray.remote(num_cpus=0)
class RequestStore:
    def __init__(self, result_ttl_s: float = 3600.0):
        self.requests: dict[str, _Request] = {}
        self.ttl = result_ttl_s
        self._sweeper: asyncio.Task | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def admit(self, request_id: str, owner: str, n_traces: int, max_active: int) -> bool:
        """Register a request unless `owner` already has `max_active` unfinished ones."""
        self._start_sweeper()
        active = sum(1 for r in self.requests.values() if r.owner == owner and r.state not in TERMINAL)
        if active >= max_active:
            return False
        self.requests[request_id] = _Request(owner=owner, created=time.time(), n_traces=n_traces)
        await self._add(request_id, "RECEIVED", {"id": request_id})
        return True

    def active(self, owner: str) -> int:
        """How many of `owner`'s requests have not ended: the ingress refuses a user at her limit
        before reading her body (`admit` stays the atomic check)."""
        return sum(1 for r in self.requests.values() if r.owner == owner and r.state not in TERMINAL)

    async def add_event(
        self, request_id: str, kind: str, data: dict[str, Any] | None = None, order: tuple[str, int] | None = None
    ) -> None:
        """Record an event. With `order` = (source, n), events of one source are recorded in n
        order even if their calls arrive out of order (Ray does not order async actor calls)."""
        req = self.requests.get(request_id)
        if order is None or req is None:
            await self._add(request_id, kind, data or {})
            return
        source, n = order
        held = req.held.setdefault(source, {})
        held[n] = (kind, data or {})
        while (nxt := req.next_number.get(source, 0)) in held:
            req.next_number[source] = nxt + 1
            await self._add(request_id, *held.pop(nxt))

    async def finish(self, request_id: str, kind: str, data: dict[str, Any], result: bytes | None = None) -> None:
        """Record the terminal event; the first one wins (a late COMPLETED after CANCELLED is dropped)."""
        req = self.requests.get(request_id)
        if req is None or req.state in TERMINAL:
            return
        req.result = result
        req.finished = time.time()
        await self._add(request_id, kind, data)

    async def _add(self, request_id: str, kind: str, data: dict) -> None:
        req = self.requests.get(request_id)
        if req is None or req.state in TERMINAL:
            return
        req.events.append({"event": kind, "data": data, "time": time.time()})
        req.state = kind if kind != "LOG" else req.state
        async with req.changed:
            req.changed.notify_all()

    async def request_cancel(self, request_id: str, owner: str) -> str | None:
        req = self._owned(request_id, owner)
        if req is None:
            return None
        if req.state not in TERMINAL:
            req.cancel_requested = True
            async with req.changed:
                req.changed.notify_all()
        return req.state

    async def wait_cancel(self, request_id: str) -> bool:
        """Returns once a cancel is requested (True) or the request has ended (False)."""
        req = self.requests.get(request_id)
        if req is None:
            return True
        async with req.changed:
            await req.changed.wait_for(lambda: req.cancel_requested or req.state in TERMINAL)
        return req.cancel_requested

    # -- reading -------------------------------------------------------------------------------

    def status(self, request_id: str, owner: str) -> dict | None:
        req = self._owned(request_id, owner)
        if req is None:
            return None
        last = {}
        for e in req.events:
            if e["event"] in ("QUEUED", "RUNNING"):
                last[e["event"]] = e["data"]
        return {
            "id": request_id,
            "state": req.state,
            "created": req.created,
            "finished": req.finished,
            "traces": req.n_traces,
            "queue_position": last.get("QUEUED", {}).get("position") if req.state == "QUEUED" else None,
            "running": last.get("RUNNING"),
            "result_available": req.result is not None,
            "error": req.events[-1]["data"] if req.state == "ERROR" else None,
        }

    async def events(
        self, request_id: str, owner: str, after: int, timeout_s: float, inline_limit: int = 0
    ) -> list[dict] | None:
        """Events from index `after` on, waiting up to `timeout_s` for at least one.

        With `inline_limit`, a COMPLETED event carries a result of at most that many bytes
        itself (it then counts as fetched): one round trip less for small results."""
        req = self._owned(request_id, owner)
        if req is None:
            return None
        if len(req.events) <= after and req.state not in TERMINAL:
            async with req.changed:
                try:
                    await asyncio.wait_for(
                        req.changed.wait_for(lambda: len(req.events) > after or req.state in TERMINAL),
                        timeout_s,
                    )
                except TimeoutError:
                    pass
        batch = req.events[after:]
        last = batch[-1] if batch else None
        if inline_limit and last and last["event"] == "COMPLETED" and req.result is not None and len(req.result) <= inline_limit:
                batch = batch[:-1] + [{**batch[-1], "result": req.result}]
                req.fetched = req.fetched or time.time()
        return batch

    def result(self, request_id: str, owner: str) -> tuple[str, bytes | None] | None:
        req = self._owned(request_id, owner)
        if req is None:
            return None
        if req.result is not None and req.fetched is None:
            req.fetched = time.time()
        return req.state, req.result

    def _owned(self, request_id: str, owner: str) -> _Request | None:
        req = self.requests.get(request_id)
        return req if req is not None and req.owner == owner else None  # others' ids look absent

    # -- expiry --------------------------------------------------------------------------------

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, max(self.ttl / 4, 0.5)))
            self.expire(time.time())

    def expire(self, now: float) -> int:
        """Drop results fetched a while ago and requests past the TTL. Returns how many went."""
        gone = [
            rid for rid, r in self.requests.items()
            if r.finished is not None and now - r.finished > self.ttl
        ]
        for rid in gone:
            del self.requests[rid]
        for r in self.requests.values():
            if r.fetched is not None and now - r.fetched > FETCH_GRACE_S:
                r.result = None
        return len(gone)


def get_store(result_ttl_s: float = 3600.0):
    """The cluster's store, created on first use (detached: it outlives ingress restarts)."""
    return RequestStore.options(
        name=STORE_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(result_ttl_s)
