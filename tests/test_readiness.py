"""Readiness (`GET /readyz`) on the real cluster, and how the launcher waits on it.

The 503 case through `raysight serve` is in test_serve_cli.py; here a second raysight app in the
session's cluster serves a model whose weights are corrupt, so its replica can never start.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from ray.serve.schema import DeploymentStatus, DeploymentStatusOverview, DeploymentStatusTrigger

from serve_app import launcher, readiness
from serve_app.config import ModelConfig


def test_readyz_is_200_once_every_model_has_a_replica(cluster) -> None:
    r = httpx.get(f"{cluster.url}/readyz")  # no key: health routes are open
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ready"] is True
    check, store = body["checks"]
    assert store == {"name": "store", "ok": True, "message": "the request store answers", "models": None}
    assert check == {"name": "models", "ok": True, "message": "every model has a running replica",
                     "models": check["models"]}
    states = {m["name"]: (m["ready"], m["replicas"] >= 1, m["state"]) for m in check["models"]}
    assert states == {"llama": (True, True, "HEALTHY"), "gpt2": (True, True, "HEALTHY")}


def test_readyz_is_in_the_openapi_schema(cluster) -> None:
    paths = httpx.get(f"{cluster.url}/openapi.json").json()["paths"]
    route = paths["/readyz"]["get"]
    assert set(route["responses"]) >= {"200", "503"}
    assert route["responses"]["503"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Readiness"}


def test_waiting_for_an_app_whose_model_cannot_start_fails_in_one_line(cluster) -> None:
    """launcher.wait_ready gives up with one line naming the model once Serve marks its deployment
    DEPLOY_FAILED (here a deployment named like a model whose constructor always raises: it fails
    in a second where a real model would first import torch, three times)."""
    from ray import serve
    from ray.serve.api import RunTarget

    @serve.deployment(name="model-broken", ray_actor_options={"num_cpus": 0})
    class Broken:
        def __init__(self) -> None:
            raise OSError("Unable to load weights from checkpoint file 'model.safetensors'")

    app = "readiness-broken"
    serve.run_many([RunTarget(target=Broken.bind(), name=app, route_prefix="/broken")],
                   wait_for_applications_running=False)
    try:
        with pytest.raises(launcher.StartError) as failed:
            launcher.wait_ready(f"{cluster.url}/broken", timeout_s=300, app_name=app)
    finally:
        serve.delete(app, _blocking=False)
    assert str(failed.value) == ("model 'broken' failed to start: OSError: Unable to load weights from "
                                 "checkpoint file 'model.safetensors'")
    assert httpx.get(f"{cluster.url}/readyz").status_code == 200  # the app next to it is untouched


def _deployment(status: DeploymentStatus, running: int, message: str = "") -> DeploymentStatusOverview:
    return DeploymentStatusOverview(status=status, status_trigger=DeploymentStatusTrigger.UNSPECIFIED,
                                    replica_states={"RUNNING": running} if running else {}, message=message)


@pytest.mark.parametrize(
    ("autoscaling", "status", "running", "ready"),
    [
        (None, DeploymentStatus.UPDATING, 0, False),
        (None, DeploymentStatus.HEALTHY, 1, True),
        (None, DeploymentStatus.UPSCALING, 1, True),  # one replica serves while more start
        ({"min_replicas": 1, "max_replicas": 2}, DeploymentStatus.HEALTHY, 0, False),
        ({"min_replicas": 0, "max_replicas": 2}, DeploymentStatus.HEALTHY, 0, True),  # scaled to zero on purpose
        ({"min_replicas": 0, "max_replicas": 2}, DeploymentStatus.UPDATING, 0, False),
    ],
)
def test_model_readiness_rule(autoscaling, status, running, ready) -> None:
    model = ModelConfig(name="m", path="/x", autoscaling_config=autoscaling)
    assert readiness.model_readiness(model, _deployment(status, running)).ready is ready


def test_a_failed_model_reports_the_last_line_of_serve_message() -> None:
    message = ("The deployment failed to start 3 times in a row. See controller logs for details. Error:\n"
               "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
               "safetensors_rust.SafetensorError: Error while deserializing header: header too large\n")
    state = readiness.model_readiness(ModelConfig(name="m", path="/x"),
                                      _deployment(DeploymentStatus.DEPLOY_FAILED, 0, message))
    assert (state.ready, state.state) == (False, "DEPLOY_FAILED")
    assert state.message == "safetensors_rust.SafetensorError: Error while deserializing header: header too large"


def test_a_model_serve_does_not_know_is_not_ready() -> None:
    state = readiness.model_readiness(ModelConfig(name="m", path="/x"), None)
    assert (state.ready, state.state) == (False, "NOT_DEPLOYED")


def test_a_check_that_raises_is_a_failed_check() -> None:
    async def ok() -> readiness.Check:
        return readiness.Check(name="models", ok=True, message="fine")

    async def broken() -> readiness.Check:
        raise ConnectionError("store unreachable")

    report = asyncio.run(readiness.run_checks([("models", ok), ("store", broken)]))
    assert report.ready is False
    assert [(c.name, c.ok) for c in report.checks] == [("models", True), ("store", False)]
    assert report.checks[1].message == "the check failed: ConnectionError: store unreachable"

