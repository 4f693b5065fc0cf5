"""Bounds on the real local cluster (issue 9): cancel and timeout stop the work, limits on what a
trace holds and on open streams, the ingress's order of checks, error classes of user mistakes,
and event-stream resumption."""

from __future__ import annotations

import inspect
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import safetensors.torch
import torch
from remote_helpers import (
    P1,
    heavy_body,
    no_leftover_requests,  # noqa: F401 - a fixture used below
    record,
    rewrite,
    slow_session,
)

import client_sdk
from client_sdk import LanguageModel
from fixtures.tiny_models import MAX_POSITIONS
from intervention.wire import read_metadata

pytestmark = pytest.mark.usefixtures("remote_client", "no_leftover_requests")
HERE = str(Path(__file__).resolve())


# -- cancel and timeout stop the work --------------------------------------------------------------


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_cancel_or_timeout_of_heavy_work_frees_the_replica_for_the_next_user(alice, bob, llama, small_body, how) -> None:
    heavy = alice.submit(heavy_body(llama), timeout_s=2 if how == "timeout" else None)
    alice.wait_for(heavy, lambda k, d: k == "RUNNING")
    other = bob.submit(small_body)
    assert bob.wait_for(other, lambda k, d: k == "QUEUED")[0] == "QUEUED"  # waits for the replica
    if how == "cancel":
        assert alice.cancel(heavy)["cancel_requested"] is True
    # The other user's request runs to completion while the heavy work (minutes) would still be
    # going: without a stop between operations this stream hits its own deadline.
    events = [k for k, _ in bob.events(other, deadline_s=60)]
    assert events[-1] == "COMPLETED" and "RUNNING" in events, events
    heavy_events = list(alice.events(heavy, deadline_s=10))
    assert ("LOG", {"message": "heavy work finished"}) not in heavy_events
    end = heavy_events[-1]
    if how == "cancel":
        assert end[0] == "CANCELLED", end
    else:
        assert end[0] == "ERROR" and end[1]["code"] == "timeout", end


# -- limits on what a trace holds and says -------------------------------------------------------


def test_a_trace_over_its_memory_budget_is_a_user_error_at_its_line(alice, llama, small_body) -> None:
    line = None

    def body():
        nonlocal line
        with llama.trace(P1):
            h = llama.model.layers[0].output
            kept = []
            for _ in range(5):
                line = inspect.currentframe().f_lineno + 1
                kept.append(h.new_ones(64, 2**20))  # 256 MiB each; the test cluster allows 256 MiB
            sum(k[0, 0] for k in kept).save()

    rid = alice.submit(record(body))
    kind, data = alice.end(rid)
    assert kind == "ERROR" and data["code"] == "memory_limit", (kind, data)
    assert "limit of 268,435,456 bytes" in data["message"]
    assert data["location"]["file"] == HERE and data["location"]["line"] == line
    assert alice.end(alice.submit(small_body))[0] == "COMPLETED"  # the replica is fine


@pytest.mark.parametrize("second", ["llama", "gpt2"])  # the same segment, or the next one
def test_saves_over_the_request_cap_are_a_user_error_at_the_save(alice, llama, small_body, second) -> None:
    """The test cluster allows 48 MiB of saved values per request: two traces saving 32 MiB each
    cross it at the second save, whether the traces share a replica call or not."""
    other = llama if second == "llama" else LanguageModel("gpt2")
    line = None

    def body():
        nonlocal line
        with llama.trace(P1):  # record() makes the traces one session
            llama.model.layers[0].output.new_ones(8, 2**20).save()  # 32 MiB
        with other.trace(P1):
            line = inspect.currentframe().f_lineno + 1
            other.lm_head.output.new_ones(8, 2**20).save()  # 32 MiB more: over the cap

    rid = alice.submit(record(body))
    kind, data = alice.end(rid)
    assert kind == "ERROR" and data["code"] == "too_large", (kind, data)
    assert "limits.max_saved_bytes" in data["message"]
    assert data["location"]["file"] == HERE and data["location"]["line"] == line
    assert alice.end(alice.submit(small_body))[0] == "COMPLETED"  # the replica is fine


def test_local_runs_have_no_cap_on_saves(tiny_llama_path) -> None:
    model = LanguageModel(str(tiny_llama_path))
    with model.trace(P1):
        big = model.model.layers[0].output.new_ones(16, 2**20).save()  # 64 MiB: over the test cluster's cap
    assert big.shape == (16, 2**20)


def test_long_log_messages_are_cut_with_a_marker(alice, llama) -> None:
    def body():
        with llama.trace(P1):
            client_sdk.log("x" * 10_000)
            llama.lm_head.output[0, -1].argmax().save()

    rid = alice.submit(record(body))
    logs = [d["message"] for k, d in alice.events(rid) if k == "LOG"]
    assert logs == ["x" * 4096 + "… [log message cut: 5,904 more characters]"]


# -- the ingress: the user's limit before her body, error classes of bad inputs --------------------


