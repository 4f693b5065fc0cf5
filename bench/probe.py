"""Client-side instrumentation for the remote benchmarks: wall-clock marks and bytes on the wire.

`Probe.install()` wraps a few functions of `client_sdk.remote` (encode, the streaming submit, the
result download, decode) so every remote run records when each step started and when each server
event arrived, and replaces the pooled httpx clients of client_sdk with ones whose transport
counts the bytes sent and received (status line and headers included; the chunked-encoding framing
that h11 strips is not, a few bytes per chunk). The code path measured is client_sdk's own; the
wrappers add microseconds.

Marks are `time.time()` values, the clock the server's request store stamps its events with, so
client and server marks of one request can be subtracted (same machine).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx

from client_sdk import remote
from client_sdk.config import CONFIG


class _CountingStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, probe: Probe):
        self.inner, self.probe = inner, probe

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.probe.count("rx", len(chunk))
            yield chunk

    def close(self) -> None:
        self.inner.close()


def _header_bytes(lines: list[tuple[bytes, bytes]]) -> int:
    return sum(len(k) + len(v) + 4 for k, v in lines) + 2  # "k: v\r\n" each, blank line


class CountingTransport(httpx.BaseTransport):
    """httpx's own transport, counting what crosses it."""

    def __init__(self, probe: Probe):
        self.inner = httpx.HTTPTransport()
        self.probe = probe

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        line = len(request.method) + len(request.url.raw_path) + len(" HTTP/1.1\r\n") + 1
        body = request.headers.get("content-length")
        self.probe.count("tx", line + _header_bytes(request.headers.raw) + (int(body) if body else 0))
        response = self.inner.handle_request(request)
        status = len(f"HTTP/1.1 {response.status_code} {response.reason_phrase}\r\n")
        self.probe.count("rx", status + _header_bytes(response.headers.raw))
        response.stream = _CountingStream(response.stream, self.probe)
        return response

    def close(self) -> None:
        self.inner.close()


class Probe:
    """Collects one record (a dict) per remote run: `start()` opens one, `stop()` closes it.
    Marks made while no record is open (warm-up runs) go to a scratch dict."""

    def __init__(self) -> None:
        self.record: dict[str, Any] = {}
        self._saved: dict[str, Any] = {}
        self.last_body: bytes | None = None  # the latest request body (to replay it raw)

    def start(self, **fields: Any) -> dict[str, Any]:
        self.record = {"t0": time.time(), "rx": 0, "tx": 0, "events": [], **fields}
        return self.record

    def stop(self) -> dict[str, Any]:
        rec, self.record = self.record, {}
        return rec

    def mark(self, name: str) -> None:
        self.record[name] = time.time()

    def count(self, key: str, n: int) -> None:
        self.record[key] = self.record.get(key, 0) + n

    # -- installing the wrappers ---------------------------------------------------------------

    def install(self) -> None:
        probe = self
        enc, sub, dec, fetch = remote.encode_session, remote._submit_streaming, remote.decode_result, remote.RemoteRequest.fetch
        self._saved = {"encode_session": enc, "_submit_streaming": sub, "decode_result": dec, "fetch": fetch}

        def encode_session(session, tensors):
            probe.mark("encode_start")
            body = enc(session, tensors)
            probe.mark("encode_end")
            probe.record["body_bytes"] = len(body)
            probe.last_body = body
            return body

        def submit_streaming(body):
            probe.mark("post")
            for item in sub(body):
                now = time.time()
                probe.record.setdefault("events", []).append((item[1], now))
                # The event's size as the ingress writes it (id, event, data lines): which kinds
                # of event the received bytes are made of. An event without an id is the client's
                # own (RECEIVED from the response header): no bytes of the stream.
                if item[0] is not None:
                    data = json.dumps(item[2], separators=(",", ":"))
                    size = len(f"id: {item[0]}\nevent: {item[1]}\ndata: {data}\n\n".encode())
                    by_kind = probe.record.setdefault("sse_bytes", {})
                    by_kind[item[1]] = by_kind.get(item[1], 0) + size
                    counts = probe.record.setdefault("sse_counts", {})
                    counts[item[1]] = counts.get(item[1], 0) + 1
                if item[1] == "RECEIVED":
                    probe.record["id"] = item[2].get("id")
                yield item

        def decode_result(data):
            probe.mark("decode_start")
            out = dec(data)
            probe.mark("decode_end")
            return out

        def fetch_result(self, display=None):
            probe.mark("fetch_start")
            out = fetch(self, display)
            probe.mark("fetch_end")
            return out

        remote.encode_session = encode_session
        remote._submit_streaming = submit_streaming
        remote.decode_result = decode_result
        remote.RemoteRequest.fetch = fetch_result
        # client_sdk pools one httpx client per (host, key): put a counting one there.
        headers = {"Authorization": f"Bearer {CONFIG.api_key}"}
        remote._clients[(CONFIG.host, CONFIG.api_key)] = httpx.Client(
            base_url=CONFIG.host, headers=headers, timeout=httpx.Timeout(30.0, read=60.0),
            transport=CountingTransport(self),
        )

    def uninstall(self) -> None:
        if not self._saved:
            return
        remote.encode_session = self._saved["encode_session"]
        remote._submit_streaming = self._saved["_submit_streaming"]
        remote.decode_result = self._saved["decode_result"]
        remote.RemoteRequest.fetch = self._saved["fetch"]
        client = remote._clients.pop((CONFIG.host, CONFIG.api_key), None)
        if client is not None:
            client.close()
        self._saved = {}
