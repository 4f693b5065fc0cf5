"""Ends a client may have before the request store has recorded them.

A model replica answers the ingress first and then makes the store call that records the
request's end (actors/supervisor.py, `answer_first`: 1 ms later): a blocking client gets its
result a store round trip sooner. Until the store has that end, this ingress must not show the
request as running or count it against its owner's limit. So it keeps the end's index in the
request's event log for a while, and a read of the request first asks the store to wait until
that index is recorded (one store call, answered at once when it is there: usually the replica's
call has reached the store by the time a client reads), as does a second try of its owner's
admission when the store refused it at her limit. Nothing waits otherwise. Another ingress replica does not know of it; a read there that overtakes the
call sees the request still running.

No ObjectRef of the replica's call travels back with the answer: a ref in a Serve call's
answer cost about a millisecond per round trip in a bare Serve app (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

# Longest a route waits for a recording: the replica's call takes milliseconds, and after a
# store restart the replica makes it again within a second or so.
WAIT_S = 5.0
# How long a recording is kept: nobody asks about it after that (its call took milliseconds).
KEEP_S = 10.0

# Waits until each (request id, event index) is recorded, or for WAIT_S at most (the store's `recorded`).
Wait = Callable[[list[tuple[str, int]]], Awaitable[None]]


class Recordings:
    def __init__(self, wait: Wait) -> None:
        self.wait = wait
        # request id -> (owner, the end's index in its event log, when it was added), oldest first
        self.pending: dict[str, tuple[str, int, float]] = {}

    def add(self, request_id: str, owner: str, index: int) -> None:
        """A replica answered the end of `request_id`, at `index` of its event log, before the
        store had it."""
        now = time.monotonic()
        while self.pending:  # forget those kept long enough (oldest first)
            oldest = next(iter(self.pending))
            if now - self.pending[oldest][2] < KEEP_S:
                break
            del self.pending[oldest]
        self.pending[request_id] = (owner, index, now)

    async def of_request(self, request_id: str) -> None:
        """Return once the store has the end of `request_id`, if this ingress sent it first."""
        entry = self.pending.pop(request_id, None)
        if entry is not None:
            await self.wait([(request_id, entry[1])])

    async def of_owner(self, owner: str) -> bool:
        """Wait until the store has the ends this ingress sent `owner` first; False if none."""
        ends = [(rid, index) for rid, (who, index, _) in self.pending.items() if who == owner]
        for rid, _ in ends:
            del self.pending[rid]
        if ends:
            await self.wait(ends)
        return bool(ends)
