"""The ingress's record of ends a replica answered before the store had them
(serve_app/recordings.py): a read of such a request, and a second try of its owner's admission,
wait for the store's answer to the recording call, and no longer than that; nothing else waits."""

from __future__ import annotations

import asyncio

import pytest

from serve_app import recordings as module
from serve_app.recordings import Recordings


def test_a_read_and_the_owners_second_admission_wait_for_the_recording() -> None:
    async def run() -> list[str]:
        order: list[str] = []
        recordings = Recordings()
        call = asyncio.get_running_loop().create_future()  # stands for the store call's ObjectRef
        other = asyncio.get_running_loop().create_future()
        recordings.add("r1", "alice", call)
        recordings.add("r2", "alice", other)

        async def step(name: str, what) -> None:
            result = await what
            order.append(name if result is None else f"{name}: {result}")

        reading = asyncio.ensure_future(step("read r1", recordings.of_request("r1")))
        admitting = asyncio.ensure_future(step("admit alice", recordings.of_owner("alice")))
        await step("read r3", recordings.of_request("r3"))  # nothing pending: at once
        await step("admit bob", recordings.of_owner("bob"))
        await asyncio.sleep(0.01)
        order.append("recorded r1")
        call.set_result({"id": 2, "event": "COMPLETED", "data": {}})
        await reading
        order.append("recorded r2")
        other.set_result({"id": 4, "event": "COMPLETED", "data": {}})
        await admitting
        assert not recordings.pending  # each is waited for once
        await step("read r1 again", recordings.of_request("r1"))
        return order

    assert asyncio.run(run()) == ["read r3", "admit bob: False", "recorded r1", "read r1", "recorded r2",
                                  "admit alice: True", "read r1 again"]


def test_a_failed_recording_call_ends_the_wait() -> None:
    """A store that died fails the call at once (the replica makes it again): the route goes on."""

    async def run() -> None:
        recordings = Recordings()
        call = asyncio.get_running_loop().create_future()
        recordings.add("r1", "alice", call)
        call.set_exception(RuntimeError("the actor died"))
        await asyncio.wait_for(recordings.of_request("r1"), 1.0)

    asyncio.run(run())


def test_recordings_are_kept_for_a_while_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A recording nobody asked about is forgotten after KEEP_S (its call took milliseconds)."""
    now = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])

    async def run() -> list[str]:
        recordings = Recordings()
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        recordings.add("old", "alice", done)
        now[0] += module.KEEP_S / 2
        recordings.add("newer", "bob", done)
        now[0] += module.KEEP_S / 2
        recordings.add("newest", "bob", done)
        return list(recordings.pending)

    assert asyncio.run(run()) == ["newer", "newest"]
