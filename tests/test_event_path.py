"""The lean event path (issue 9, item 5): a replica's events reach the store in batches, and a
blocking client's stream carries what it needs (the id in its header, live status, LOG, the end) in
few chunks, while the store's event log, which GET /events replays, keeps every event."""

from __future__ import annotations

import asyncio
import base64
import threading
import uuid

import httpx
import pytest
from remote_helpers import (
    no_leftover_requests,  # noqa: F401 - a fixture used below
    record,
    slow_session,
    slow_traces,
    sse_events,
)

import client_sdk
from actors.event_sender import EventSender
from actors.request_store import Quota, StoreClient, StoreSpec
from intervention.events import LOG, REQUEST_ID_HEADER, RUNNING, STATUS_INTERVAL_S
from intervention.wire import decode_result

pytestmark = pytest.mark.usefixtures("remote_client", "no_leftover_requests")


def _blocking_stream(url: str, key: str, body: bytes) -> tuple[str, list[tuple[str, dict]], int]:
    """What `client_sdk`'s blocking run reads: POST with Accept: text/event-stream. Returns the
    request's id (the header that stands for RECEIVED), the events and the last event's id."""
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream",
               "Content-Type": "application/octet-stream"}
    with httpx.Client(base_url=url, timeout=httpx.Timeout(30.0, read=120.0)) as http, \
            http.stream("POST", "/v1/requests", content=body, headers=headers) as r:
        assert r.status_code == 202, r.read()
        rid = r.headers[REQUEST_ID_HEADER]  # with the status line, before any (held) event
        lines = list(r.iter_lines())
    ids = [int(line.removeprefix("id: ")) for line in lines if line.startswith("id: ")]
    return rid, list(sse_events(iter(lines))), ids[-1]


def test_a_status_made_stale_by_a_later_event_is_left_out_of_a_chunk() -> None:
    from serve_app.ingress import _chunk

    batch = [(0, {"event": "RECEIVED", "data": {"id": "r"}}), (1, {"event": "QUEUED", "data": {"position": 1}}),
             (2, {"event": RUNNING, "data": {"trace": 1}}), (3, {"event": LOG, "data": {"message": "m"}}),
             (4, {"event": RUNNING, "data": {"trace": 2}}),
             (5, {"event": "COMPLETED", "data": {}, "result": b"ab"})]

    def ids(text: str) -> list[str]:
        return [line.split(": ")[1] for line in text.splitlines() if line.startswith("id: ")]

    # a blocking client's stream: the end replaces its status line too
    assert ids(_chunk(batch, end_supersedes=True)) == ["0", "2", "3", "5"]
    # any other stream keeps the last status before the end (ids stay the store's indices)
    assert ids(_chunk(batch, end_supersedes=False)) == ["0", "2", "3", "4", "5"]
    assert 'data: {"result":"YWI="}' in _chunk(batch[-1:], end_supersedes=True)  # result inline, base64


def test_a_quick_request_streams_its_id_and_its_end_and_the_store_keeps_every_event(cluster, alice, small_body) -> None:
    rid, events, end_id = _blocking_stream(cluster.url, cluster.keys["alice"], small_body)
    assert alice.status(rid)["state"] == "COMPLETED"  # the store has the end the stream sent
    kinds = [k for k, _ in events]
    # RECEIVED is the header (not repeated on the stream); RUNNING only when the request took
    # longer than the status interval (a slow machine)
    assert kinds[-1] == "COMPLETED" and set(kinds) <= {RUNNING, "COMPLETED"}, kinds
    values, _ = decode_result(base64.b64decode(events[-1][1]["result"]))
    assert len(values) == 1
    replay = [k for k, _ in alice.events(rid)]  # GET /events: the store's whole log
    assert replay == ["RECEIVED", "RUNNING", "COMPLETED"], replay
    # The replica sent the end before the store had recorded it, with the index the store gave it
    # (a stream's ids are the store's indices): resuming after the one before it replays the end.
    assert end_id == 2 and [k for k, _ in alice.events(rid, after=end_id - 1)] == ["COMPLETED"]


