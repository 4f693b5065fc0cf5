"""No single point of loss: the request store, the session runner and the ingress killed (real
processes of the real cluster), a restarted `raysight serve`, and the per-user quotas of the store.

Every accepted request still ends COMPLETED, ERROR or CANCELLED; finished results stay retrievable
(they live in SQLite and files under `state_dir`, not in any process). Destructive tests live in a
"zz" file, after test_zz_remote_faults.py, and each waits for the cluster to be whole again.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import ray
from remote_helpers import (
    api,
    no_leftover_requests,  # noqa: F401 - a fixture
    slow_cross_model_session,
    slow_session,
    wait_model_ready,
)
from safetensors.torch import load as load_safetensors
from test_serve_cli import KEY, Server
from test_zz_remote_faults import (
    _wait_ingress,
    kill_replica,
    quick_request_completes,
    wait_replaced,
)

from actors.request_store import NAMESPACE, STORE_NAME, Quota, RequestStore
from client_sdk import LanguageModel

pytestmark = pytest.mark.usefixtures("remote_client", "no_leftover_requests")
BOUND_S = 90.0  # bound on a recovery on a loaded 2-core box (it normally takes a few seconds)



def store():
    return ray.get_actor(STORE_NAME, namespace=NAMESPACE)


def readyz(url: str) -> httpx.Response:
    return httpx.get(f"{url}/readyz", timeout=10.0)


def wait_ready(url: str) -> None:
    """Bounded poll of /readyz until 200 (no event says a dependency is back)."""
    deadline = time.monotonic() + BOUND_S
    while (r := readyz(url)).status_code != 200:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)


def saved_tensors(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return load_safetensors(response.content)


# -- a restarted `raysight serve` ------------------------------------------------------------------


def test_restarted_serve_still_serves_its_results(cluster, small_body, tmp_path: Path) -> None:
    """Through the real CLI: a result finished before SIGTERM is served by the next `raysight
    serve` on the same --state-dir (its state is on disk, not in Ray)."""
    state = tmp_path / "state"
    args = ["--model", f"llama={cluster.llama_path}", "--state-dir", str(state)]
    first = Server.start(args)
    try:
        first.out.wait_line(lambda ln: ln.startswith("raysight is ready at"))
        with api(first.url, KEY) as a:
            rid = a.submit(small_body)
            assert a.end(rid)[0] == "COMPLETED"
    finally:
        first.kill()
    assert first.proc.returncode == 0, first.err.all()
    assert (state / "requests.sqlite3").is_file() and (state / "results" / f"{rid}.safetensors").is_file()

    second = Server.start(args)
    try:
        second.out.wait_line(lambda ln: ln.startswith("raysight is ready at"))
        with api(second.url, KEY) as a:
            assert a.status(rid)["state"] == "COMPLETED"
            assert list(saved_tensors(a.result(rid)))  # the values saved before the restart
            assert [k for k, _ in a.events(rid)][-1] == "COMPLETED"
    finally:
        second.kill()


# -- the request store dies ------------------------------------------------------------------------


def test_store_killed_mid_request_loses_nothing(cluster, alice, llama, small_body) -> None:
    """kill -9 of the store's process while a request runs: Ray restarts it, every caller reaches
    the new one, the request completes, and a result finished before the kill is still there."""
    before = alice.submit(small_body)
    assert alice.end(before)[0] == "COMPLETED"  # finished, not fetched yet
    rid = alice.submit(slow_session(llama, 16))
    alice.wait_for(rid, lambda k, d: k == "RUNNING" and d["trace"] >= 2)
    pid = ray.get(store().pid.remote())
    os.kill(pid, signal.SIGKILL)

    events = list(alice.events(rid))  # served through the restarted store
    assert events[-1][0] == "COMPLETED", events[-1]
    traces = [d["trace"] for k, d in events if k == "RUNNING"]
    assert traces == sorted(traces) and traces[-1] == 16  # numbered events kept in order
    assert ray.get(store().pid.remote()) != pid  # it really is a new process
    assert list(saved_tensors(alice.result(rid)))
    assert list(saved_tensors(alice.result(before)))
    assert readyz(cluster.url).status_code == 200
    quick_request_completes(alice, small_body)


def test_store_killed_for_good_is_recreated_and_readyz_says_so(cluster, alice, small_body) -> None:
    """A store killed without restart (ray.kill): /readyz is 503 naming the store, /healthz stays
    200 (liveness only); the next caller creates the store again by name, from the same files."""
    before = alice.submit(small_body)
    assert alice.end(before)[0] == "COMPLETED"
    ray.kill(store(), no_restart=True)

    r = readyz(cluster.url)
    assert r.status_code == 503, r.text
    checks = {c["name"]: c for c in r.json()["checks"]}
    assert checks["models"]["ok"] is True
    assert checks["store"]["ok"] is False and "request store" in checks["store"]["message"]
    assert httpx.get(f"{cluster.url}/healthz").status_code == 200

    wait_ready(cluster.url)
    assert alice.status(before)["state"] == "COMPLETED"
    assert list(saved_tensors(alice.result(before)))
    quick_request_completes(alice, small_body)


# -- the session runner dies -----------------------------------------------------------------------


def test_runner_killed_mid_request_is_retried_once(cluster, alice, llama, small_body) -> None:
    rid = alice.submit(slow_cross_model_session(llama, LanguageModel("gpt2"), 8))
    alice.wait_for(rid, lambda k, d: k == "RUNNING")
    killed = kill_replica("SessionRunner")

    events = list(alice.events(rid))
    assert events[-1][0] == "COMPLETED", events
    (retry,) = [d for k, d in events if k == "RETRYING"]
    assert retry == {"code": "runner_failed", "attempt": 2}
    assert list(saved_tensors(alice.result(rid)))
    wait_replaced("SessionRunner", killed)
    quick_request_completes(alice, small_body)


def test_a_session_on_one_model_does_not_need_the_runner(cluster, alice, llama, small_body) -> None:
    """A session on one model goes from the ingress straight to that model's replica: the session
    runner dying under it changes nothing (no RETRYING)."""
    rid = alice.submit(slow_session(llama, 8))
    alice.wait_for(rid, lambda k, d: k == "RUNNING")
    killed = kill_replica("SessionRunner")

    events = list(alice.events(rid))
    assert events[-1][0] == "COMPLETED", events
    assert "RETRYING" not in [k for k, _ in events], events
    wait_replaced("SessionRunner", killed)
    quick_request_completes(alice, small_body)


def test_orphans_of_a_dead_runner_and_ingress_end_and_free_the_users_slots(cluster, alice, llama, small_body) -> None:
    """The runner and the ingress die together (one node lost): no process is left to finish their
    requests. The store sees the runner's lease lapse and ends them (a DELETE in the meantime
    ends one CANCELLED); the user is no longer at her concurrency limit."""
    body = slow_cross_model_session(llama, LanguageModel("gpt2"), 6)  # across models: on the runner
    rids = [alice.submit(body) for _ in range(3)]  # alice's limit in this cluster
    alice.wait_for(rids[0], lambda k, d: k == "RUNNING")
    for rid in rids:  # every one is held by the runner (it claims a request as it starts it)
        alice.wait_for(rid, lambda k, d: k in ("QUEUED", "RUNNING"))
    ingress = kill_replica("Ingress")  # first, so it cannot retry on a new runner
    runner = kill_replica("SessionRunner")
    unfinished = {r for r, _, _ in ray.get(store().unfinished.remote())}
    assert {rids[1], rids[2]} <= unfinished  # queued behind the first: nothing can end them now
    # a DELETE while no ingress is up yet: what the next ingress will do, straight to the store
    assert ray.get(store().request_cancel.remote(rids[1], "alice")) in ("QUEUED", "RUNNING")
    wait_replaced("Ingress", ingress)
    _wait_ingress(cluster.url, cluster.keys["alice"], rids[0])

    ends = {rid: alice.end(rid) for rid in rids}  # within the lease (15 s) and a sweep
    assert ends[rids[1]][0] == "CANCELLED", ends
    for rid in (rids[0], rids[2]):
        kind, data = ends[rid]
        if rid in unfinished:  # (the first may have finished before its runner died)
            assert kind == "ERROR" and data["code"] == "orphaned", (kind, data)
            assert "submit it again" in data["message"]
        assert alice.cancel(rid) == {"id": rid, "state": kind, "cancel_requested": False}  # DELETE answers
    wait_replaced("SessionRunner", runner)
    wait_model_ready(alice, "llama")
    quick_request_completes(alice, small_body)  # her three slots are free again


# -- quotas and durable event order, on a store of the test's own ----------------------------------


@pytest.fixture
def own_store(cluster, tmp_path: Path):
    """A restartable RequestStore actor of this test (not the cluster's), on its own state_dir."""
    actor = RequestStore.options(max_restarts=-1).remote(str(tmp_path / "state"), 3600.0)
    try:
        yield actor
    finally:
        ray.kill(actor, no_restart=True)


def test_result_and_log_quotas_name_their_limits(own_store) -> None:
    quota = Quota(max_active=10, max_result_bytes=100, max_log_bytes=50)

    def admit(rid: str):
        return ray.get(own_store.admit.remote(rid, "u", 1, quota))

    assert admit("r1") is None
    ray.get(own_store.finish.remote("r1", "COMPLETED", {"bytes": 80}, b"x" * 80))
    assert admit("r2") is None
    ray.get(own_store.finish.remote("r2", "COMPLETED", {"bytes": 30}, b"y" * 30))  # 80 + 30 > 100
    error = ray.get(own_store.status.remote("r2", "u"))["error"]
    assert error["code"] == "result_quota" and "limits.max_result_bytes_per_user" in error["message"]
    assert "30 bytes" in error["message"] and "100" in error["message"]
    assert admit("r3") is None
    ray.get(own_store.finish.remote("r3", "COMPLETED", {"bytes": 20}, b"z" * 20))  # exactly 100 now
    refused = admit("r4")
    assert refused["status"] == 429 and refused["code"] == "result_quota"
    assert "limits.max_result_bytes_per_user" in refused["message"]
    assert ray.get(own_store.result.remote("r1", "u")) == ("COMPLETED", b"x" * 80)  # fetched: freed
    assert admit("r4") is None

    for message in ("a" * 40, "b" * 40, "c" * 5):  # the second goes over: a notice, then nothing
        ray.get(own_store.add_event.remote("r4", "LOG", {"message": message}))
    logs = [e["data"]["message"] for e in ray.get(own_store.events.remote("r4", "u", 0, 0.0)) if e["event"] == "LOG"]
    assert logs[0] == "a" * 40 and len(logs) == 2
    assert "limits.max_log_bytes_per_user" in logs[1] and "dropped" in logs[1]
    assert admit("r5") is None
    ray.get(own_store.add_event.remote("r5", "LOG", {"message": "d" * 10}))  # 50: at the limit
    refused = admit("r6")
    assert refused["status"] == 429 and refused["code"] == "log_quota"
    assert "limits.max_log_bytes_per_user" in refused["message"]
    # another user is not affected
    assert ray.get(own_store.admit.remote("v1", "v", 1, quota)) is None


def test_numbered_events_keep_their_order_across_a_store_death(own_store) -> None:
    """An event that arrives before an earlier one of its sender waits for it in the database, so
    a store that dies in between still records both, in order; a sender's retry is not doubled."""
    quota = Quota(max_active=10, max_result_bytes=1 << 20, max_log_bytes=1 << 20)
    assert ray.get(own_store.admit.remote("r", "u", 1, quota)) is None
    ray.get(own_store.add_event.remote("r", "LOG", {"message": "second"}, ("sender", 1)))
    pid = ray.get(own_store.pid.remote())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + BOUND_S
    while True:  # calls fail until Ray has restarted it
        try:
            ray.get(own_store.add_event.remote("r", "LOG", {"message": "first"}, ("sender", 0)))
            break
        except ray.exceptions.RayActorError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    ray.get(own_store.add_event.remote("r", "LOG", {"message": "first"}, ("sender", 0)))  # a retry
    assert ray.get(own_store.pid.remote()) != pid
    logs = [e["data"]["message"] for e in ray.get(own_store.events.remote("r", "u", 0, 0.0)) if e["event"] == "LOG"]
    assert logs == ["first", "second"]


def test_finish_records_the_waiting_events_first_and_returns_the_end(own_store) -> None:
    """The process that ran a request records its end and the events it had not sent yet in one
    call (actors/supervisor.py); the answer is the end as recorded, with its event id, which a
    blocking stream sends without asking the store again; a result handed over inline counts as
    fetched (it no longer holds its owner's result quota, and no quota refuses it); a second end
    is not recorded."""
    quota = Quota(max_active=10, max_result_bytes=100, max_log_bytes=1 << 20)
    assert ray.get(own_store.admit.remote("r", "u", 1, quota)) is None
    waiting = [("RUNNING", {"trace": 1, "of": 1}, ("sender", 0)), ("LOG", {"message": "hi"}, ("sender", 1))]
    end = ray.get(own_store.finish.remote("r", "COMPLETED", {"bytes": 60}, b"x" * 60, waiting, 100))
    assert end == {"id": 3, "event": "COMPLETED", "data": {"bytes": 60}}
    events = ray.get(own_store.events.remote("r", "u", 0, 0.0))
    assert [e["event"] for e in events] == ["RECEIVED", "RUNNING", "LOG", "COMPLETED"]
    assert ray.get(own_store.admit.remote("r2", "u", 1, quota)) is None  # inline: 60 bytes not held
    ray.get(own_store.finish.remote("r2", "COMPLETED", {"bytes": 60}, b"y" * 60))  # not inline: held
    assert ray.get(own_store.finish.remote("r2", "ERROR", {"code": "late"})) is None  # the first end wins
    assert ray.get(own_store.admit.remote("r3", "u", 1, quota)) is None  # 60 of 100 held
    handed = ray.get(own_store.finish.remote("r3", "COMPLETED", {"bytes": 60}, b"z" * 60, [], 100))
    assert handed["event"] == "COMPLETED"  # inline: fetched as it is recorded, so no quota refuses it
    assert ray.get(own_store.result.remote("r3", "u")) == ("COMPLETED", b"z" * 60)
    assert ray.get(own_store.admit.remote("r4", "u", 1, quota)) is None
    over = ray.get(own_store.finish.remote("r4", "COMPLETED", {"bytes": 60}, b"w" * 60))
    assert over["event"] == "ERROR" and over["data"]["code"] == "result_quota"  # recorded as it was


def test_a_reader_waiting_for_news_is_not_woken_by_status(own_store) -> None:
    """A blocking stream between two status updates waits `until_news`: a RUNNING does not end
    the wait (it would cost a store call per status), a LOG does, and the answer has both."""
    quota = Quota(max_active=10, max_result_bytes=1 << 20, max_log_bytes=1 << 20)
    assert ray.get(own_store.admit.remote("r", "u", 1, quota)) is None
    waiting = own_store.events.remote("r", "u", 1, 30.0, 0, True)
    ray.get(own_store.add_event.remote("r", "RUNNING", {"trace": 1, "of": 1}))
    ready, _ = ray.wait([waiting], timeout=0.5)
    assert not ready  # a status is not news
    ray.get(own_store.add_event.remote("r", "LOG", {"message": "news"}))
    assert [e["event"] for e in ray.get(waiting)] == ["RUNNING", "LOG"]
    # news already there: no wait at all
    assert [e["event"] for e in ray.get(own_store.events.remote("r", "u", 1, 30.0, 0, True))] == ["RUNNING", "LOG"]
