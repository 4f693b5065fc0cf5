"""Helpers for the integration tests against the real local cluster (tests/test_remote_*.py).

Raw HTTP goes through httpx to 127.0.0.1 only; request bodies are recorded with client_sdk's own
tracing, so they are exactly what a researcher's code would send.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import torch

import client_sdk
from client_sdk import tracing
from intervention.events import TERMINAL
from intervention.wire import SESSION_KEY, encode_session, read_metadata

P1 = "The Eiffel Tower is in the city of"
P2 = "Buckingham Palace is in the city of"
P3 = "The Kremlin is in the city of"


def record(body: Callable[[], None]) -> bytes:
    """The request body a remote session would send for what `body()` traces, without sending it."""
    with tracing.recording(remote=True) as graph:
        body()
    return encode_session(graph.session_ir(), graph.tensors)


def unfinished_requests() -> list[tuple[str, str, str]]:
    """(id, owner, state) of every request the cluster's request store holds that has not ended.
    Read from the real store actor (the test process is the cluster's Ray driver)."""
    import ray

    from actors.request_store import NAMESPACE, STORE_NAME

    return [tuple(r) for r in ray.get(ray.get_actor(STORE_NAME, namespace=NAMESPACE).unfinished.remote())]


@pytest.fixture
def no_leftover_requests(cluster) -> Iterator[None]:
    """After the test, none of its requests is still open: each test leaves the cluster idle (a
    request stuck open would also count against its user's concurrency cap for good)."""
    yield
    left = unfinished_requests()
    deadline = time.monotonic() + 10.0
    while left and time.monotonic() < deadline:  # e.g. a cancel still reaching the replica
        time.sleep(0.1)
        left = unfinished_requests()
    assert not left, f"requests left open: {left}"


@contextmanager
def one_thread() -> Iterator[None]:
    """Local runs with one torch thread, as the replicas run (Ray gives a `num_cpus: 0` actor
    OMP_NUM_THREADS=1): another thread count may change the last bit of a float sum."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rewrite(body: bytes, edit: Callable[[dict], None]) -> bytes:
    """`body` with its session IR changed by `edit` (a dict, in place): requests no client would
    build, to check the server's own validation."""
    import safetensors.torch

    meta = read_metadata(body)
    session = json.loads(meta[SESSION_KEY])
    edit(session)
    return safetensors.torch.save(
        safetensors.torch.load(body), metadata={**meta, SESSION_KEY: json.dumps(session)}
    )


def slow_traces(model: Any, n: int, size: int = 1024) -> None:
    """Record `n` traces of the (Llama) model in the current session, each doing a large matmul at
    every layer: ~0.1 s of replica time per trace on a laptop CPU, with a module boundary (where a
    cancel takes effect) every few ms."""
    for _ in range(n):
        with model.trace(P1):
            work = 0
            for layer in model.model.layers:
                x = layer.output.new_ones(size, size)
                work = work + (x @ x)[0, 0]  # used by a save: no optimizer may drop it
            (model.lm_head.output[0, -1].argmax() + work * 0).save()


def slow_session(model: Any, n: int = 60, size: int = 1024) -> bytes:
    """The body of a session that runs for many seconds unless stopped."""
    return record(lambda: slow_traces(model, n, size))


def slow_cross_model_session(model: Any, other: Any, n: int = 8) -> bytes:
    """A slow session across two models: `n` slow traces of `model`, then one of `other`. It runs
    on the session runner (a session on one model goes straight to that model's replica)."""

    def body():
        slow_traces(model, n)
        with other.trace(P2):
            other.lm_head.output.save()

    return record(body)


def heavy_body(model: Any, note: str | None = None, ops: int = 4000) -> bytes:
    """One trace that holds the replica for minutes unless stopped: one module event, then `ops`
    matmuls of ~50 ms each. Requests submitted meanwhile stay QUEUED until it ends (a session of
    many short traces would let them join the batch after its first trace). `note`: logged before
    the work; "heavy work finished" is logged after it. Each matmul's result is small (64 x 64):
    a trace keeps its values until it ends, and with large results the trace's memory budget
    (the test cluster's limits.max_trace_bytes) would end it before a time limit could."""

    def body():
        with model.trace(P1):
            x = model.model.layers[0].output.new_ones(64, 2**19)  # 128 MiB, made once
            xt = x.t()
            if note is not None:
                client_sdk.log(note)
            acc = x[0, 0]
            for _ in range(ops):
                acc = acc + (x @ xt)[0, 0]
            client_sdk.log("heavy work finished")
            acc.save()

    return record(body)


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs of an SSE stream's lines, up to and including a terminal event."""
    kind, data = None, []
    for line in lines:
        if line.startswith(":"):
            continue
        if not line:
            if kind is not None:
                yield kind, json.loads("\n".join(data))
                if kind in TERMINAL:
                    return
            kind, data = None, []
            continue
        field, _, value = line.partition(": ")
        if field == "event":
            kind = value
        elif field == "data":
            data.append(value)


class Api:
    """Raw HTTP against the cluster as one user."""

    def __init__(self, url: str, key: str | None):
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        self.http = httpx.Client(
            base_url=url, headers=headers, timeout=httpx.Timeout(30.0, read=120.0)
        )

    def close(self) -> None:
        self.http.close()

    def submit(self, body: bytes, timeout_s: float | None = None) -> str:
        headers = {"Content-Type": "application/octet-stream"}
        if timeout_s is not None:
            headers["X-Raysight-Timeout"] = str(timeout_s)
        r = self.http.post("/v1/requests", content=body, headers=headers)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def status(self, request_id: str) -> dict:
        r = self.http.get(f"/v1/requests/{request_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def cancel(self, request_id: str) -> dict:
        r = self.http.delete(f"/v1/requests/{request_id}")
        assert r.status_code == 202, r.text
        return r.json()

    def events(
        self, request_id: str, after: int | None = None, deadline_s: float = 120.0
    ) -> Iterator[tuple[str, dict]]:
        """(event, data) pairs from the raw SSE stream until a terminal event. A request that never
        ends fails the test after `deadline_s` instead of hanging it (heartbeats keep the stream
        alive forever)."""
        headers = {"Last-Event-ID": str(after)} if after is not None else {}
        deadline = time.monotonic() + deadline_s
        with self.http.stream("GET", f"/v1/requests/{request_id}/events", headers=headers) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("text/event-stream")

            def lines() -> Iterator[str]:  # heartbeats count: checked per line, not per event
                for line in r.iter_lines():
                    if time.monotonic() > deadline:
                        raise AssertionError(f"request {request_id} did not end within {deadline_s:g} s")
                    yield line

            yield from sse_events(lines())

    def wait_for(self, request_id: str, predicate: Callable[[str, dict], bool]) -> tuple[str, dict]:
        """Follow the events until one satisfies `predicate` (or the request ends)."""
        for kind, data in self.events(request_id):
            if predicate(kind, data) or kind in TERMINAL:
                return kind, data
        raise AssertionError(f"the event stream of {request_id} ended without a terminal event")

    def end(self, request_id: str) -> tuple[str, dict]:
        """The request's terminal event."""
        return self.wait_for(request_id, lambda k, d: False)

    def result(self, request_id: str) -> httpx.Response:
        return self.http.get(f"/v1/requests/{request_id}/result")


@contextmanager
def api(url: str, key: str | None) -> Iterator[Api]:
    a = Api(url, key)
    try:
        yield a
    finally:
        a.close()


def wait_model_ready(a: Api, name: str, timeout_s: float = 90.0) -> dict:
    """Bounded poll of /v1/models until `name` has a RUNNING replica and a HEALTHY state (there is
    no event for a replica coming back)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = a.http.get("/v1/models")
            if r.status_code == 200:
                last = {m["name"]: m for m in r.json()}.get(name)
                if last and last["replicas"] >= 1 and last["state"] == "HEALTHY":
                    return last
            else:
                last = r.text
        except httpx.HTTPError as exc:  # the ingress may be restarting too
            last = repr(exc)
        time.sleep(0.25)
    raise AssertionError(f"model {name!r} did not recover within {timeout_s:g} s: {last}")