def test_a_long_session_streams_live_status_and_the_log_keeps_every_trace(cluster, alice, llama) -> None:
    n = 30
    rid, events, _ = _blocking_stream(cluster.url, cluster.keys["alice"], slow_session(llama, n))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "COMPLETED" and "RECEIVED" not in kinds, kinds
    elapsed = events[-1][1]["elapsed_s"]
    assert elapsed > 2 * STATUS_INTERVAL_S, "the session must outlast two status intervals"
    live = [d["trace"] for k, d in events if k == RUNNING]
    assert live and live == sorted(live), events  # progress arrives while it runs, in order
    # ... as a status line: at most one status a second (STATUS_INTERVAL_S), the first a second
    # after RECEIVED, not one per trace (each of these traces takes a small fraction of a second)
    assert len(live) <= elapsed / STATUS_INTERVAL_S < n, events
    stored = [d["trace"] for k, d in _store_events(StoreClient(StoreSpec()), rid) if k == RUNNING]
    assert stored == list(range(1, n + 1)), stored  # the store's log has every trace's RUNNING
    assert alice.end(rid)[0] == "COMPLETED"  # and GET /events replays it to the end


def test_a_log_reaches_a_blocking_stream_while_the_session_still_runs(cluster, alice, llama) -> None:
    """News goes at once, also within the first second (when status alone would wait)."""

    def body():
        with llama.trace("The Eiffel Tower is in the city of"):
            client_sdk.log("early news")
        slow_traces(llama, 30)

    headers = {"Authorization": f"Bearer {cluster.keys['alice']}", "Accept": "text/event-stream",
               "Content-Type": "application/octet-stream"}
    with httpx.Client(base_url=cluster.url, timeout=httpx.Timeout(30.0, read=120.0)) as http, \
            http.stream("POST", "/v1/requests", content=record(body), headers=headers) as r:
        rid = r.headers[REQUEST_ID_HEADER]
        events = sse_events(r.iter_lines())
        before = []
        for kind, data in events:  # (the status it makes current comes with it)
            if kind == LOG:
                break
            before.append(kind)
        assert data["message"] == "early news" and set(before) <= {RUNNING}, (before, data)
        assert alice.status(rid)["state"] == RUNNING  # it came before the end
        assert [k for k, _ in events][-1] == "COMPLETED"


def test_a_blocking_run_gives_its_connection_back_to_the_pool(cluster, llama) -> None:
    """The client reads a stream to its end after the terminal event, so its keep-alive connection
    serves the next request (else each blocking run would cost a new TCP and TLS handshake)."""
    from client_sdk.remote import _client

    def run():
        with llama.trace("The Eiffel Tower is in the city of", remote=True):
            out = llama.lm_head.output.argmax(dim=-1).save()
        return out

    run()
    pool = _client()._transport._pool
    first = list(pool.connections)
    run()
    assert len(first) == 1 and first[0].is_idle(), first  # back in the pool, not closed
    assert list(pool.connections) == first  # and used again


def _store_events(store: StoreClient, rid: str) -> list[tuple[str, dict]]:
    async def read():
        return await store.call("events", rid, "alice", 0, 0.0)

    return [(e["event"], e["data"]) for e in asyncio.run(read())]


@pytest.fixture
def admitted(cluster):
    """A request admitted in the cluster's store as alice, ended afterwards (frees her slot)."""
    store = StoreClient(StoreSpec())  # the cluster's store, by name
    rid = uuid.uuid4().hex
    quota = Quota(max_active=3, max_result_bytes=2**30, max_log_bytes=2**30)
    assert asyncio.run(store.call("admit", rid, "alice", 1, quota)) is None
    try:
        yield store, rid
    finally:
        asyncio.run(store.call("finish", rid, "CANCELLED", {}))