def test_a_user_at_her_limit_is_refused_before_her_body_is_decoded(alice, bob, llama, small_body) -> None:
    slow = slow_session(llama, 60)
    running = [alice.submit(slow) for _ in range(3)]  # her limit in the test cluster
    try:
        # a body that would fail decoding (422) is refused for her limit (429): never decoded
        r = alice.http.post("/v1/requests", content=b"\xff" * (4 << 20))
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_requests", r.text
        assert "limits.max_concurrent_per_user" in r.json()["error"]["message"]
        # the same body from another user is decoded, and malformed
        r = bob.http.post("/v1/requests", content=b"\xff" * (4 << 20))
        assert r.status_code == 422, r.text
        assert alice.http.get("/healthz").status_code == 200
    finally:
        for rid in running:
            alice.cancel(rid)
        for rid in running:
            alice.end(rid)


def _with_blob(body: bytes, name: str, tensor: torch.Tensor) -> bytes:
    tensors = safetensors.torch.load(body)
    return safetensors.torch.save({**tensors, name: tensor}, metadata=read_metadata(body))


def _with_input(body: bytes, value) -> bytes:
    def edit(session: dict) -> None:
        session["traces"][0]["invokes"][0]["input"] = value

    return rewrite(body, edit)


@pytest.mark.parametrize(
    "make, code, words",
    [
        (lambda b: _with_input(b, [[2**70]]), "invalid_input", "outside the model's vocabulary"),
        (lambda b: _with_input(b, [5, -1]), "invalid_input", "outside the model's vocabulary"),
        (lambda b: _with_input(b, [5] * (MAX_POSITIONS + 1)), "invalid_input", f"at most {MAX_POSITIONS}"),
        (lambda b: _with_input(b, P1 * 40), "invalid_input", f"at most {MAX_POSITIONS}"),
        (lambda b: _with_blob(b, "f8", torch.zeros(4, dtype=torch.float8_e4m3fn)), "unsupported_dtype", "float8_e4m3fn"),
        (lambda b: _with_blob(b, "u16", torch.zeros(4, dtype=torch.uint16)), "unsupported_dtype", "uint16"),
    ],
    ids=["id-2**70", "negative-id", "ids-past-context", "prompt-past-context", "F8-blob", "U16-blob"],
)
def test_bad_inputs_are_4xx_at_the_ingress_not_replica_failures(alice, small_body, make, code, words) -> None:
    r = alice.http.post("/v1/requests", content=make(small_body))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == code and words in err["message"], err


def test_token_id_tensors_are_checked_too(alice, llama) -> None:
    def body():
        with llama.trace(torch.tensor([[1, 2, 5000]])):  # the tiny vocabulary is smaller
            llama.lm_head.output.save()

    r = alice.http.post("/v1/requests", content=record(body))
    assert r.status_code == 422 and "token id 5000" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["location"]["file"] == HERE


# -- event streams -----------------------------------------------------------------------------------


def test_last_event_id_is_checked_after_ownership(alice, bob, small_body) -> None:
    rid = alice.submit(small_body)
    alice.end(rid)
    full = alice.http.get(f"/v1/requests/{rid}/events").text  # a finished request's stream ends
    ids = [int(line[4:]) for line in full.splitlines() if line.startswith("id: ")]
    for bad in ("abc", "-1", "1.5", "+3"):
        r = bob.http.get(f"/v1/requests/{rid}/events", headers={"Last-Event-ID": bad})
        assert r.status_code == 404, (bad, r.text)  # another user's request: absent, whatever the header
        r = alice.http.get(f"/v1/requests/{rid}/events", headers={"Last-Event-ID": bad})
        assert r.status_code == 422 and "Last-Event-ID" in r.json()["error"]["message"], (bad, r.text)
    # resuming a finished request at (or past) its last event ends the stream at once
    for after in (ids[-1], ids[-1] + 5):
        with alice.http.stream("GET", f"/v1/requests/{rid}/events", headers={"Last-Event-ID": str(after)}) as r:
            assert r.status_code == 200
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                assert len(lines) < 5, f"the stream goes on: {lines}"  # heartbeats would spin here
        assert lines == [] or all(not x for x in lines), lines
    # resuming before the end replays exactly the rest
    assert [k for k, _ in alice.events(rid, after=ids[-2])] == ["COMPLETED"]


def test_open_streams_per_user_are_limited(alice, bob, llama, cluster) -> None:
    slow = alice.submit(slow_session(llama, 60))
    try:
        with ExitStack() as stack:
            for _ in range(16):  # the default limits.max_streams_per_user
                r = stack.enter_context(alice.http.stream("GET", f"/v1/requests/{slow}/events"))
                assert r.status_code == 200
            r = alice.http.get(f"/v1/requests/{slow}/events")
            assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_streams", r.text
            assert "limits.max_streams_per_user" in r.json()["error"]["message"]
            r = alice.http.post("/v1/requests", content=b"x", headers={"Accept": "text/event-stream"})
            assert r.status_code in (422, 429)  # a malformed body is refused before streams are counted
            # another user is not affected
            assert bob.http.get("/v1/models").status_code == 200
        # closed streams give their slots back (the ingress notices a closed connection soon after)
        deadline = time.monotonic() + 30
        while True:
            with alice.http.stream("GET", f"/v1/requests/{slow}/events") as r:
                if r.status_code == 200:
                    break
            assert time.monotonic() < deadline, "closed streams did not give their slots back"
            time.sleep(0.2)
    finally:
        alice.cancel(slow)
        alice.end(slow)
