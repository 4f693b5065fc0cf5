"""Faults on the real local cluster: time limits, cancellation, execution errors, a model replica
and the ingress replica killed mid-request. Each ends in a clear outcome and the cluster keeps
serving. The destructive tests live here, in the file pytest runs last ("zz"), and each one waits
for the cluster to be whole again before it returns.
"""

from __future__ import annotations

import inspect
import threading
import time
from pathlib import Path

import httpx
import pytest
import ray
import torch
from remote_helpers import (
    P1,
    P2,
    heavy_body,
    no_leftover_requests,  # noqa: F401 - a fixture
    record,
    slow_session,
    slow_traces,
    unfinished_requests,
    wait_model_ready,
)

import client_sdk
from actors.request_store import NAMESPACE, STORE_NAME
from client_sdk import LanguageModel
from client_sdk.remote import RemoteError, RemoteRequest
from serve_app.ingress import OFF_LOOP_BYTES

pytestmark = pytest.mark.usefixtures("remote_client", "no_leftover_requests")
HERE = str(Path(__file__).resolve())
APP = "raysight"



def replicas(deployment: str) -> list[str]:
    """Names of the live Serve replica actors of `deployment` (namespace "serve")."""
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    )


def kill_replica(deployment: str) -> str:
    (name,) = replicas(deployment)
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


