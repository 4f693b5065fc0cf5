"""Shared pytest fixtures.

The environment is set at import, before anything imports huggingface_hub (it reads
HF_HUB_OFFLINE once, at import), which is why the model builders are imported inside fixtures.
"""

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # no hub on these machines: fail fast instead of retrying
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep Ray on 127.0.0.1 (see ENV.md)
# A cluster of our own even when another one runs on this machine (`ray start`, a `raysight
# serve`): without this ray.init() joins the latest cluster it finds in /tmp/ray.
os.environ.setdefault("RAY_ADDRESS", "local")


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with the seed-0 tiny Llama and its tokenizer, built once per test session."""
    from fixtures.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with the seed-0 tiny GPT-2 and its tokenizer, built once per test session."""
    from fixtures.tiny_models import build_tiny_gpt2

    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2", seed=0)


@dataclass
class Cluster:
    """A real local Ray + Serve running raysight with the tiny models (one per test session)."""

    url: str
    keys: dict[str, str]  # user -> plain API key
    llama_path: Path
    gpt2_path: Path


@pytest.fixture(scope="session")
def cluster(tiny_llama_path: Path, tiny_gpt2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from serve_app import launcher
    from serve_app.config import AppConfig, hash_key

    keys = {"alice": "alice-key-0123", "bob": "bob-key-4567"}
    config = AppConfig.model_validate(
        {
            "models": [
                {"name": "llama", "path": str(tiny_llama_path)},
                {"name": "gpt2", "path": str(tiny_gpt2_path)},
            ],
            "auth": {"api_keys": [{"user": u, "key_sha256": hash_key(k)} for u, k in keys.items()]},
            "limits": {"max_concurrent_per_user": 3, "request_timeout_s": 120, "max_request_bytes": 8 * 2**20,
                       "max_trace_bytes": 256 * 2**20, "max_saved_bytes": 48 * 2**20},
            "state_dir": str(tmp_path_factory.mktemp("state")),  # not ~/.raysight: runs must not share state
        }
    )
    url = launcher.start(config, port=_free_port(), num_cpus=2)
    try:
        yield Cluster(url, keys, tiny_llama_path, tiny_gpt2_path)
    finally:
        launcher.stop()


@pytest.fixture
def remote_client(cluster: Cluster) -> Iterator[Cluster]:
    """client_sdk configured for `cluster` as alice, restored afterwards."""
    from client_sdk import CONFIG

    saved = (CONFIG.host, CONFIG.api_key)
    CONFIG.set_host(cluster.url)
    CONFIG.set_default_api_key(cluster.keys["alice"])
    try:
        yield cluster
    finally:
        CONFIG.host, CONFIG.api_key = saved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- what the remote test files share: the served tiny Llama, two users, a quick request ---------


@pytest.fixture(scope="module")
def llama(cluster):
    """The test cluster's tiny Llama, as a served model (files testing local runs define their own)."""
    from client_sdk import LanguageModel

    return LanguageModel("llama")


@pytest.fixture
def alice(cluster):
    from remote_helpers import api

    with api(cluster.url, cluster.keys["alice"]) as a:
        yield a


@pytest.fixture
def bob(cluster):
    from remote_helpers import api

    with api(cluster.url, cluster.keys["bob"]) as a:
        yield a


@pytest.fixture
def small_body(llama) -> bytes:
    """The body of a one-trace request that finishes at once."""
    from remote_helpers import P1, record

    def body():
        with llama.trace(P1):
            llama.lm_head.output[0, -1].argmax().save()

    return record(body)
