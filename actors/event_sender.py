"""A replica's events for one request (QUEUED, RUNNING, LOG) to the request store, in batches.

Every event sent on its own costs a store call, a wake-up of each stream following the request
and a chunk through Serve's proxy, which for a short request is most of its cost. So events wait
a little (`STATUS_HOLD_S`) to travel together in one `add_events` call:

- the sender's first events wait STATUS_HOLD_S: a request that finishes within it sends all its
  events in the one batch `flush` sends (then the stream carries them with the end); under a
  Supervisor (`wait_for_claim`) they wait for the runner's claim, due at that time, or the end,
  and travel with it: no call of their own;
- later, an event after a quiet spell (nothing sent for STATUS_HOLD_S) goes at once, so a queued
  request's RUNNING is not late; otherwise it joins the batch that goes STATUS_HOLD_S after the
  last one, so a long session sends at most one batch per interval.

Events are numbered per sender: the store records them in number order however calls arrive and
drops a number it has (a retry). `send` never waits and may be called from the forward thread;
`flush` sends what waits and returns once the store has every event (retrying through the
StoreClient, which finds a restarted store, when a call found it dead); `take` and `settle` instead
hand what waits to the caller, which sends it with the runner's claim or the request's end
(actors/supervisor.py).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from typing import Any

from actors.request_store import StoreClient
from intervention.events import STATUS, STATUS_HOLD_S


class EventSender:
    def __init__(self, store: StoreClient, request_id: str, hold_s: float = STATUS_HOLD_S,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.store, self.request_id, self.hold_s = store, request_id, hold_s
        self.source = uuid.uuid4().hex
        self.numbers = itertools.count()  # next() is atomic: the forward thread sends too
        self.loop = loop or asyncio.get_running_loop()  # the replica's event loop: calls start there
        self.pending: list[tuple[str, dict, tuple[str, int]]] = []
        self.last_sent: float | None = None  # None: nothing sent yet (the first batch waits)
        self.timer: asyncio.TimerHandle | None = None
        self.calls: set[asyncio.Task] = set()
        self.batches = 0  # store calls made (the tests check the batching)
        self.news = False  # whether anything but status (QUEUED, RUNNING) was sent
        self.sent = 0  # events sent so far (each takes the request's next event index, bar LOGs past the quota)
        self.claim_due = False  # the first events wait for the runner's claim (`wait_for_claim`)

    def send(self, kind: str, data: dict[str, Any]) -> None:
        if kind not in STATUS:
            self.news = True
        event = (kind, data, (self.source, next(self.numbers)))  # numbered in the caller's order
        if _running_loop() is self.loop:
            self._add(event)
        else:  # another thread (the forward): the loop adds it, in the order sent
            self.loop.call_soon_threadsafe(self._add, event)

    async def flush(self) -> None:
        self._ship()
        while self.calls:
            await asyncio.gather(*self.calls)

    async def settle(self) -> list[tuple[str, dict, tuple[str, int]]]:
        """Wait for the batches on their way and hand over the events not sent yet, instead of
        sending them: the caller records them with the request's end, in one store call."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.calls:
            await asyncio.gather(*self.calls)
        pending, self.pending = self.pending, []
        return pending

    def wait_for_claim(self) -> None:
        """The first events wait for `take` (the runner's claim, which is due when they would go)
        or `settle` (the end, if it comes first) instead of a call of their own."""
        self.claim_due = True

    def take(self) -> list[tuple[str, dict, tuple[str, int]]]:
        """Hand over the events waiting to be sent, as if sent now: the caller sends them in a
        store call it makes anyway (the runner's claim, actors/supervisor.py)."""
        self.claim_due = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        taken, self.pending = self.pending, []
        if taken:
            self.last_sent = time.monotonic()
        return taken

    def _add(self, event: tuple) -> None:
        self.pending.append(event)
        self.sent += 1
        if self.timer is not None or self.claim_due:
            return  # a batch is due (or the claim): this event goes with it
        now = time.monotonic()
        if self.last_sent is None:
            delay = self.hold_s
        else:
            delay = self.last_sent + self.hold_s - now
        if delay <= 0:
            self._ship()
        else:
            self.timer = self.loop.call_later(delay, self._ship)

    def _ship(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        self.last_sent = time.monotonic()
        self.batches += 1
        task = self.loop.create_task(self._call(batch))
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)

    async def _call(self, batch: list[tuple]) -> None:
        try:
            await self.store.handle.add_events.remote(self.request_id, batch)
        except Exception:  # noqa: BLE001 - a dead store: again through the client, which waits for it
            await self.store.call("add_events", self.request_id, batch)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
