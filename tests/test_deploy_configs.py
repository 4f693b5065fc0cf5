"""cluster.yaml and the Serve configs, checked with Ray's own schemas; nothing is launched."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import jsonschema
import pydantic
import pytest
import yaml
from ray.autoscaler._private.util import fillout_defaults, validate_config
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from serve_app import model_store
from serve_app.config import AppConfig, hash_key

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIGS = ["deploy/serve-production.yaml", "deploy/serve-local.yaml"]


def _load(rel: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / rel).read_text())


def _app_config(rel: str) -> AppConfig:
    (application,) = ServeDeploySchema.model_validate(_load(rel)).applications
    return AppConfig.model_validate(application.args)


def _unknown_keys(cfg: dict[str, Any]) -> list[str]:
    """Keys Ray's Serve schemas would silently ignore (they accept extras for forward
    compatibility), so a typo like `target_ongoing_request` would pass unnoticed."""
    bad = [k for k in cfg if k not in ServeDeploySchema.model_fields]
    for app in cfg.get("applications", []):
        bad += [k for k in app if k not in ServeApplicationSchema.model_fields]
        for model in (app.get("args") or {}).get("models", []):
            scaling = model.get("autoscaling_config") or {}
            bad += [k for k in scaling if k not in AutoscalingConfig.model_fields]
    return bad


# --- cluster.yaml -------------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_schema() -> None:
    validate_config(fillout_defaults(_load("cluster.yaml")))


@pytest.mark.parametrize(
    "where",
    [[], ["available_node_types", "worker.gpu8"], ["docker"]],
    ids=["top", "node-type", "docker"],
)
def test_cluster_yaml_rejects_unknown_keys(where: list[str]) -> None:
    cfg = _load("cluster.yaml")
    section = cfg
    for key in where:
        section = section[key]
    section["bogus_key"] = 1
    with pytest.raises(jsonschema.ValidationError, match="bogus_key"):
        validate_config(fillout_defaults(cfg))


def test_gpu_workers_fit_the_production_models() -> None:
    cluster = _load("cluster.yaml")
    gpu_nodes = [t for t in cluster["available_node_types"].values() if t["resources"].get("GPU")]
    per_node = max(t["resources"]["GPU"] for t in gpu_nodes)
    total = sum(t["resources"]["GPU"] * t["max_workers"] for t in gpu_nodes)
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # the head is CPU-only by design
    needed = 0.0
    for m in _app_config("deploy/serve-production.yaml").models:
        assert m.gpus_per_replica <= per_node, f"{m.name}: a replica must fit on one node"
        replicas = m.autoscaling_config["max_replicas"] if m.autoscaling_config else m.num_replicas
        needed += m.gpus_per_replica * (replicas or 1)
    assert needed <= total, f"max replicas need {needed} GPUs, the workers have {total}"


def test_cluster_setup_fetches_the_known_models_it_serves() -> None:
    setup = "\n".join(_load("cluster.yaml")["setup_commands"])
    for m in _app_config("deploy/serve-production.yaml").models:
        if m.name in model_store.KNOWN_MODELS:
            assert f"raysight models fetch {m.name}" in setup


# --- Serve configs ------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", SERVE_CONFIGS)
def test_serve_config_is_valid(rel: str) -> None:
    cfg = _load(rel)
    (application,) = ServeDeploySchema.model_validate(cfg).applications
    assert application.import_path == "serve_app.app:build_app"
    assert importlib.util.find_spec("serve_app.app") is not None
    assert _unknown_keys(cfg) == []
    config = AppConfig.model_validate(application.args)
    for m in config.models:
        if m.autoscaling_config is not None:
            AutoscalingConfig.model_validate(m.autoscaling_config)


def test_production_config() -> None:
    assert _load("deploy/serve-production.yaml")["http_options"]["host"] == "0.0.0.0"
    models = {m.name: m for m in _app_config("deploy/serve-production.yaml").models}
    big = models["llama-3.1-70b"]
    assert (big.dtype, big.gpus_per_replica) == ("bfloat16", 4)
    assert big.autoscaling_config["min_replicas"] == 1
    assert big.autoscaling_config["max_replicas"] == 4
    small = models["smollm2-135m"]
    assert (small.gpus_per_replica, small.num_replicas) == (0, 1)


def test_local_config_serves_the_fetched_model_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(model_store.CACHE_ENV, raising=False)
    assert _load("deploy/serve-local.yaml")["http_options"]["host"] == "127.0.0.1"
    config = _app_config("deploy/serve-local.yaml")
    (m,) = config.models
    assert m.name == "smollm2-135m" and m.gpus_per_replica == 0
    assert Path(m.resolved_path()) == model_store.default_cache_dir() / "smollm2-135m"
    # The well-known demo key its comment documents.
    assert [k.key_sha256 for k in config.auth.api_keys] == [hash_key("raysight-local-demo-key")]


# --- bad configs fail ---------------------------------------------------------------------------


def test_unknown_key_in_app_args_is_rejected() -> None:
    cfg = _load("deploy/serve-production.yaml")
    cfg["applications"][0]["args"]["models"][0]["gpus"] = 4
    (application,) = ServeDeploySchema.model_validate(cfg).applications  # Ray lets it through
    with pytest.raises(pydantic.ValidationError, match="gpus"):
        AppConfig.model_validate(application.args)


def test_bad_serve_schema_is_rejected() -> None:
    cfg = _load("deploy/serve-local.yaml")
    cfg["http_options"]["port"] = "eighty"
    with pytest.raises(pydantic.ValidationError):
        ServeDeploySchema.model_validate(cfg)
    cfg = _load("deploy/serve-local.yaml")
    del cfg["applications"][0]["import_path"]
    with pytest.raises(pydantic.ValidationError):
        ServeDeploySchema.model_validate(cfg)


def test_typo_in_autoscaling_config_is_caught() -> None:
    cfg = _load("deploy/serve-production.yaml")
    scaling = cfg["applications"][0]["args"]["models"][0]["autoscaling_config"]
    scaling["target_ongoing_request"] = scaling.pop("target_ongoing_requests")
    AutoscalingConfig.model_validate(scaling)  # Ray ignores the typo silently...
    assert _unknown_keys(cfg) == ["target_ongoing_request"]  # ...so this check exists


def test_both_replica_settings_is_rejected() -> None:
    cfg = copy.deepcopy(_load("deploy/serve-production.yaml")["applications"][0]["args"])
    cfg["models"][0]["num_replicas"] = 2
    with pytest.raises(pydantic.ValidationError, match="not both"):
        AppConfig.model_validate(cfg)
