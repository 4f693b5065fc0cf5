"""Remote execution: submit a session over HTTP, follow its events, download the result.

    POST /v1/requests (safetensors: client tensors + IR JSON) -> {id}
    GET  /v1/requests/{id}/events  (server-sent events: queue position, trace i of n, logs, end)
    GET  /v1/requests/{id}/result  (safetensors: the saved values)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from client_sdk.config import CONFIG
from client_sdk.status import StatusLine
from intervention.errors import InterventionError, location_from_dict
from intervention.events import (
    CANCELLED,
    ERROR,
    LOG,
    QUEUED,
    RECEIVED,
    REQUEST_ID_HEADER,
    RUNNING,
    TERMINAL,
)
from intervention.wire import decode_result, encode_session

if TYPE_CHECKING:
    from client_sdk.graph import Graph


class RemoteError(InterventionError):
    """The server refused or failed the request. The text names the user's file and line."""

    code = "remote_error"

    def __init__(self, message: str, location=None, code: str | None = None, status: int | None = None):
        self.status = status
        super().__init__(message, location, code)


_clients: dict[tuple, httpx.Client] = {}
# How long a client following a request keeps reconnecting to a server that went away: a
# restarted Serve proxy or ingress answers again within seconds; the request itself goes on.
RECONNECT_S = 120.0
RECONNECT_PAUSE_S = (0.1, 2.0)  # first and longest pause between two attempts


def _client() -> httpx.Client:
    """A pooled client per (host, key): building one costs tens of ms (its SSL context), and
    keep-alive connections save a handshake per call. Long reads pass their own timeout."""
    key = (CONFIG.host, CONFIG.api_key)
    client = _clients.get(key)
    if client is None:
        headers = {"Authorization": f"Bearer {CONFIG.api_key}"} if CONFIG.api_key else {}
        timeout = httpx.Timeout(30.0, read=60.0)
        client = _clients[key] = httpx.Client(base_url=CONFIG.host, headers=headers, timeout=timeout)
    return client


def _read_timeout(seconds: float) -> httpx.Timeout:
    return httpx.Timeout(30.0, read=seconds)


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        err = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        err = {"code": "http_error", "message": response.text[:500], "location": None}
    raise RemoteError(err["message"], location_from_dict(err.get("location")), err.get("code"), response.status_code)


# -- models ------------------------------------------------------------------------------------


def fetch_model_info(name: str) -> dict:
    try:
        response = _client().get(f"/v1/models/{name}")
    except httpx.HTTPError as exc:
        raise RemoteError(
            f"'{name}' is not a local folder, and the server at {CONFIG.host} could not be reached "
            f"to look it up as a served model ({type(exc).__name__}). Set CONFIG.set_host(...) or RAYSIGHT_HOST"
        ) from None
    _raise_for(response)
    return response.json()


def tokenizer_dir(name: str, files: dict[str, str]) -> Path:
    """A served model's tokenizer files (from its info), cached on disk by content."""
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path.home() / ".cache" / "raysight" / "tokenizers" / f"{name}-{digest}"
    if not (folder / ".complete").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for file, text in files.items():
            (folder / Path(file).name).write_text(text, encoding="utf-8")
        (folder / ".complete").touch()
    return folder


# -- requests ----------------------------------------------------------------------------------


