"""Shared pytest fixtures.

The environment is set at import, before anything imports huggingface_hub (it reads
HF_HUB_OFFLINE once, at import), which is why the model builders are imported inside fixtures.
"""

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # no hub on these machines: fail fast instead of retrying
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep Ray on 127.0.0.1 (see ENV.md)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with the seed-0 tiny Llama and its tokenizer, built once per test session."""
    from serve_app.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with the seed-0 tiny GPT-2 and its tokenizer, built once per test session."""
    from serve_app.tiny_models import build_tiny_gpt2

    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2", seed=0)
