"""The 70B placement, on paper: the production config's Llama 3.1 70B (bf16) across one replica's
4 GPUs, as the replica's own loader (actors/model_loader.py) computes it, with the model's real
dimensions on the meta device (no weights, no GPUs); and the deployment options that make the
replica ask Ray for those 4 GPUs. Also the per-model `resources` field that pins models to nodes.
"""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml
from transformers import LlamaConfig

from actors.model_loader import device_map_for
from serve_app.app import model_options
from serve_app.config import AppConfig

REPO = Path(__file__).resolve().parents[1]
GB = 10**9
# meta-llama/Llama-3.1-70B's config.json (the dimensions that decide the placement).
LLAMA_31_70B = {
    "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": 128001,
}


def _production() -> AppConfig:
    (app,) = yaml.safe_load((REPO / "deploy/serve-production.yaml").read_text())["applications"]
    return AppConfig.model_validate(app["args"])


def _the_70b(config: AppConfig):
    (model,) = [m for m in config.models if "70b" in m.name]
    return model


def test_the_70b_replica_asks_ray_for_4_gpus() -> None:
    config = _production()
    options = model_options(_the_70b(config), config)
    assert options["ray_actor_options"]["num_gpus"] == 4
    assert options["name"] == "model-llama-3.1-70b"
    # A replica stopped by scale-down drains for as long as a request may run.
    assert options["graceful_shutdown_timeout_s"] == config.limits.request_timeout_s


def test_the_70b_in_bf16_fits_its_4_gpus_with_every_layer_on_a_gpu() -> None:
    model = _the_70b(_production())
    assert model.dtype == "bfloat16"
    gpus = int(model.gpus_per_replica)
    # 4 x 80 GB GPUs, and the CPU's RAM offered too: the loader must not need it.
    max_memory: dict[int | str, int] = {i: 80 * GB for i in range(gpus)} | {"cpu": 512 * GB}
    device_map = device_map_for(LlamaConfig(**LLAMA_31_70B), model.dtype, max_memory)

    devices = set(device_map.values())
    assert devices == set(range(gpus)), device_map  # all 4 GPUs used, nothing on "cpu" or "disk"
    layers = {f"model.layers.{i}" for i in range(LLAMA_31_70B["num_hidden_layers"])}
    placed = {k: v for k, v in device_map.items() if k.startswith("model.layers.")}
    assert set(placed) == layers  # every decoder layer whole on one GPU (none split across two)
    for block in ("model.embed_tokens", "model.norm", "lm_head"):
        assert device_map[block] in range(gpus)
    # Balanced: each GPU holds about a quarter of the 80 layers (bf16: ~1.7 GB each, ~141 GB in all).
    per_gpu = [sum(1 for v in placed.values() if v == g) for g in range(gpus)]
    assert all(15 <= n <= 25 for n in per_gpu), per_gpu
    # Layers in order: GPU g holds a contiguous run, so activations cross each boundary once.
    order = [placed[f"model.layers.{i}"] for i in range(LLAMA_31_70B["num_hidden_layers"])]
    assert order == sorted(order)


def test_too_little_gpu_memory_spills_and_the_check_would_see_it() -> None:
    """The same computation with 4 x 24 GB GPUs cannot hold 141 GB: layers go to the CPU. (What the
    test above rules out does happen when memory is short, so its assertion can fail.)"""
    max_memory: dict[int | str, int] = {i: 24 * GB for i in range(4)} | {"cpu": 512 * GB}
    device_map = device_map_for(LlamaConfig(**LLAMA_31_70B), "bfloat16", max_memory)
    assert "cpu" in set(device_map.values())


def test_one_gpu_takes_the_whole_model() -> None:
    assert device_map_for(LlamaConfig(**LLAMA_31_70B), "bfloat16", {0: 80 * GB, "cpu": GB}) == {"": 0}


# -- custom resources per model --------------------------------------------------------------------


def _config(**model) -> AppConfig:
    return AppConfig.model_validate({"models": [{"name": "m", "path": "/x", **model}]})


def test_custom_resources_reach_the_replica_options() -> None:
    config = _config(resources={"w1": 1, "a100": 0.5}, gpus_per_replica=2)
    options = model_options(config.models[0], config)
    assert options["ray_actor_options"] == {"num_cpus": 0, "num_gpus": 2, "resources": {"w1": 1, "a100": 0.5}}


def test_no_custom_resources_no_resources_option() -> None:
    config = _config()
    assert "resources" not in model_options(config.models[0], config)["ray_actor_options"]


@pytest.mark.parametrize(
    ("resources", "says"),
    [
        ({"GPU": 1}, "use gpus_per_replica"),
        ({"CPU": 2}, "use cpus_per_replica"),
        ({"w1": 0}, "positive, finite amount"),
        ({"w1": -1}, "positive, finite amount"),
        ({"w1": float("inf")}, "positive, finite amount"),
        ({"w1": 1.5}, "whole number"),
        ({"bad name!": 1}, "not a resource name"),
    ],
)
def test_bad_custom_resources_are_refused_by_name(resources: dict, says: str) -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        _config(resources=resources)
    assert says in str(err.value)
    assert "resources" in str(err.value)


def test_graceful_shutdown_timeout_from_the_config() -> None:
    config = _config(graceful_shutdown_timeout_s=42)
    assert model_options(config.models[0], config)["graceful_shutdown_timeout_s"] == 42
    with pytest.raises(pydantic.ValidationError):
        _config(graceful_shutdown_timeout_s=0)
