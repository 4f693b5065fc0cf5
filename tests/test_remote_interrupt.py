"""Ctrl-C in a remote call, through a real process: a blocking call cancels its request on the
server and says so in one line; a non-blocking `.result()` wait leaves the request running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.remote_helpers import (
    Api,
    no_leftover_requests,  # noqa: F401 - a fixture used below
    unfinished_requests,
)

pytestmark = pytest.mark.usefixtures("no_leftover_requests")

ROOT = Path(__file__).resolve().parents[1]

BLOCKING = """
from client_sdk import LanguageModel
from tests.remote_helpers import slow_traces

model = LanguageModel("llama")
with model.session(remote=True):
    slow_traces(model, 60, 2048)
print("finished")
"""

NON_BLOCKING = """
from client_sdk import LanguageModel
from tests.remote_helpers import slow_traces

model = LanguageModel("llama")
with model.session(remote=True, blocking=False) as session:
    slow_traces(model, 60, 2048)
print(session.id, flush=True)
session.result()
print("finished")
"""


def _start(script: str, cluster, tmp_path: Path) -> subprocess.Popen:
    path = tmp_path / "experiment.py"
    path.write_text(script)
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "RAYSIGHT_HOST": cluster.url,
        "RAYSIGHT_API_KEY": cluster.keys["alice"], "HF_HUB_OFFLINE": "1",
    }
    return subprocess.Popen(
        [sys.executable, str(path)], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _running_request(before: set[str], child: subprocess.Popen, deadline_s: float = 120.0) -> str:
    """The id of the child's request once the request store has it RUNNING."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert child.poll() is None, child.communicate()
        running = [i for i, owner, state in unfinished_requests() if i not in before and state == "RUNNING"]
        if running:
            return running[0]
        time.sleep(0.05)
    raise AssertionError("the child's request never started running")


def _final_state(api: Api, request_id: str) -> str:
    return [event for event, _ in api.events(request_id)][-1]


@pytest.fixture
def api(cluster):
    client = Api(cluster.url, cluster.keys["alice"])
    yield client
    client.close()


def test_ctrl_c_in_a_blocking_call_cancels_the_request(cluster, api, tmp_path) -> None:
    before = {i for i, _, _ in unfinished_requests()}
    child = _start(BLOCKING, cluster, tmp_path)
    request_id = _running_request(before, child)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode != 0 and "finished" not in out
    mentions = [line for line in err.splitlines() if request_id in line]
    assert mentions == [f"raysight: interrupted; cancelled request {request_id}"], err
    assert "httpx" not in err and "httpcore" not in err, err
    assert err.rstrip().endswith("KeyboardInterrupt"), err
    assert _final_state(api, request_id) == "CANCELLED"


def test_ctrl_c_in_a_result_wait_leaves_the_request_running(cluster, api, tmp_path) -> None:
    before = {i for i, _, _ in unfinished_requests()}
    child = _start(NON_BLOCKING, cluster, tmp_path)
    request_id = child.stdout.readline().strip()
    assert _running_request(before, child) == request_id
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode != 0 and "finished" not in out
    mentions = [line for line in err.splitlines() if request_id in line]
    assert len(mentions) == 1 and "still running" in mentions[0], err
    assert "httpx" not in err and "httpcore" not in err, err
    assert api.status(request_id)["state"] == "RUNNING"  # the interrupt did not cancel it
    api.cancel(request_id)
    assert _final_state(api, request_id) == "CANCELLED"
