"""Ends a client may have before the request store has recorded them.

A model replica answers the ingress while its store call recording the request's end is on its
way (actors/supervisor.py, `answer_first`): a blocking client gets its result a store round trip
sooner. Until the store has that end, this ingress must not show the request as running or count
it against its owner's limit, so a read of the request and its owner's next admission wait for
the recording first (a few ms at most: the call left before the answer did). Another ingress
replica does not know of it; a read there that overtakes the call sees the request running.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

# Longest a route waits for a recording: a store that died answers at once (the replica retries
# the call with a store that is back), so only a store that hangs makes a route wait this long.
WAIT_S = 5.0


class Recordings:
    def __init__(self) -> None:
        self.pending: dict[str, tuple[str, asyncio.Task]] = {}  # request id -> (owner, the wait)

    def add(self, request_id: str, owner: str, call: Any) -> None:
        """`call`: the ObjectRef of the replica's store call recording the end of `request_id`."""
        task = asyncio.ensure_future(_settled(call))
        self.pending[request_id] = (owner, task)
        task.add_done_callback(lambda _: self.pending.pop(request_id, None))

    async def of_request(self, request_id: str) -> None:
        """Return once the store has the end of `request_id`, if this ingress sent it first."""
        entry = self.pending.get(request_id)
        if entry is not None:
            await asyncio.wait([entry[1]], timeout=WAIT_S)

    async def of_owner(self, owner: str) -> None:
        """Return once the store has the ends this ingress sent `owner` first."""
        waits = [task for who, task in self.pending.values() if who == owner]
        if waits:
            await asyncio.wait(waits, timeout=WAIT_S)


async def _settled(call: Any) -> None:
    with contextlib.suppress(Exception):  # a dead store: the replica makes the call again when it is back
        await call
