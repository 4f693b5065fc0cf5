"""kill -9 of the process that carries HTTP into the cluster (a real process of the real cluster)
while requests run: the service answers again within seconds, every accepted request still ends
COMPLETED, ERROR or CANCELLED, a blocking client gets its result or a clear error, and the result
stays retrievable. `raysight serve` puts HAProxy in front (docs/operator.md): the haproxy process
and its manager actor (Serve's HAProxyManager, which starts a new haproxy, or is itself restarted
by Serve's controller) are each killed in turn.

Nothing of a request lives in them: they only carry bytes between clients and the ingress,
whose calls to the store and the replicas go on without them. Destructive: a "zz" file, and the
test waits for HTTP to be back before it returns.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import psutil
import pytest
import torch
from remote_helpers import (
    P1,
    no_leftover_requests,  # noqa: F401 - a fixture
    slow_session,
    slow_traces,
    unfinished_requests,
)
from test_zz_remote_faults import quick_request_completes

from client_sdk.remote import RemoteError

pytestmark = pytest.mark.usefixtures("remote_client", "no_leftover_requests")
BOUND_S = 90.0  # bound on a recovery on a loaded 2-core box (it normally takes a few seconds)


def proxy_pid(process: str) -> int:
    """The pid of this cluster's `process` ("haproxy", or the "HAProxyManager" actor): found among
    this Ray driver's descendants, so no other cluster on the machine is touched."""
    found = [
        p.pid for p in psutil.Process().children(recursive=True)
        if p.name() == process or (process != "haproxy" and f"ray::{process}" in " ".join(p.cmdline()))
    ]
    assert len(found) == 1, (process, found)
    return found[0]


def wait_answering(url: str) -> float:
    """Bounded poll of /healthz until an HTTP answer comes (nothing announces a new proxy);
    returns the seconds it took."""
    start = time.monotonic()
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        assert time.monotonic() - start < BOUND_S, f"no answer {BOUND_S:g} s after the proxy died"
        time.sleep(0.1)


@pytest.mark.parametrize("process", ["haproxy", "HAProxyManager"])
def test_proxy_killed_mid_request_loses_nothing(process, cluster, alice, llama, small_body) -> None:
    followed = alice.submit(slow_session(llama, 10))  # followed over raw HTTP, by id
    blocking: dict = {}

    def blocking_client() -> None:  # a researcher's script blocking on a session
        try:
            with llama.session(remote=True):
                slow_traces(llama, 10)
                with llama.trace(P1):
                    blocking["logits"] = llama.lm_head.output.save()
        except Exception as exc:  # noqa: BLE001 - checked below
            blocking["error"] = exc

    thread = threading.Thread(target=blocking_client, daemon=True)
    thread.start()
    alice.wait_for(followed, lambda k, d: k == "RUNNING")
    deadline = time.monotonic() + BOUND_S
    while not (others := {rid for rid, _, _ in unfinished_requests()} - {followed}):
        assert time.monotonic() < deadline and thread.is_alive(), blocking  # accepted, and open
        time.sleep(0.05)
    (other,) = others

    old, old_haproxy = proxy_pid(process), proxy_pid("haproxy")
    os.kill(old, signal.SIGKILL)
    took = wait_answering(cluster.url)
    assert took < BOUND_S
    assert proxy_pid(process) != old and proxy_pid("haproxy") != old_haproxy  # new processes answer

    # every accepted request ends; the followed one completes and its result is there
    for rid in (followed, other):
        kind, _ = alice.end(rid)
        assert kind in ("COMPLETED", "ERROR", "CANCELLED"), (rid, kind)
    assert alice.end(followed)[0] == "COMPLETED"
    r = alice.result(followed)
    assert r.status_code == 200 and r.content
    thread.join(timeout=BOUND_S)
    assert not thread.is_alive(), "the blocking client still waits after its request ended"
    if "error" in blocking:  # a clear error naming the request, not a traceback of httpx
        err = blocking["error"]
        assert isinstance(err, RemoteError), repr(err)
        assert other in str(err), str(err)
    else:
        assert isinstance(blocking["logits"], torch.Tensor) and blocking["logits"].shape[:2] == (1, 8)
    assert alice.status(other)["state"] == "COMPLETED"
    quick_request_completes(alice, small_body)
