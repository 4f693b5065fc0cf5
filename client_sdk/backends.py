"""Backends: where a recorded session runs.

The tracing contexts record IR; when the outermost block exits they hand the graph to the backend
chosen when it was opened. `LocalBackend` runs it in this process with the shared engine;
`RemoteBackend` sends it to a raysight server. A backend returns the saved values (node id ->
value), or — remote and non-blocking — a `RemoteHandle` to wait on later.
"""

from __future__ import annotations

from typing import Any, Protocol

from client_sdk.graph import Graph
from client_sdk.local import LocalBackend
from client_sdk.remote import RemoteBackend, RemoteRequest

RemoteHandle = RemoteRequest  # what a non-blocking run hands back: .id .status() .result() .cancel()


class Backend(Protocol):
    remote: bool

    def run(self, graph: Graph) -> dict[int, Any] | RemoteHandle: ...


def backend_for(remote: bool, blocking: bool = True) -> Backend:
    return RemoteBackend(blocking) if remote else LocalBackend()
