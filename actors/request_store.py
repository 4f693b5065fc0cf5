"""The request store: the one actor that fronts the durable request state (actors/state_db.py).

It holds each request's owner, state, event log (what the SSE route streams) and result, in an
embedded database and files under the config's `state_dir`, never only in its own memory: the
actor restarts on any death (`max_restarts=-1`, always on the head node, where the files are) and
carries on from the database; a restarted `raysight serve` with the same `state_dir` still serves
the results it had. Callers reach it through `StoreClient`, which re-fetches the actor by name and
retries (bounded) when a call finds it dead, so no caller holds a dead handle.

Readers wait on new events with a condition instead of polling. Per-user concurrency and the
quotas on stored result and log bytes are admitted here, atomically (one actor, one writer).
A background task expires results (fetched ones after a grace period, all after the TTL) and ends
orphans: requests whose runner (the session runner, or the model replica a single-model session
runs on) stopped renewing its lease (it died with the ingress that would have retried it), so no
request stays RUNNING forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorUnschedulableError, RayActorError

from actors.state_db import DEFAULT_STATE_DIR, Row, StateDB
from intervention.events import CANCELLED, COMPLETED, ERROR, LOG, STATUS, TERMINAL

STORE_NAME = "raysight-requests"
NAMESPACE = "raysight"
# A fetched result stays this long: a result handed over inline (a blocking stream's COMPLETED,
# counted as fetched when the request ends) may not have reached a client whose connection broke;
# it reconnects for up to two minutes (client_sdk) and then downloads it.
FETCH_GRACE_S = 300.0
HEARTBEAT_S = 3.0  # how often a process that runs requests renews its lease on them (actors/supervisor.py)
LEASE_S = 15.0  # a runner silent this long is dead: its open requests are orphans
UNCLAIMED_S = 60.0  # an accepted request no runner has started within this is an orphan (covers a runner restart)
ORPHAN_CHECK_S = 2.0
STORE_RETRY_S = 30.0  # how long a caller waits for a dead store to come back before giving up
# How long a runner's call waits for the admission of its request: the ingress sends the admit
# call and the run together, and a run's first call may reach the store first (Ray does not
# order calls from two callers); after a store restart both callers retry within a second or so.
ADMIT_WAIT_S = 10.0


@dataclass(frozen=True)
class StoreSpec:
    """Where the store keeps state and for how long: enough for any caller to (re)create it."""

    state_dir: str = DEFAULT_STATE_DIR
    result_ttl_s: float = 3600.0

    def resolved_dir(self) -> str:
        return str(Path(self.state_dir).expanduser().absolute())


@dataclass(frozen=True)
class Quota:
    """Per-user limits checked at admission (serve_app/config.py `limits` names them)."""

    max_active: int
    max_result_bytes: int
    max_log_bytes: int


class StoreUnavailable(RuntimeError):
    """The request store did not come back within STORE_RETRY_S."""


@ray.remote(num_cpus=0)
class RequestStore:
    def __init__(self, state_dir: str, result_ttl_s: float = 3600.0):
        self.db = StateDB(state_dir)
        self.ttl = result_ttl_s
        self.started = time.time()  # runner leases restart their count with the store
        self.conditions: dict[str, tuple[asyncio.Condition, list[int]]] = {}
        # Open request -> index of its latest event that is news (not a status): what wakes a
        # reader that waits `until_news`. In memory only: after a restart such a reader wakes at
        # its timeout instead (a blocking stream's status interval).
        self.news_at: dict[str, int] = {}
        # Requests refused at admission lately (id -> when): a run that set out with the admit
        # call finds its calls dropped at once, its claim answered "stop" (`_admitted`).
        self.refused: dict[str, float] = {}
        self.tasks: list[asyncio.Task] = []

    def ping(self) -> str:
        self._start_background()
        return "ok"

    # -- lifecycle -----------------------------------------------------------------------------

    async def admit(self, request_id: str, owner: str, n_traces: int, quota: Quota,
                    holder: str | None = None) -> dict | None:
        """Register a request, or say why not: {status, code, message} when `owner` is at a limit.
        `holder`: the lease that holds it until a runner claims it (the admitting ingress's).
        Idempotent (a caller retrying after a store restart gets the same answer)."""
        self._start_background()
        refusal = self._admission(request_id, owner, n_traces, quota, holder)
        now = time.monotonic()
        while self.refused and now - next(iter(self.refused.values())) > ADMIT_WAIT_S:
            del self.refused[next(iter(self.refused))]  # oldest first: no call waits for these any more
        self.refused.pop(request_id, None)
        if refusal is not None:
            self.refused[request_id] = now
        await self._notify(request_id)  # a runner's call that came first waits for this (`_admitted`)
        return refusal

    def _admission(self, request_id: str, owner: str, n_traces: int, quota: Quota, holder: str | None) -> dict | None:
        existing = self.db.get(request_id)
        if existing is not None:
            return None if existing.owner == owner else _refusal(429, "conflict", "request id in use")
        use = self.db.usage(owner)
        if use.active >= quota.max_active:
            return _refusal(429, "too_many_requests",
                            f"at most {quota.max_active} requests per user may run at once "
                            "(limits.max_concurrent_per_user); wait for one to finish")
        if use.result_bytes >= quota.max_result_bytes:
            return _refusal(429, "result_quota",
                            f"your unfetched results hold {use.result_bytes} bytes, at the limit of "
                            f"{quota.max_result_bytes} (limits.max_result_bytes_per_user): fetch or wait "
                            "for results to expire")
        if use.log_bytes >= quota.max_log_bytes:
            return _refusal(429, "log_quota",
                            f"your stored request logs hold {use.log_bytes} bytes, at the limit of "
                            f"{quota.max_log_bytes} (limits.max_log_bytes_per_user): they are freed when "
                            f"their requests expire ({self.ttl:g} s after finishing)")
        self.db.insert(request_id, owner, n_traces, quota.max_result_bytes, quota.max_log_bytes)  # + RECEIVED
        if holder is not None:  # its lease counts from now (`since`) until the holder's next renewal
            self.db.set_runner(request_id, holder)
        return None

    def active(self, owner: str) -> int:
        """How many of `owner`'s requests have not ended: the ingress refuses a user at her limit
        before reading her body (`admit` stays the atomic check)."""
        return self.db.usage(owner).active

    async def add_event(
        self, request_id: str, kind: str, data: dict[str, Any] | None = None, order: tuple[str, int] | None = None
    ) -> None:
        """Record an event. With `order` = (source, n), events of one source are recorded in n
        order even if their calls arrive out of order (Ray does not order async actor calls);
        a number already recorded is a caller's retry and is dropped."""
        if order is None:
            await self._add(request_id, kind, data or {})
            return
        source, n = order
        nxt = self.db.next_seq(request_id, source)
        if n < nxt:
            return
        if n > nxt:
            self.db.hold(request_id, source, n, kind, data or {})
            return
        item: tuple[str, dict] | None = (kind, data or {})
        while item is not None:
            await self._add(request_id, *item, order=(source, nxt))
            nxt += 1
            item = self.db.take_held(request_id, source, nxt)

    async def add_events(self, request_id: str, events: list[tuple[str, dict[str, Any], tuple[str, int]]]) -> None:
        """Record several numbered events (kind, data, (source, n)) of one sender in one call: a
        replica batches its progress (actors/event_sender.py). Each is recorded as `add_event`
        records it, so order and de-duplication of retries are the same."""
        if await self._admitted(request_id) is None:
            return
        for kind, data, order in events:
            await self.add_event(request_id, kind, data, tuple(order))

    async def finish(self, request_id: str, kind: str, data: dict[str, Any], result: bytes | None = None,
                     events: list[tuple[str, dict[str, Any], tuple[str, int]]] = (), inline_limit: int = 0,
                     ) -> dict | None:
        """Record the terminal event; the first one wins (a late COMPLETED after CANCELLED is dropped).
        A result beyond its owner's quota of stored result bytes ends the request in ERROR instead.
        `events`: the sender's events not sent yet (as `add_events` takes them), recorded first.
        `inline_limit`: the caller hands a result of at most that many bytes to the client itself
        (a blocking stream's COMPLETED), so it counts as fetched, as `events` counts one it inlines,
        and no quota refuses it (the quota bounds unfetched results; the caller may have handed it
        over already: actors/supervisor.py).
        Returns the end as recorded, {"id": its index in the request's event log, "event", "data"},
        or None when the request had ended already (or was never admitted)."""
        if events:
            await self.add_events(request_id, events)
        row = await self._admitted(request_id)
        if row is None or row.state in TERMINAL:
            return None
        inline = handed_inline(kind, result, inline_limit)
        if result is not None and not inline:
            held = self.db.usage(row.owner).result_bytes
            if held + len(result) > row.max_result_bytes:
                size, kind, result = len(result), ERROR, None
                data = {"code": "result_quota", "location": None, "message": (
                    f"the result is {size} bytes; with your "
                    f"{held} bytes of unfetched results it exceeds the limit of {row.max_result_bytes} "
                    "(limits.max_result_bytes_per_user): fetch earlier results, or save less")}
        if result is not None:
            self.db.write_result(request_id, result)
        await self._add(request_id, kind, data, result_bytes=None if result is None else len(result))
        if inline:
            self.db.mark_fetched(self.db.get(request_id))  # as recorded: with its result bytes
        return {"id": row.n_events, "event": kind, "data": data}  # recorded at the next index

    async def _add(self, request_id: str, kind: str, data: dict, order: tuple[str, int] | None = None,
                   result_bytes: int | None = None) -> None:
        row = self.db.get(request_id)
        if row is None or row.state in TERMINAL:
            return
        log_bytes = 0
        if kind == LOG:
            if row.logs_capped:
                return
            log_bytes = len(str(data.get("message", "")).encode())
            if self.db.usage(row.owner).log_bytes + log_bytes > row.max_log_bytes:
                self.db.cap_logs(request_id)
                kind, log_bytes, data = LOG, 0, {"message": (
                    f"[raysight] log quota reached (limits.max_log_bytes_per_user = {row.max_log_bytes} "
                    "bytes): this request's later logs are dropped")}
        self.db.append(row, kind, data, order, log_bytes=log_bytes, result_bytes=result_bytes)
        if kind in TERMINAL:
            self.news_at.pop(request_id, None)
        elif kind not in STATUS:
            self.news_at[request_id] = row.n_events  # the index it was recorded at
        await self._notify(request_id)

    async def request_cancel(self, request_id: str, owner: str) -> str | None:
        row = self._owned(request_id, owner)
        if row is None:
            return None
        if row.state not in TERMINAL:
            self.db.set_cancel(request_id)
            if self._orphaned(row, time.time(), self.db.runner_seen()):
                await self._add(request_id, CANCELLED, {})  # nobody runs it: end it here
            await self._notify(request_id)
        return row.state

    async def watch(self, request_id: str, runner: str,
                    events: list[tuple[str, dict[str, Any], tuple[str, int]]] = ()) -> bool:
        """A runner starts `request_id`: it holds the request's lease (renewed by `heartbeat`).
        `events`: its events not sent yet (as `add_events` takes them), recorded first.
        Returns once a cancel is requested (True) or the request has ended (False); True at once
        for a request that was not admitted (its runner must stop)."""
        self._start_background()
        self.db.heartbeat(runner)
        if events:
            await self.add_events(request_id, events)
        if await self._admitted(request_id) is None:
            return True
        self.db.set_runner(request_id, runner)

        def settled() -> bool:
            now = self.db.get(request_id)
            return now is None or now.cancel_requested or now.state in TERMINAL

        await self._wait(request_id, settled, None)
        row = self.db.get(request_id)
        return row is None or row.cancel_requested

    def release(self, request_id: str, holder: str | None = None) -> str | None:
        """The request's runner died and it is about to be retried: `holder` (the retrying
        ingress's lease) holds it until a runner claims it again (with None: it is an orphan
        only if none starts it within UNCLAIMED_S). Returns its state."""
        row = self.db.get(request_id)
        if row is None:
            return None
        if row.state not in TERMINAL:
            self.db.set_runner(request_id, holder)
        return row.state

    def heartbeat(self, runner: str) -> None:
        self._start_background()
        self.db.heartbeat(runner)

    # -- reading -------------------------------------------------------------------------------

    def status(self, request_id: str, owner: str) -> dict | None:
        row = self._owned(request_id, owner)
        if row is None:
            return None
        return {
            "id": request_id,
            "state": row.state,
            "created": row.created,
            "finished": row.finished,
            "traces": row.n_traces,
            "queue_position": (row.queued or {}).get("position") if row.state == "QUEUED" else None,
            "running": row.running,
            "result_available": row.result_bytes is not None,
            "error": row.error if row.state == ERROR else None,
        }

    async def events(
        self, request_id: str, owner: str, after: int, timeout_s: float, inline_limit: int = 0,
        until_news: bool = False,
    ) -> list[dict] | None:
        """Events from index `after` on, waiting up to `timeout_s` for at least one (with
        `until_news`, for one that is not a status, or the end: a blocking stream between two
        status updates, see the ingress).

        With `inline_limit`, a COMPLETED event carries a result of at most that many bytes
        itself (it then counts as fetched): one round trip less for small results."""
        row = self._owned(request_id, owner)
        if row is None:
            return None
        waits = row.state not in TERMINAL and (until_news or row.n_events <= after)
        if until_news and self.news_at.get(request_id, -1) >= after:
            waits = False
        if waits and timeout_s > 0:
            def news() -> bool:
                now = self.db.get(request_id)
                if now is None or now.state in TERMINAL:
                    return True
                if until_news:
                    return self.news_at.get(request_id, -1) >= after
                return now.n_events > after

            await self._wait(request_id, news, timeout_s)
            row = self.db.get(request_id)
            if row is None:
                return None
        if row.n_events <= after:
            return []
        batch = self.db.events(request_id, after)
        last = batch[-1] if batch else None
        if (inline_limit and last and last["event"] == "COMPLETED" and row.result_bytes is not None
                and row.result_bytes <= inline_limit):
            data = self.db.read_result(request_id)
            if data is not None:
                batch[-1] = {**last, "result": data}
                self.db.mark_fetched(row)
        return batch

    def result(self, request_id: str, owner: str) -> tuple[str, bytes | None] | None:
        row = self._owned(request_id, owner)
        if row is None:
            return None
        data = self.db.read_result(request_id) if row.result_bytes is not None else None
        if data is not None:
            self.db.mark_fetched(row)
        return row.state, data

    def unfinished(self) -> list[tuple[str, str, str]]:
        """(id, owner, state) of every request that has not ended (for tests and operators)."""
        return [(r.id, r.owner, r.state) for r in self.db.open_requests()]

    def pid(self) -> int:
        return os.getpid()

    async def recorded(self, ends: list[tuple[str, int]], timeout_s: float) -> None:
        """Return once each (request id, index) of `ends` is recorded (or its request has ended
        or is gone), or after `timeout_s`: an ingress that sent a replica's answer before that
        replica's `finish` arrived here waits for it before reading (serve_app/recordings.py)."""
        deadline = time.monotonic() + timeout_s
        for request_id, index in ends:
            def there(request_id: str = request_id, index: int = index) -> bool:
                row = self.db.get(request_id)
                return row is None or row.n_events > index or row.state in TERMINAL

            if not there():
                await self._wait(request_id, there, max(0.0, deadline - time.monotonic()))

    async def _admitted(self, request_id: str) -> Row | None:
        """The request's row for a runner's call, or None if it was not admitted: the call may
        arrive before the admission the ingress sent with the run (it waits up to ADMIT_WAIT_S)."""
        def decided() -> bool:
            return request_id in self.refused or self.db.get(request_id) is not None

        if not decided():
            await self._wait(request_id, decided, ADMIT_WAIT_S)
        return None if request_id in self.refused else self.db.get(request_id)

    def _owned(self, request_id: str, owner: str) -> Row | None:
        row = self.db.get(request_id)
        return row if row is not None and row.owner == owner else None  # others' ids look absent

    # -- waiting -------------------------------------------------------------------------------

    async def _wait(self, request_id: str, done: Callable[[], bool], timeout_s: float | None) -> None:
        # Per request, so an event wakes only that request's readers, not every open stream.
        cond, waiters = self.conditions.setdefault(request_id, (asyncio.Condition(), [0]))
        waiters[0] += 1
        try:
            async with cond:
                await asyncio.wait_for(cond.wait_for(done), timeout_s)
        except TimeoutError:
            pass
        finally:
            waiters[0] -= 1
            if not waiters[0]:
                self.conditions.pop(request_id, None)

    async def _notify(self, request_id: str) -> None:
        if (entry := self.conditions.get(request_id)) is not None:
            async with entry[0]:
                entry[0].notify_all()

    # -- background: expiry and orphans --------------------------------------------------------

    def _start_background(self) -> None:
        if not self.tasks:
            loop = asyncio.get_running_loop()
            self.tasks = [loop.create_task(self._expire_loop()), loop.create_task(self._orphan_loop())]

    async def _expire_loop(self) -> None:
        while True:
            self.expire(time.time())
            await asyncio.sleep(min(30.0, max(self.ttl / 4, 0.5)))

    async def _orphan_loop(self) -> None:
        while True:
            await asyncio.sleep(ORPHAN_CHECK_S)
            await self.end_orphans(time.time())

    def expire(self, now: float) -> int:
        """Drop results fetched a while ago and requests past the TTL. Returns how many went."""
        return self.db.expire(now, self.ttl, FETCH_GRACE_S)

    async def end_orphans(self, now: float) -> list[str]:
        """End every open request that no live runner holds; returns their ids."""
        if now - self.started < LEASE_S:  # leases are counted from the store's (re)start
            return []
        seen = self.db.runner_seen()
        ended = []
        for row in self.db.open_requests():
            if not self._orphaned(row, now, seen):
                continue
            if row.cancel_requested:
                await self._add(row.id, CANCELLED, {})
            else:
                await self._add(row.id, ERROR, {"code": "orphaned", "location": None, "message": (
                    "the service processes running this request died (the one that ran it, a session "
                    "runner or a model replica, and the ingress that submitted it); it was stopped: submit it again")})
            ended.append(row.id)
        return ended

    def _orphaned(self, row: Row, now: float, seen: dict[str, float]) -> bool:
        if now - self.started < LEASE_S:
            return False
        if row.runner is None:
            return now - row.since > UNCLAIMED_S
        return now - max(seen.get(row.runner, 0.0), row.since) > LEASE_S


def _refusal(status: int, code: str, message: str) -> dict:
    return {"status": status, "code": code, "message": message}


def get_store(spec: StoreSpec) -> Any:
    """The cluster's store actor, created on first use: detached (it outlives ingress restarts),
    restarted by Ray whenever it dies, and placed on the head node, whose disk holds the state."""
    return RequestStore.options(
        name=STORE_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, resources={"node:__internal_head__": 0.001},
    ).remote(spec.resolved_dir(), spec.result_ttl_s)


def handed_inline(kind: str, result: bytes | None, inline_limit: int) -> bool:
    """Whether the process that records this end hands its result to the client itself (a
    blocking stream's COMPLETED carries results up to `inline_limit` bytes): such a result counts
    as fetched once recorded, and no quota refuses it."""
    return kind == COMPLETED and result is not None and len(result) <= inline_limit


class StoreClient:
    """A caller's way to the store: `await client.call("status", ...)`. On a dead or restarting
    store it gets the actor by name again (creating it if it is gone for good) and retries, for
    at most STORE_RETRY_S; then raises StoreUnavailable. Calls are made idempotent by the store,
    so a retry is safe. The happy path is one plain actor call."""

    def __init__(self, spec: StoreSpec):
        self.spec = spec
        self.handle = get_store(spec)

    async def call(self, method: str, *args: Any) -> Any:
        deadline = time.monotonic() + STORE_RETRY_S
        delay = 0.05
        while True:
            try:
                return await getattr(self.handle, method).remote(*args)
            except (RayActorError, ActorUnschedulableError) as exc:
                if time.monotonic() > deadline:
                    raise StoreUnavailable(
                        f"the request store did not answer for {STORE_RETRY_S:g} s ({type(exc).__name__})"
                    ) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            self.refresh()

    def start(self, method: str, *args: Any) -> StartedCall:
        """Start a call (idempotent, as all are) whose answer is awaited later, here or in another
        process this one hands it to (its ObjectRef travels with a Ray call)."""
        try:
            ref = getattr(self.handle, method).remote(*args)
        except Exception:  # noqa: BLE001 - a broken handle: the answer makes the call with retries
            ref = None
        return StartedCall(ref, method, args)

    def refresh(self) -> None:
        # The GCS may be briefly unreachable too: keep the old handle, the next try retries.
        with contextlib.suppress(Exception):
            self.handle = get_store(self.spec)


@dataclass(frozen=True)
class StartedCall:
    """A store call already on its way (`StoreClient.start`)."""

    ref: Any  # ray.ObjectRef, or None when it could not be sent
    method: str
    args: tuple

    async def answer(self, store: StoreClient) -> Any:
        """Its answer; when the store died meanwhile, the call again through `store` (retrying
        until the store is back: StoreUnavailable after STORE_RETRY_S)."""
        if self.ref is not None:
            try:
                return await self.ref
            except (RayActorError, ActorUnschedulableError):
                pass
        return await store.call(self.method, *self.args)