def wait_replaced(deployment: str, old: str, timeout_s: float = 90.0) -> None:
    """Bounded poll until Serve has started a replica other than `old` (no event to await)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = replicas(deployment)
        if now and old not in now:
            return
        time.sleep(0.2)
    raise AssertionError(
        f"Serve did not replace the replica {old} of {deployment} within {timeout_s:g} s"
    )


def quick_request_completes(a, body: bytes) -> float:
    """Submit a small request and wait for it; returns the seconds it took."""
    start = time.monotonic()
    rid = a.submit(body)
    kind, data = a.end(rid)
    assert kind == "COMPLETED", (kind, data)
    return time.monotonic() - start


# -- time limit ------------------------------------------------------------------------------------


def test_time_limit_ends_in_a_timeout_error_and_frees_the_replica(alice, llama, small_body) -> None:
    slow = slow_session(llama, 60, size=1536)  # tens of seconds of work unless stopped
    rid = alice.submit(slow, timeout_s=1)
    kind, data = alice.end(rid)
    assert kind == "ERROR" and data["code"] == "timeout", (kind, data)
    assert "time limit" in data["message"]
    status = alice.status(rid)
    assert status["state"] == "ERROR" and status["error"]["code"] == "timeout"
    r = alice.result(rid)
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_ready"
    assert r.json()["error"]["message"].startswith("the request ended in ERROR: it has no result")
    # The replica stopped that forward: a new request does not wait for the rest of the session.
    assert quick_request_completes(alice, small_body) < 8.0


def test_the_timeout_header_is_capped_by_the_server_limit(alice, small_body) -> None:
    rid = alice.submit(small_body, timeout_s=10**9)
    assert alice.end(rid)[0] == "COMPLETED"


# -- cancellation ----------------------------------------------------------------------------------


def test_cancel_a_queued_and_a_running_request(alice, llama, small_body) -> None:
    # One long trace holds the replica: a request queued behind a session of short traces would
    # join the batch after its first trace (cross-request batching), before the cancel arrives.
    running = alice.submit(heavy_body(llama))
    alice.wait_for(running, lambda k, d: k == "RUNNING")
    queued = alice.submit(slow_session(llama, 60))
    kind, data = alice.wait_for(queued, lambda k, d: k == "QUEUED")
    assert kind == "QUEUED" and data["position"] >= 1

    assert alice.cancel(queued)["cancel_requested"] is True
    events = list(alice.events(queued))
    assert events[-1][0] == "CANCELLED"
    assert "RUNNING" not in [k for k, _ in events]  # it never reached the model
    assert alice.status(running)["state"] == "RUNNING"  # cancelling one did not touch the other

    assert alice.cancel(running)["cancel_requested"] is True
    events = list(alice.events(running))
    assert events[-1][0] == "CANCELLED"
    assert ("LOG", {"message": "heavy work finished"}) not in events  # stopped partway
    assert alice.status(running)["state"] == "CANCELLED"
    assert alice.result(running).status_code == 409
    # a second cancel is harmless, and the replica keeps serving
    assert alice.cancel(running)["cancel_requested"] is False
    assert quick_request_completes(alice, small_body) < 8.0


# -- execution errors ------------------------------------------------------------------------------


def test_an_execution_error_names_the_users_line_and_the_next_request_runs(alice, llama) -> None:
    # scan=False: the server's execution error (the client's shape check would find it first)
    with pytest.raises(RemoteError) as exc, llama.session(remote=True, scan=False):
        with llama.trace(P1):
            ok = llama.lm_head.output.save()
        with llama.trace(P2):
            line = inspect.currentframe().f_lineno + 1
            llama.model.layers[1].output[:, -1, :] = torch.ones(65)  # 65 != hidden size 64
            llama.lm_head.output.save()
    err = exc.value
    assert err.location is not None and err.location[0] == HERE and err.location[1] == line
    assert HERE in str(err) and str(line) in str(err)
    assert err.code == "execution_error"
    assert isinstance(ok, client_sdk.Proxy)  # the session failed: no values come back

    # the same over raw HTTP: an ERROR event with the trace number and the location
    def body():
        with llama.trace(P1):
            llama.model.layers[0].output[:, -1, :] = llama.model.layers[0].output[:, :2, :]

    rid = alice.submit(record(body))
    kind, data = alice.end(rid)
    assert kind == "ERROR" and data["code"] == "execution_error" and data["trace"] == 1
    assert data["location"]["file"] == HERE

    with llama.trace(P1, remote=True):
        fine = llama.lm_head.output.save()
    assert isinstance(fine, torch.Tensor) and fine.shape[:2] == (1, 8)


# -- a model replica dies --------------------------------------------------------------------------


def test_model_replica_killed_mid_request_is_retried_once(alice, llama, small_body) -> None:
    """A dead replica is not the user's problem: the session runs again from its first trace
    (RETRYING), on the replica Serve starts instead, and completes."""
    rid = alice.submit(slow_session(llama, 12))
    alice.wait_for(rid, lambda k, d: k == "RUNNING" and d["trace"] >= 2)
    killed = kill_replica("model-llama")

    events = list(alice.events(rid))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "COMPLETED", events[-1]
    (retry,) = [d for k, d in events if k == "RETRYING"]
    assert retry["code"] == "replica_failed" and retry["model"] == "llama" and retry["attempt"] == 2
    # The whole session ran again. From the store's log, which keeps every event: a stream leaves
    # out a status that a later one in the same chunk makes stale (RUNNING 1 when trace 1 took
    # less than the replica's first 0.1 s hold, so RUNNING 1 and 2 travel together).
    log = ray.get(ray.get_actor(STORE_NAME, namespace=NAMESPACE).events.remote(rid, "alice", 0, 0.0))
    stored = [(e["event"], e["data"]) for e in log]
    after = [d["trace"] for k, d in stored[[k for k, _ in stored].index("RETRYING"):] if k == "RUNNING"]
    assert after[0] == 1 and max(after) == 12
    assert alice.status(rid)["state"] == "COMPLETED"
    assert alice.result(rid).status_code == 200

    wait_replaced("model-llama", killed)
    wait_model_ready(alice, "llama")
    quick_request_completes(alice, small_body)


def test_model_replica_killed_twice_ends_in_replica_failed(alice, llama, small_body) -> None:
    """Retried once only: a replica that dies again ends the request with an error saying so."""
    rid = alice.submit(slow_session(llama, 60))
    killed: list[str] = []
    retried = False
    for kind, data in alice.events(rid):  # one stream: kill at trace 2 of each attempt
        if kind == "RETRYING":
            retried = True
        elif kind == "RUNNING" and data["trace"] >= 2 and len(killed) == int(retried):
            killed.append(kill_replica("model-llama"))  # the second: the replica Serve started instead
    assert retried and len(killed) == 2, (retried, killed)
    assert kind == "ERROR" and data["code"] == "replica_failed", (kind, data)
    assert "llama" in data["message"] and "retried once" in data["message"]
    assert alice.status(rid)["state"] == "ERROR"

    wait_replaced("model-llama", killed[-1])
    wait_model_ready(alice, "llama")
    quick_request_completes(alice, small_body)
    # and a session spanning both models still works after the restart
    gpt2 = LanguageModel("gpt2")
    with client_sdk.session(remote=True):
        with llama.trace(P1):
            hs = llama.model.layers[-1].output[:, -1, :]
        with gpt2.trace(P2):
            gpt2.transformer.h[1].output[:, -1, :] = hs
            out = gpt2.lm_head.output.save()
    assert isinstance(out, torch.Tensor)


# -- the ingress replica dies ----------------------------------------------------------------------


def _wait_ingress(url: str, key: str, request_id: str, timeout_s: float = 90.0) -> None:
    """Bounded poll until an ingress answers for `request_id` again (no event while it is down)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(
                f"{url}/v1/requests/{request_id}",
                headers={"Authorization": f"Bearer {key}"},
                timeout=5,
            )
            if r.status_code == 200:
                return
            last = r.status_code
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise AssertionError(f"the ingress did not come back within {timeout_s:g} s (last: {last})")