def test_events_sent_close_together_go_to_the_store_in_one_call_in_order(admitted) -> None:
    store, rid = admitted

    async def run() -> int:
        sender = EventSender(store, rid, hold_s=5.0)
        sender.send(RUNNING, {"trace": 1, "of": 3})
        sender.send(LOG, {"message": "from the loop"})
        worker = threading.Thread(target=sender.send, args=(RUNNING, {"trace": 2, "of": 3}))  # the forward thread
        worker.start()
        worker.join()
        await asyncio.sleep(0)  # the thread's event reaches the loop
        assert sender.batches == 0  # held: nothing sent within the hold
        sender.send(RUNNING, {"trace": 3, "of": 3})
        await sender.flush()
        return sender.batches

    assert asyncio.run(run()) == 1
    assert _store_events(store, rid) == [
        ("RECEIVED", {"id": rid}), (RUNNING, {"trace": 1, "of": 3}), (LOG, {"message": "from the loop"}),
        (RUNNING, {"trace": 2, "of": 3}), (RUNNING, {"trace": 3, "of": 3}),
    ]


def test_the_claim_carries_the_events_waiting_and_the_end_does_not_repeat_them(admitted) -> None:
    """A request that runs past CLAIM_AFTER_S: its first events go to the store with the claim
    (no call of their own), and the end, which sends them again in case the claim never arrived,
    records each once."""
    from actors.supervisor import CLAIM_AFTER_S, Supervisor

    store, rid = admitted

    async def run() -> tuple[EventSender, dict]:
        sender = EventSender(store, rid)

        async def work():
            sender.send("QUEUED", {"position": 1})
            sender.send(RUNNING, {"trace": 1, "of": 1})
            await asyncio.sleep(CLAIM_AFTER_S * 4)
            return "COMPLETED", {}, None

        end = await Supervisor(store).run(rid, work(), 30.0, events=sender)
        return sender, end

    sender, end = asyncio.run(run())
    assert sender.batches == 0  # no add_events call: they went with the claim
    assert end["event"] == "COMPLETED"
    assert [k for k, _ in _store_events(store, rid)] == ["RECEIVED", "QUEUED", RUNNING, "COMPLETED"]


def test_a_replica_answers_while_the_store_records_the_end(admitted) -> None:
    """`answer_first` (a replica's direct sessions): the end comes back before the store call that
    records it starts ("recorded" False), with the index the store gives it and the result
    inline; the lease is held until the store has it."""
    from actors.supervisor import Supervisor

    store, rid = admitted

    async def run() -> tuple[dict, bool, bool]:
        sender = EventSender(store, rid)
        supervisor = Supervisor(store)

        async def work():
            sender.send("QUEUED", {"position": 1})
            sender.send(RUNNING, {"trace": 1, "of": 1})
            return "COMPLETED", {"bytes": 2}, b"ab"

        end = await supervisor.run(rid, work(), 30.0, events=sender, inline_limit=10, answer_first=True)
        recording, held = bool(supervisor.recordings), supervisor.lease.held == 1
        await asyncio.gather(*supervisor.recordings)
        assert supervisor.lease.held == 0
        return end, recording, held

    end, recording, held = asyncio.run(run())
    assert recording and held  # answered before the store had it
    assert (end["id"], end["event"], end["result"], end["recorded"]) == (3, "COMPLETED", b"ab", False)
    assert [k for k, _ in _store_events(store, rid)] == ["RECEIVED", "QUEUED", RUNNING, "COMPLETED"]


def test_a_result_a_quota_may_refuse_is_recorded_before_the_answer(cluster) -> None:
    """Only the store knows its owner's unfetched bytes: an end with a result that is not handed
    over inline comes back as recorded (here over the quota: an ERROR), never answered first."""
    from actors.supervisor import Supervisor

    store, rid = StoreClient(StoreSpec()), uuid.uuid4().hex
    quota = Quota(max_active=3, max_result_bytes=1, max_log_bytes=2**30)
    assert asyncio.run(store.call("admit", rid, "alice", 1, quota)) is None

    async def run() -> dict:
        async def work():
            return "COMPLETED", {"bytes": 2}, b"ab"

        return await Supervisor(store).run(rid, work(), 30.0, events=EventSender(store, rid), answer_first=True)

    end = asyncio.run(run())
    assert end["event"] == "ERROR" and end["data"]["code"] == "result_quota" and end["recorded"] is True