class RemoteRequest:
    """A submitted session. Non-blocking traces and sessions hand this out as their handle."""

    def __init__(self, request_id: str | None):
        self.id = request_id

    @classmethod
    def submit(cls, body: bytes, timeout_s: float | None = None) -> RemoteRequest:
        headers = {"Content-Type": "application/octet-stream"}
        if timeout_s is not None:
            headers["X-Raysight-Timeout"] = str(timeout_s)
        try:
            response = _client().post("/v1/requests", content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise RemoteError(f"could not reach the raysight server at {CONFIG.host}: {exc}") from None
        _raise_for(response)
        return cls(response.json()["id"])

    def status(self) -> dict:
        response = _client().get(f"/v1/requests/{self.id}")
        _raise_for(response)
        return response.json()

    def cancel(self) -> None:
        _raise_for(_client().delete(f"/v1/requests/{self.id}"))

    def events(self, last_id: str | None = None) -> Iterator[tuple[str | None, str, dict]]:
        """(id, event, data) until the request ends; resumes after a dropped connection, with
        pauses (not a busy loop while the server restarts), for up to RECONNECT_S."""
        lost_at, pause = None, RECONNECT_PAUSE_S[0]
        while True:
            headers = {"Last-Event-ID": last_id} if last_id is not None else {}
            try:
                with _client().stream(
                    "GET", f"/v1/requests/{self.id}/events", headers=headers, timeout=_read_timeout(120.0)
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        _raise_for(response)
                    for event_id, kind, data in _events_of(response):
                        lost_at, pause = None, RECONNECT_PAUSE_S[0]
                        last_id = event_id
                        yield event_id, kind, data
                        if kind in TERMINAL:
                            return
            except httpx.TransportError as exc:
                why = type(exc).__name__
            else:  # closed before a terminal event (e.g. the store restarting): resume likewise
                why = "the stream ended early"
            lost_at = lost_at if lost_at is not None else time.monotonic()
            if time.monotonic() - lost_at > RECONNECT_S:
                raise RemoteError(
                    f"lost the connection to the raysight server at {CONFIG.host} for over "
                    f"{RECONNECT_S:g} s ({why}) while following request {self.id}; it goes on "
                    f"on the server: RemoteRequest('{self.id}').result() waits for it again"
                )
            time.sleep(pause)
            pause = min(2 * pause, RECONNECT_PAUSE_S[1])

    def wait(self, display: StatusLine, source: Iterator | None = None) -> bytes | None:
        """Follow the events until the request ends; raise RemoteError unless it completed.
        Returns the result bytes when the COMPLETED event carried them inline."""
        last_id = None
        source = source if source is not None else self.events()
        while True:
            try:
                for event_id, kind, data in source:
                    last_id = event_id
                    if kind == RECEIVED and "id" in data:
                        self.id = data["id"]
                        display.request_id = self.id
                    elif kind in TERMINAL:
                        return self._end(kind, data)
                    else:
                        _show(display, kind, data)
            except httpx.TransportError as exc:
                if self.id is None:  # dropped before the server said it accepted the request
                    raise RemoteError(
                        f"the connection to the raysight server at {CONFIG.host} broke before it "
                        f"accepted the request ({type(exc).__name__}); submit it again"
                    ) from None
            source = self.events(last_id)  # the stream dropped (or ended early): resume by id

    def _end(self, kind: str, data: dict) -> bytes | None:
        if kind == ERROR:
            raise RemoteError(data["message"], location_from_dict(data.get("location")), data.get("code"))
        if kind == CANCELLED:
            raise RemoteError(f"request {self.id} was cancelled", code="cancelled")
        return base64.b64decode(data["result"]) if "result" in data else None

    def fetch(self, display: StatusLine | None = None) -> dict[int, Any]:
        """Download and decode the saved values (node id -> value)."""
        chunks = []
        with _client().stream("GET", f"/v1/requests/{self.id}/result", timeout=_read_timeout(300.0)) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for(response)
            total = int(response.headers.get("content-length", 0))
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                if display is not None and total > 2**20:
                    display.update(f"downloading {response.num_bytes_downloaded / 2**20:.1f}/{total / 2**20:.1f} MB")
        values, _ = decode_result(b"".join(chunks))
        return values

    def result(self) -> dict[int, Any]:
        """Wait for the request; return the saved values (node id -> value). Ctrl-C stops
        waiting and leaves the request running (it was submitted to run without this process)."""
        try:
            with StatusLine(self.id) as display:
                inline = self.wait(display)
                return decode_result(inline)[0] if inline is not None else self.fetch(display)
        except KeyboardInterrupt:
            _say(f"raysight: stopped waiting; request {self.id} is still running on the server "
                 "(.result() waits again, .cancel() cancels it)")
            raise KeyboardInterrupt from None


class RemoteBackend:
    """Runs sessions on the raysight server at CONFIG.host."""

    remote = True

    def __init__(self, blocking: bool = True):
        self.blocking = blocking

    def run(self, graph: Graph) -> dict[int, Any] | RemoteRequest:
        """Submit the graph's session; wait for its values unless non-blocking (then the handle)."""
        body = encode_session(graph.session_ir(), graph.tensors)
        if not self.blocking:
            return RemoteRequest.submit(body)
        request = RemoteRequest(None)
        try:
            with StatusLine("") as display:
                inline = request.wait(display, _submit_streaming(body))
                return decode_result(inline)[0] if inline is not None else request.fetch(display)
        except KeyboardInterrupt:
            # Nobody waits for a blocking request once its caller is interrupted: cancel it, so
            # it frees its replica, and say which request it was in one line (the frames of the
            # HTTP library that happened to be reading would only hide that line).
            _say(_cancel_after_interrupt(request.id))
            raise KeyboardInterrupt from None


def _cancel_after_interrupt(request_id: str | None) -> str:
    if request_id is None:
        return "raysight: interrupted before the server had accepted the request"
    try:
        # A fresh connection: the pooled one was interrupted in the middle of a read.
        headers = {"Authorization": f"Bearer {CONFIG.api_key}"} if CONFIG.api_key else {}
        with httpx.Client(base_url=CONFIG.host, headers=headers, timeout=10.0) as client:
            response = client.delete(f"/v1/requests/{request_id}")
    except httpx.HTTPError as exc:
        return f"raysight: interrupted; could not cancel request {request_id} ({type(exc).__name__})"
    if response.status_code >= 400:
        return f"raysight: interrupted; could not cancel request {request_id} (HTTP {response.status_code})"
    try:
        state = response.json().get("state")
    except (ValueError, AttributeError):
        state = None
    if state in TERMINAL:
        return f"raysight: interrupted; request {request_id} had already ended ({state})"
    return f"raysight: interrupted; cancelled request {request_id}"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _submit_streaming(body: bytes) -> Iterator[tuple[str | None, str, dict]]:
    """POST the session and read its events from the same response (one round trip)."""
    headers = {"Content-Type": "application/octet-stream", "Accept": "text/event-stream"}
    try:
        with _client().stream(
            "POST", "/v1/requests", content=body, headers=headers, timeout=_read_timeout(120.0)
        ) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for(response)
            if (request_id := response.headers.get(REQUEST_ID_HEADER)) is not None:
                yield None, RECEIVED, {"id": request_id}  # accepted: known before the first event
            yield from _events_of(response)
    except httpx.ConnectError as exc:
        raise RemoteError(f"could not reach the raysight server at {CONFIG.host}: {exc}") from None


def _show(display: StatusLine, kind: str, data: dict) -> None:
    if kind == LOG:
        display.log(data["message"])
    elif kind == QUEUED:
        display.update(f"queued at {data.get('model', '')} (position {data['position']})")
    elif kind == RUNNING:
        display.update(f"running trace {data['trace']}/{data['of']} on {data['model']}")


def _events_of(response: httpx.Response) -> Iterator[tuple[str | None, str, dict]]:
    """The events of an SSE response. The server ends the stream after a terminal event; its end
    is read before that event is handed on, so that the connection goes back to the pool instead
    of being closed when the caller stops reading (a new TCP connection per blocking request)."""
    lines = response.iter_lines()
    for event in _parse_sse(lines):
        if event[1] in TERMINAL:
            with contextlib.suppress(httpx.HTTPError):  # a connection lost now loses nothing
                for _ in lines:  # the chunked body's last chunk: there at once
                    pass
        yield event


def _parse_sse(lines: Iterator[str]) -> Iterator[tuple[str | None, str, dict]]:
    event_id, kind, data = None, "message", []
    for line in lines:
        if not line:
            if data:
                yield event_id, kind, json.loads("\n".join(data))
            kind, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "id":
                event_id = value
            elif field == "event":
                kind = value
            elif field == "data":
                data.append(value)
