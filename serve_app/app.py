"""The Serve app builder: config args -> deployments.

Works with Ray's own tools: `serve run deploy/serve-local.yaml` or `serve deploy ...` with
`import_path: serve_app.app:build_app` and the AppConfig as `args`.

    Ingress (FastAPI) ──► ModelDeployment "model-<name>" (one per model): a session on one model
       └────────────► SessionRunner ──► ModelDeployment ...: a session across models
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from actors.model_deployment import ModelDeployment
from actors.request_store import StoreSpec
from actors.session_runner import SessionRunner
from serve_app.config import AppConfig, ModelConfig
from serve_app.ingress import Ingress

# How often a stopping replica looks whether its requests have finished (Serve's default is 2 s:
# a drained replica would idle that long before it stops).
DRAIN_POLL_S = 0.5
# The control plane (ingress, session runner; the request store pins itself the same way) lives on
# the head node, so that losing a worker node loses model replicas only, never a request's runner.
HEAD_NODE = {"node:__internal_head__": 0.001}


def build_app(args: dict[str, Any]) -> Application:
    config = AppConfig.model_validate(args)
    store = StoreSpec(config.resolved_state_dir(), config.result_ttl_s)
    models = {m.name: _model_app(m, config, store) for m in config.models}
    runner = SessionRunner.options(ray_actor_options=_on_head()).bind(models, store)
    return Ingress.options(ray_actor_options=_on_head()).bind(config.model_dump(), runner, models)


def _on_head() -> dict[str, Any]:
    return {"num_cpus": 0, "resources": dict(HEAD_NODE)}


def model_options(m: ModelConfig, config: AppConfig) -> dict[str, Any]:
    """The Serve deployment options of model `m`'s deployment: what each replica asks Ray for
    (GPUs, CPUs, custom resources), how many replicas, and how long a stopping one may drain."""
    actor: dict[str, Any] = {"num_cpus": m.cpus_per_replica, "num_gpus": m.gpus_per_replica}
    if m.resources:
        actor["resources"] = dict(m.resources)
    options: dict[str, Any] = {
        "name": f"model-{m.name}",
        "ray_actor_options": actor,
        "max_ongoing_requests": m.max_ongoing_requests,
        # A replica being stopped gets no new requests and finishes those it holds first.
        "graceful_shutdown_timeout_s": m.graceful_shutdown_timeout_s or config.limits.request_timeout_s,
        "graceful_shutdown_wait_loop_s": DRAIN_POLL_S,
    }
    if m.autoscaling_config is not None:
        options["autoscaling_config"] = m.autoscaling_config
    else:
        options["num_replicas"] = m.num_replicas or 1
    return options


def _model_app(m: ModelConfig, config: AppConfig, store: StoreSpec) -> Application:
    options = model_options(m, config)
    spec = {"name": m.name, "path": m.resolved_path(), "dtype": m.dtype,
            "max_trace_bytes": config.limits.max_trace_bytes, "max_log_chars": config.limits.max_log_chars,
            "max_saved_bytes": config.limits.max_saved_bytes, "max_batch_size": m.max_batch_size,
            "max_batch_tokens": m.max_batch_tokens, "batch_wait_ms": m.batch_wait_ms}
    return ModelDeployment.options(**options).bind(spec, store)
