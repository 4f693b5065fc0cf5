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

import contextlib
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


def live(process: str) -> list[psutil.Process]:
    """This cluster's live `process`es ("haproxy", or the "HAProxyManager" actor), oldest first:
    found among this Ray driver's descendants, so no other cluster on the machine is touched.
    After a reload an old haproxy may still drain its connections beside the new one."""
    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):  # gone, or a zombie (a killed one not reaped yet)
            if p.status() != psutil.STATUS_ZOMBIE and (
                    p.name() == process or f"ray::{process}" in " ".join(p.cmdline())):
                found.append(p)
    return sorted(found, key=lambda p: p.create_time())


def wait_gone(pids: set[int]) -> None:
    """Bounded poll until none of `pids` is a live process (a manager takes its haproxy with it)."""
    deadline = time.monotonic() + BOUND_S
    while pids & {p.pid for name in ("haproxy", "HAProxyManager") for p in live(name)}:
        assert time.monotonic() < deadline, f"{pids} still alive {BOUND_S:g} s after the kill"
        time.sleep(0.1)


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

    killed = live(process)[-1].pid  # the haproxy that listens now (the newest), or the manager
    gone = {killed} | ({p.pid for p in live("haproxy")} if process == "HAProxyManager" else set())
    os.kill(killed, signal.SIGKILL)
    wait_gone(gone)
    took = wait_answering(cluster.url)
    assert took < BOUND_S
    assert live("haproxy") and live(process)[-1].pid != killed  # new processes answer

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
