"""A client following a request whose server went away (a Serve proxy or ingress restarting, or
gone for good) reconnects with pauses, not in a busy loop, and after RECONNECT_S gives up with a
RemoteError naming the request and how to wait for it again. No cluster: a port nobody listens on."""

from __future__ import annotations

import socket

import pytest

from client_sdk import CONFIG, remote
from client_sdk.remote import RemoteError, RemoteRequest


@pytest.fixture
def dead_server():
    with socket.socket() as s:  # a free port, closed again: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = (CONFIG.host, CONFIG.api_key)
    CONFIG.set_host(f"http://127.0.0.1:{port}")
    CONFIG.set_default_api_key("k")
    try:
        yield
    finally:
        CONFIG.host, CONFIG.api_key = saved


def test_following_a_request_on_a_dead_server_ends_in_a_clear_error(dead_server, monkeypatch) -> None:
    monkeypatch.setattr(remote, "RECONNECT_S", 1.0)
    attempts = []
    connect = remote._client

    def counting():
        attempts.append(1)
        return connect()

    monkeypatch.setattr(remote, "_client", counting)
    with pytest.raises(RemoteError) as exc:
        list(RemoteRequest("req-42").events())
    message = str(exc.value)
    assert "req-42" in message and "RemoteRequest('req-42').result()" in message
    assert "lost the connection" in message and "ConnectError" in message
    # paused between attempts (0.1, 0.2, 0.4, 0.8 s ...): a handful in a second, not thousands
    assert 2 <= len(attempts) <= 8, len(attempts)
