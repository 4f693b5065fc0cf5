"""Bounds on the real local cluster (issue 9): cancel and timeout stop the work, limits on what a
trace holds and on open streams, the ingress's order of checks, error classes of user mistakes,
and event-stream resumption."""

from __future__ import annotations

import pytest
from remote_helpers import (
    P1,
    api,
    no_leftover_requests,  # noqa: F401 - a fixture used below
    record,
)

import client_sdk
from client_sdk import LanguageModel

pytestmark = pytest.mark.usefixtures("remote_client", "no_leftover_requests")


@pytest.fixture(scope="module")
def llama(cluster) -> LanguageModel:
    return LanguageModel("llama")


@pytest.fixture
def alice(cluster):
    with api(cluster.url, cluster.keys["alice"]) as a:
        yield a


@pytest.fixture
def bob(cluster):
    with api(cluster.url, cluster.keys["bob"]) as a:
        yield a


@pytest.fixture
def small_body(llama) -> bytes:
    def body():
        with llama.trace(P1):
            llama.lm_head.output[0, -1].argmax().save()

    return record(body)


HEAVY_OPS = 4000  # 1024x1024 matmuls: minutes of replica time, unless the cancel stops them


def heavy_body(model: LanguageModel) -> bytes:
    """One trace that touches a single module and then does thousands of pure tensor operations
    (no module boundary between them): minutes of work unless stopped between operations."""

    def body():
        with model.trace(P1):
            x = model.model.layers[0].output.new_ones(1024, 1024)
            acc = x[0, 0]
            for _ in range(HEAVY_OPS):
                acc = acc + (x @ x)[0, 0]
            client_sdk.log("heavy work finished")
            acc.save()

    return record(body)


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
