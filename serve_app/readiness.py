"""Readiness (`GET /readyz`): can this app serve a request now?

Liveness (`/healthz`) only says the ingress answers. Readiness is a list of named checks, each an
async function returning a `Check`; the app is ready when every check passes. Adding a dependency
is one more function in `checks_for`.

The store check: the request store actor answers a ping within STORE_TIMEOUT_S.

The models check: every configured model has at least one RUNNING replica (a model autoscaled
with `min_replicas: 0` also counts once Serve reports its deployment HEALTHY: it has scaled to zero
on purpose and starts a replica on the first request).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pydantic import BaseModel

from serve_app.config import AppConfig, ModelConfig

MAX_MESSAGE_CHARS = 500
STORE_TIMEOUT_S = 2.0


class ModelReadiness(BaseModel):
    name: str
    ready: bool
    replicas: int  # RUNNING replicas
    state: str  # Serve's deployment status: UPDATING, HEALTHY, UNHEALTHY, DEPLOY_FAILED, ...
    message: str = ""  # Serve's reason, shortened to its last line (e.g. why a replica fails)


class Check(BaseModel):
    name: str  # "models"; later ones name their dependency
    ok: bool
    message: str  # one line for people
    models: list[ModelReadiness] | None = None  # the models check: every configured model


class Readiness(BaseModel):
    ready: bool
    checks: list[Check]


ReadinessCheck = Callable[[], Awaitable[Check]]


def checks_for(config: AppConfig, store: Any | None = None) -> list[tuple[str, ReadinessCheck]]:
    """The named checks `/readyz` runs for an app with this config (`store`: the request store
    actor's handle; its check is left out without one)."""
    checks: list[tuple[str, ReadinessCheck]] = [("models", lambda: models_check(config.models))]
    if store is not None:
        checks.append(("store", lambda: store_check(store)))
    return checks


async def run_checks(checks: Sequence[tuple[str, ReadinessCheck]]) -> Readiness:
    """Run the checks concurrently; a check that raises is a failed check that says why."""
    results = await asyncio.gather(*(check() for _, check in checks), return_exceptions=True)
    out = []
    for (name, _), result in zip(checks, results, strict=True):
        if isinstance(result, BaseException):
            result = Check(name=name, ok=False, message=f"the check failed: {type(result).__name__}: {result}")
        out.append(result)
    return Readiness(ready=all(c.ok for c in out), checks=out)


async def models_check(models: Sequence[ModelConfig]) -> Check:
    deployments = await asyncio.to_thread(app_deployments)
    states = [model_readiness(m, deployments.get(f"model-{m.name}")) for m in models]
    waiting = [s for s in states if not s.ready]
    if not waiting:
        return Check(name="models", ok=True, message="every model has a running replica", models=states)
    summary = "; ".join(f"{s.name} ({s.replicas} running replicas, {s.state})" for s in waiting)
    return Check(name="models", ok=False, message=f"not ready: {summary}", models=states)


async def store_check(store: Any, timeout_s: float = STORE_TIMEOUT_S) -> Check:
    """The request store answers within `timeout_s` (Ray restarts a dead one: this fails while it
    is down or restarting, or if its database cannot be opened)."""
    try:
        await asyncio.wait_for(store.ping.remote(), timeout_s)
    except TimeoutError:
        return Check(name="store", ok=False, message=f"the request store did not answer within {timeout_s:g} s")
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        return Check(name="store", ok=False, message=f"the request store failed: {short_message(str(exc))}")
    return Check(name="store", ok=True, message="the request store answers")


def model_readiness(model: ModelConfig, deployment: Any | None) -> ModelReadiness:
    """`deployment`: Serve's DeploymentStatusOverview of `model-<name>` (None: not deployed)."""
    if deployment is None:
        return ModelReadiness(name=model.name, ready=False, replicas=0, state="NOT_DEPLOYED")
    running = int((deployment.replica_states or {}).get("RUNNING", 0))
    state = str(getattr(deployment.status, "value", deployment.status))
    scaled_to_zero = (model.autoscaling_config or {}).get("min_replicas", 1) == 0 and state == "HEALTHY"
    return ModelReadiness(name=model.name, ready=running >= 1 or scaled_to_zero, replicas=running,
                          state=state, message=short_message(deployment.message))


def short_message(message: str | None) -> str:
    """The last non-empty line of Serve's status message (for a failed replica, a whole traceback
    whose last line is the error), capped."""
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    return lines[-1][:MAX_MESSAGE_CHARS] if lines else ""


def app_deployments() -> dict[str, Any]:
    """This app's deployments (by name) from Serve's controller; a blocking call."""
    from ray import serve

    try:
        app_name = serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - outside a replica: look at every app
        app_name = None
    out: dict[str, Any] = {}
    for name, app in serve.status().applications.items():
        if app_name is None or name == app_name:
            out.update(app.deployments)
    return out