def test_a_replicas_calls_that_overtake_the_admission_wait_for_it(cluster) -> None:
    """The ingress sends a session on one model together with its admit call, so the replica's
    claim and end may reach the store first (here they are sent first, from one caller, which
    Ray delivers in order): they wait for the admission instead of finding no request."""
    store, rid = StoreClient(StoreSpec()), uuid.uuid4().hex
    quota = Quota(max_active=3, max_result_bytes=2**30, max_log_bytes=2**30)

    async def run() -> tuple:
        claim = store.start("watch", rid, "lease-1")
        finish = store.start("finish", rid, "COMPLETED", {"bytes": 0})
        admit = store.start("admit", rid, "alice", 1, quota)
        return await asyncio.gather(admit.ref, finish.ref, claim.ref)

    admitted, end, cancelled = asyncio.run(run())
    assert admitted is None
    assert end == {"id": 1, "event": "COMPLETED", "data": {"bytes": 0}}  # recorded, after RECEIVED
    assert cancelled is False  # the claim held the request until it ended (not "unknown: stop")
    assert [k for k, _ in _store_events(store, rid)] == ["RECEIVED", "COMPLETED"]


def test_a_replicas_calls_for_a_refused_request_are_dropped_when_it_is_refused(cluster) -> None:
    """A refused admission (the user is at her limit) wakes the replica's calls that wait for it:
    the claim says stop, the end is not recorded, and the request never exists."""
    from actors.request_store import ADMIT_WAIT_S

    store, first, refused = StoreClient(StoreSpec()), uuid.uuid4().hex, uuid.uuid4().hex
    quota = Quota(max_active=1, max_result_bytes=2**30, max_log_bytes=2**30)
    assert asyncio.run(store.call("admit", first, "alice", 1, quota)) is None

    async def run() -> tuple:
        claim = store.start("watch", refused, "lease-1")
        finish = store.start("finish", refused, "COMPLETED", {})
        admit = store.start("admit", refused, "alice", 1, quota)
        # woken by the refusal, not by the end of their wait for an admission
        return await asyncio.wait_for(asyncio.gather(admit.ref, finish.ref, claim.ref), ADMIT_WAIT_S / 2)

    try:
        refusal, end, cancelled = asyncio.run(run())
    finally:
        asyncio.run(store.call("finish", first, "CANCELLED", {}))
    assert refusal["code"] == "too_many_requests"
    assert end is None and cancelled is True
    assert asyncio.run(store.call("status", refused, "alice")) is None


def test_the_store_answers_recorded_once_the_end_is_there(admitted) -> None:
    """What an ingress that sent a replica's end first asks before it reads the request
    (serve_app/recordings.py): `recorded` returns when the end's index is recorded."""
    store, rid = admitted

    async def run() -> None:
        waiting = store.start("recorded", [(rid, 1)], 30.0)
        done, _ = await asyncio.wait({asyncio.ensure_future(waiting.ref)}, timeout=0.5)
        assert not done  # the end is not there yet
        assert await store.call("finish", rid, "COMPLETED", {}) == {"id": 1, "event": "COMPLETED", "data": {}}
        await asyncio.wait_for(waiting.ref, 10.0)
        await asyncio.wait_for(store.call("recorded", [(rid, 1)], 30.0), 10.0)  # there: at once

    asyncio.run(run())


def test_an_event_after_a_quiet_spell_goes_at_once(admitted) -> None:
    """A queued request's RUNNING must not wait: after nothing was sent for the hold, the next
    event is sent without a flush; one close behind it waits for the next batch."""
    store, rid = admitted

    async def run() -> None:
        sender = EventSender(store, rid, hold_s=0.05)
        sender.send("QUEUED", {"position": 1})
        await sender.flush()
        await asyncio.sleep(0.1)  # quiet for longer than the hold
        sender.send(RUNNING, {"trace": 1, "of": 1})
        assert sender.batches == 2  # sent at once
        sender.hold_s = 30.0  # from here on a held event would wait far longer than this test
        await asyncio.gather(*sender.calls)
        sender.send(LOG, {"message": "close behind"})
        assert sender.batches == 2 and sender.pending  # waits for the next batch (or the flush)
        await sender.flush()
        assert sender.batches == 3

    asyncio.run(run())
    assert [k for k, _ in _store_events(store, rid)] == ["RECEIVED", "QUEUED", RUNNING, LOG]
