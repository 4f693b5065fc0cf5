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

from client_sdk import tracing
from intervention.wire import encode_session

P1 = "The Eiffel Tower is in the city of"
P2 = "Buckingham Palace is in the city of"
P3 = "The Kremlin is in the city of"
TERMINAL = ("COMPLETED", "ERROR", "CANCELLED")


def record(body: Callable[[], None]) -> bytes:
    """The request body a remote session would send for what `body()` traces, without sending it."""
    session = tracing.Session(remote=True)
    tracing._enter_graph(session.graph)
    try:
        body()
    finally:
        tracing._local.graph = None
    session.graph.done = True
    return encode_session(session.graph.session_ir(), session.graph.tensors)


def slow_session(model: Any, n: int) -> bytes:
    """A session of `n` small traces on one model: long enough to act on while it runs."""

    def body() -> None:
        for _ in range(n):
            with model.trace(P1):
                model.lm_head.output[0, -1].argmax().save()

    return record(body)


class Api:
    """Raw HTTP against the cluster as one user."""

    def __init__(self, url: str, key: str | None):
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(30.0, read=120.0))

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

    def events(self, request_id: str, after: int | None = None) -> Iterator[tuple[str, dict]]:
        """(event, data) pairs from the raw SSE stream until a terminal event."""
        headers = {"Last-Event-ID": str(after)} if after is not None else {}
        with self.http.stream("GET", f"/v1/requests/{request_id}/events", headers=headers) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("text/event-stream")
            kind, data = None, []
            for line in r.iter_lines():
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