def test_ingress_restart_does_not_lose_an_accepted_request(cluster, alice, llama) -> None:
    """The ingress dies while a request runs and a client follows its events: the request goes
    on (its state is in the request store), the client's stream resumes once Serve has restarted
    the ingress, and the result is still fetched by id."""
    lm = llama
    with lm.session(remote=True, blocking=False) as session:
        slow_traces(lm, 30)
        with lm.trace(P1):
            lm.model.layers[0].output[:, -1, :] *= 1.5
            logits = lm.lm_head.output.save()
    followed: dict = {}

    def follow() -> None:  # what a researcher's script does: block on the result
        try:
            followed["values"] = RemoteRequest(session.id).result()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            followed["error"] = exc

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    alice.wait_for(session.id, lambda k, d: k == "RUNNING")
    killed = kill_replica("Ingress")
    wait_replaced("Ingress", killed)
    _wait_ingress(cluster.url, cluster.keys["alice"], session.id)
    assert alice.end(session.id)[0] == "COMPLETED"
    follower.join(timeout=60)
    assert not follower.is_alive() and "error" not in followed, followed
    session.result()
    assert isinstance(logits, torch.Tensor) and logits.shape[:2] == (1, 8)
    assert any(
        isinstance(v, torch.Tensor) and torch.equal(v, logits) for v in followed["values"].values()
    )


def test_a_request_the_store_refuses_after_an_ingress_restart_never_holds_the_replica(
        cluster, alice, bob, llama, small_body) -> None:
    """A session on one model leaves the ingress with its admit call while the ingress's own count
    says its user is below her limit. A restarted ingress counts none of the requests its
    predecessor admitted, so it sends one more of hers off; the store, which counts them all,
    refuses it: a 429, and nothing of it is recorded (the store holds the calls of the run that
    had set out until the admission is there and drops them once it is refused; the run's claim
    tells it to stop); the replica serves on."""
    running = [alice.submit(slow_session(llama, 60)) for _ in range(3)]  # her limit: 3
    for rid in running:
        alice.wait_for(rid, lambda k, d: k == "RUNNING")  # claimed by the replica: outlives the ingress
    killed = kill_replica("Ingress")
    wait_replaced("Ingress", killed)
    _wait_ingress(cluster.url, cluster.keys["alice"], running[0])

    refused = slow_session(llama, 10)
    assert len(refused) <= OFF_LOOP_BYTES  # a larger body is refused before it is decoded: it never leaves
    r = alice.http.post("/v1/requests", content=refused, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_requests", r.text
    assert sorted(rid for rid, owner, _ in unfinished_requests() if owner == "alice") == sorted(running)
    for rid in running:
        alice.cancel(rid)
        assert alice.end(rid)[0] == "CANCELLED"
    assert bob.end(bob.submit(small_body))[0] == "COMPLETED"
    assert sorted(rid for rid, owner, _ in unfinished_requests() if owner == "alice") == []


# -- last: secrets -------------------------------------------------------------------------------------


def test_api_keys_never_appear_in_logs(cluster) -> None:
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    assert logs.is_dir()
    checked = 0
    for f in logs.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            checked += 1
            for user, key in cluster.keys.items():
                assert key.encode() not in data, f"{user}'s API key is in {f}"
    assert checked > 0
