"""The ingress's record of ends a replica answered before the store had them
(serve_app/recordings.py): a read of such a request, and its owner's next admission, wait for the
store's answer to the recording call, and no longer than that."""

from __future__ import annotations

import asyncio

from serve_app.recordings import Recordings


def test_reads_and_the_owners_admission_wait_for_the_recording() -> None:
    async def run() -> list[str]:
        order: list[str] = []
        recordings = Recordings()
        call = asyncio.get_running_loop().create_future()  # stands for the store call's ObjectRef
        recordings.add("r1", "alice", call)

        async def read(what, name: str) -> None:
            await what
            order.append(name)

        waiting = [asyncio.ensure_future(read(recordings.of_request("r1"), "read r1")),
                   asyncio.ensure_future(read(recordings.of_owner("alice"), "admit alice"))]
        await read(recordings.of_request("r2"), "read r2")  # nothing pending: at once
        await read(recordings.of_owner("bob"), "admit bob")
        await asyncio.sleep(0.01)
        order.append("recorded")
        call.set_result({"id": 2, "event": "COMPLETED", "data": {}})
        await asyncio.gather(*waiting)
        assert not recordings.pending  # forgotten once recorded
        return order

    order = asyncio.run(run())
    assert order[:2] == ["read r2", "admit bob"] and order[2] == "recorded", order
    assert set(order[3:]) == {"read r1", "admit alice"}


def test_a_failed_recording_call_stops_the_wait() -> None:
    """A store that died fails the call at once (the replica makes it again): routes go on."""

    async def run() -> bool:
        recordings = Recordings()
        call = asyncio.get_running_loop().create_future()
        recordings.add("r1", "alice", call)
        call.set_exception(RuntimeError("the actor died"))
        await asyncio.wait_for(recordings.of_request("r1"), 1.0)
        return not recordings.pending

    assert asyncio.run(run())
