"""What `GET /v1/models` says of each model: its live replicas (from Serve's controller) and its
queue, summed over every replica of the model.

A Serve handle call reaches one replica of its choosing, so the queue is read from each replica
actor directly: Serve's replica actors answer `record_routing_stats` with the deployment's method
of that name (ModelDeployment returns its `stats()`), the hook Serve itself polls for request
routing. A replica still loading, or one that does not answer in time, counts as an empty queue.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from serve_app.readiness import app_deployments

STATS_TIMEOUT_S = 2.0
SERVE_NAMESPACE = "serve"


@dataclass(frozen=True)
class ModelLoad:
    replicas: int  # RUNNING replicas (a replica that is starting or draining is not counted)
    state: str  # Serve's deployment status: HEALTHY, UPSCALING, DOWNSCALING, UPDATING, ...
    waiting: int  # requests waiting in the model's replicas for their turn
    running: int  # requests running on them now
    nodes: list[str]  # the Ray node id of each replica that answered (sorted)


async def model_loads(names: list[str]) -> dict[str, ModelLoad]:
    """Each model's load, for the models of this app (`names`: model names, not deployments)."""
    deployments, actors = await asyncio.gather(asyncio.to_thread(app_deployments), asyncio.to_thread(_replica_actors))
    app = _app_name()
    out = {}
    stats = await asyncio.gather(*(_queue(actors, app, name) for name in names))
    for name, (waiting, running, nodes) in zip(names, stats, strict=True):
        dep = deployments.get(f"model-{name}")
        replicas = int((dep.replica_states or {}).get("RUNNING", 0)) if dep is not None else 0
        state = str(getattr(dep.status, "value", dep.status)) if dep is not None else "NOT_DEPLOYED"
        out[name] = ModelLoad(replicas=replicas, state=state, waiting=waiting, running=running, nodes=nodes)
    return out


async def _queue(actors: list[str], app: str | None, name: str) -> tuple[int, int, list[str]]:
    import ray

    prefixes = tuple(f"SERVE_REPLICA::{a}#model-{name}#" for a in ([app] if app else _apps(actors)))
    mine = [a for a in actors if a.startswith(prefixes)]

    async def one(actor: str) -> dict[str, Any]:
        handle = ray.get_actor(actor, namespace=SERVE_NAMESPACE)
        return await asyncio.wait_for(handle.record_routing_stats.remote(), STATS_TIMEOUT_S)

    answers = await asyncio.gather(*(one(a) for a in mine), return_exceptions=True)
    good = [a for a in answers if isinstance(a, dict)]
    nodes = sorted(str(a["node_id"]) for a in good if a.get("node_id"))
    return sum(int(a.get("waiting", 0)) for a in good), sum(int(a.get("running", 0)) for a in good), nodes


def _replica_actors() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a.get("namespace") == SERVE_NAMESPACE and a["name"].startswith("SERVE_REPLICA::")]


def _apps(actors: list[str]) -> set[str]:
    return {a.removeprefix("SERVE_REPLICA::").split("#", 1)[0] for a in actors}


def _app_name() -> str | None:
    from ray import serve

    try:
        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - outside a replica: every app
        return None
