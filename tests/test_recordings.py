"""The ingress's record of ends a replica answered before the store had them
(serve_app/recordings.py): a read of such a request, and a second try of its owner's admission,
ask the store to wait until those ends are recorded, once; nothing else waits."""

from __future__ import annotations

import asyncio

import pytest

from serve_app import recordings as module
from serve_app.recordings import Recordings


class Store:
    """Stands for the store's `recorded`: each wait returns when the test records those ends."""

    def __init__(self) -> None:
        self.waits: list[tuple[list[tuple[str, int]], asyncio.Future]] = []

    async def wait(self, ends: list[tuple[str, int]]) -> None:
        done = asyncio.get_running_loop().create_future()
        self.waits.append((ends, done))
        await done

    def record(self, ends: list[tuple[str, int]]) -> None:
        for asked, done in self.waits:
            if asked == ends:
                done.set_result(None)


def test_a_read_and_the_owners_second_admission_wait_for_the_recording() -> None:
    async def run() -> list[str]:
        order: list[str] = []
        store = Store()
        recordings = Recordings(store.wait)
        recordings.add("r1", "alice", 2)
        recordings.add("r2", "alice", 4)

        async def step(name: str, what) -> None:
            result = await what
            order.append(name if result is None else f"{name}: {result}")

        reading = asyncio.ensure_future(step("read r1", recordings.of_request("r1")))
        admitting = asyncio.ensure_future(step("admit alice", recordings.of_owner("alice")))
        await step("read r3", recordings.of_request("r3"))  # nothing pending: at once, no store call
        await step("admit bob", recordings.of_owner("bob"))
        await asyncio.sleep(0)
        assert [ends for ends, _ in store.waits] == [[("r1", 2)], [("r2", 4)]]  # each asked about once
        order.append("recorded r1")
        store.record([("r1", 2)])
        await reading
        order.append("recorded r2")
        store.record([("r2", 4)])
        await admitting
        assert not recordings.pending
        await step("read r1 again", recordings.of_request("r1"))
        assert len(store.waits) == 2
        return order

    assert asyncio.run(run()) == ["read r3", "admit bob: False", "recorded r1", "read r1", "recorded r2",
                                  "admit alice: True", "read r1 again"]


def test_recordings_are_kept_for_a_while_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A recording nobody asked about is forgotten after KEEP_S (its call took milliseconds)."""
    now = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    recordings = Recordings(Store().wait)
    recordings.add("old", "alice", 1)
    now[0] += module.KEEP_S / 2
    recordings.add("newer", "bob", 1)
    now[0] += module.KEEP_S / 2
    recordings.add("newest", "bob", 1)
    assert list(recordings.pending) == ["newer", "newest"]
