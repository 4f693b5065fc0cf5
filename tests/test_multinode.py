"""raysight on a multi-node Ray cluster (head + two worker nodes with fake GPUs, on this machine):
placement by resource requests, a session whose intermediate crosses nodes, a worker node removed
under a running request. The cluster runs in a child process (tests/multinode_scenario.py): this
test session's process is already the driver of the one-node cluster the other tests use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "multinode_scenario.py"
TIMEOUT_S = 480


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("multinode") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--repeats", "2"],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert out.exists(), f"the scenario wrote no report (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    assert proc.returncode == 0 and result["ok"], f"{result.get('failed')}\n{json.dumps(result)}\n{proc.stderr[-3000:]}"
    return result


def test_replicas_land_on_the_worker_nodes_their_resources_name(report: dict) -> None:
    placed = report["placement"]
    assert placed["llama-a"] == "a" and placed["llama-b"] == "b"  # custom resources pin them
    assert placed["llama-ha"] in ("a", "b")  # a GPU request: a worker, never the GPU-less head


def test_a_session_crossing_nodes_gives_the_one_node_numbers(report: dict) -> None:
    assert report["cross_node_equal"] is True  # bit for bit vs one node; within 1e-5 of a local run


def test_a_removed_node_costs_one_retry_and_the_replica_comes_back_on_the_other(report: dict) -> None:
    events = [k for k in report["events_after_removal"] if k != "QUEUED"]
    # The replica died with its node mid-session; the runner (on the head) ran the session again,
    # from its first trace, on the replica Serve started on the remaining node.
    assert events[:2] == ["RECEIVED", "RUNNING"] and events[2:] == ["RETRYING", "RUNNING", "COMPLETED"], events
    survivor = {"a": "b", "b": "a"}[report["removed_node"]]
    assert report["replica_back_on"] == [survivor]
    assert report["next_request_ok"] is True
