"""The model-path rule (folder or Hub id) and the checks `raysight serve` runs before Ray starts,
in-process; test_serve_cli.py runs them through the real command."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from serve_app import preflight
from serve_app.config import ModelConfig, is_hub_id


@pytest.mark.parametrize(
    ("path", "hub"),
    [
        ("HuggingFaceTB/SmolLM2-135M", True),
        ("openai-community/gpt2", True),
        ("gpt2", False),  # a bare name is a (relative) folder: the Hub's form is org/name
        ("models/tiny/llama", False),  # two slashes: a relative folder
        ("./org/name", False),
        ("~/org/name", False),
        ("/org/name", False),
        ("org--x/name", False),  # the Hub forbids `--` and `..`
        ("org/na..me", False),
    ],
)
def test_hub_id_rule(path: str, hub: bool) -> None:
    assert is_hub_id(path) is hub


def test_an_existing_folder_is_never_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert is_hub_id("org/name") is False
    assert ModelConfig(name="m", path="org/name").resolved_path() == str(tmp_path / "org" / "name")


def test_resolved_path_is_absolute_for_folders_and_verbatim_for_hub_ids(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert ModelConfig(name="m", path="tiny").resolved_path() == str(tmp_path / "tiny")
    assert ModelConfig(name="m", path="~/x").resolved_path() == str(Path.home() / "x")
    assert ModelConfig(name="m", path="org/name").resolved_path() == "org/name"


def test_a_good_folder_passes(tiny_llama_path: Path) -> None:
    preflight.check_models([ModelConfig(name="m", path=str(tiny_llama_path))])


def test_every_bad_model_is_named(tmp_path: Path, tiny_llama_path: Path) -> None:
    models = [ModelConfig(name=n, path=str(tmp_path / n)) for n in ("a", "b")]
    with pytest.raises(preflight.PreflightError) as err:
        preflight.check_models([*models, ModelConfig(name="ok", path=str(tiny_llama_path))])
    assert str(err.value).splitlines() == [f"model '{n}': path {tmp_path / n} does not exist" for n in ("a", "b")]


def test_a_free_port_passes_and_a_busy_one_is_named() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(preflight.PreflightError, match=f"^port {port} on 127.0.0.1 is already in use"):
            preflight.check_port(port)  # bound, even without listen()
    preflight.check_port(port)
