"""The Serve app builder: config args -> deployments.

Works with Ray's own tools: `serve run deploy/serve-local.yaml` or `serve deploy ...` with
`import_path: serve_app.app:build_app` and the AppConfig as `args`.

    Ingress (FastAPI) ──► SessionRunner ──► ModelDeployment "model-<name>" (one per model)
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from actors.model_deployment import ModelDeployment
from actors.request_store import StoreSpec
from actors.session_runner import SessionRunner
from serve_app.config import AppConfig, ModelConfig
from serve_app.ingress import Ingress


def build_app(args: dict[str, Any]) -> Application:
    config = AppConfig.model_validate(args)
    store = StoreSpec(config.resolved_state_dir(), config.result_ttl_s)
    models = {m.name: _model_app(m, config, store) for m in config.models}
    runner = SessionRunner.bind(models, store)
    return Ingress.bind(config.model_dump(), runner, models)


def _model_app(m: ModelConfig, config: AppConfig, store: StoreSpec) -> Application:
    options: dict[str, Any] = {
        "name": f"model-{m.name}",
        "ray_actor_options": {"num_cpus": m.cpus_per_replica, "num_gpus": m.gpus_per_replica},
        "max_ongoing_requests": m.max_ongoing_requests,
    }
    if m.autoscaling_config is not None:
        options["autoscaling_config"] = m.autoscaling_config
    else:
        options["num_replicas"] = m.num_replicas or 1
    spec = {"name": m.name, "path": m.resolved_path(), "dtype": m.dtype,
            "max_trace_bytes": config.limits.max_trace_bytes, "max_log_chars": config.limits.max_log_chars,
            "max_saved_bytes": config.limits.max_saved_bytes, "max_batch_size": m.max_batch_size,
            "max_batch_tokens": m.max_batch_tokens, "batch_wait_ms": m.batch_wait_ms}
    return ModelDeployment.options(**options).bind(spec, store)
