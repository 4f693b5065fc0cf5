"""Ends a client may have before the request store has recorded them.

A model replica answers the ingress while its store call recording the request's end is on its
way (actors/supervisor.py, `answer_first`): a blocking client gets its result a store round trip
sooner. Until the store has that end, this ingress must not show the request as running or count
it against its owner's limit. So it keeps the call's ObjectRef for a while, and a read of the
request waits for the store's answer first, as does a second try of its owner's admission when
the store refused it at her limit (usually the call is there already: it left before the answer
did). Nothing waits otherwise: awaiting a replica's ObjectRef costs an RPC to that replica.
Another ingress replica does not know of it; a read there that overtakes the call sees the
request still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

# Longest a route waits for a recording: a store that died fails the call at once (the replica
# makes it again with the store that is back), so only a store that hangs makes a route wait.
WAIT_S = 5.0
# How long a recording is kept: the call takes milliseconds; a store restart fails it at once.
KEEP_S = 10.0


class Recordings:
    def __init__(self) -> None:
        # request id -> (owner, the store call's ObjectRef, when it was added), oldest first
        self.pending: dict[str, tuple[str, Any, float]] = {}

    def add(self, request_id: str, owner: str, call: Any) -> None:
        """`call`: the ObjectRef of the replica's store call recording the end of `request_id`."""
        now = time.monotonic()
        while self.pending:  # forget those kept long enough (oldest first)
            oldest = next(iter(self.pending))
            if now - self.pending[oldest][2] < KEEP_S:
                break
            del self.pending[oldest]
        self.pending[request_id] = (owner, call, now)

    async def of_request(self, request_id: str) -> None:
        """Return once the store has the end of `request_id`, if this ingress sent it first."""
        entry = self.pending.pop(request_id, None)
        if entry is not None:
            await _settled([entry[1]])

    async def of_owner(self, owner: str) -> bool:
        """Wait until the store has the ends this ingress sent `owner` first; False if none."""
        ids = [rid for rid, (who, _, _) in self.pending.items() if who == owner]
        if ids:
            await _settled([self.pending.pop(rid)[1] for rid in ids])
        return bool(ids)


async def _settled(calls: list[Any]) -> None:
    async def one(call: Any) -> None:
        with contextlib.suppress(Exception):  # a dead store: the replica makes the call again
            await call

    await asyncio.wait([asyncio.ensure_future(one(call)) for call in calls], timeout=WAIT_S)
