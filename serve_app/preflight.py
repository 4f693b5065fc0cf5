"""Checks that run before Ray starts: a bad model path or a busy port is one clear line, at once,
instead of a long Ray traceback after the cluster came up.

Only for launches on this machine (`raysight serve`, `raysight demo`, the tests): with `serve
deploy` on a cluster the folders live on the workers, not where the config is written.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

from serve_app.config import ModelConfig, is_hub_id

WEIGHT_SUFFIXES = (".safetensors", ".bin")  # what transformers' from_pretrained loads


class PreflightError(ValueError):
    """The launch cannot work; the message says what to fix (one line per problem)."""


def check_models(models: list[ModelConfig]) -> None:
    """Raise PreflightError naming every model whose `path` cannot be loaded."""
    problems = [p for m in models if (p := model_problem(m))]
    if problems:
        raise PreflightError("\n".join(problems))


def model_problem(model: ModelConfig) -> str | None:
    """What is wrong with `model.path`, as one line naming the model and the path; None if fine."""
    where = f"model '{model.name}': "
    if is_hub_id(model.path):
        problem = _hub_problem(model.path)
        return where + problem if problem else None
    folder = Path(model.resolved_path())
    if not folder.exists():
        shown = model.path if str(folder) == model.path else f"{model.path} ({folder})"
        return where + f"path {shown} does not exist" + _bare_name_hint(model.path)
    if not folder.is_dir():
        return where + f"path {folder} is a file; give the Hugging Face model folder that holds it"
    if not os.access(folder, os.R_OK | os.X_OK):
        return where + f"cannot read folder {folder} (permission denied)"
    names = {p.name for p in folder.iterdir()}
    if "config.json" not in names:
        return where + f"folder {folder} has no config.json: not a Hugging Face model folder"
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return where + f"cannot read {folder / 'config.json'}: {_reason(e)}"
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        return where + f"folder {folder} has no weights (*.safetensors or *.bin files)"
    return None


def check_port(port: int, host: str = "127.0.0.1") -> None:
    """Raise PreflightError if `host:port` cannot be bound (Serve's HTTP proxy binds it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is fine
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PreflightError(f"port {port} on {host} is already in use; choose another with --port") from None
            raise PreflightError(f"cannot listen on {host}:{port}: {_reason(e)}") from None


def _hub_problem(repo_id: str) -> str | None:
    """A Hub id can only be checked offline: then it must be in the local Hub cache."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return None  # the replica downloads it; a wrong id fails there (see docs/operator.md)
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return None
    return (f"'{repo_id}' is a Hugging Face Hub id, but HF_HUB_OFFLINE is set and it is not in "
            "the local Hub cache; give a local folder instead")


def _bare_name_hint(path: str) -> str:
    from serve_app import model_store

    if path in model_store.KNOWN_MODELS:
        return f" (to use the known model {path}, run `raysight models fetch {path}` and give the folder it prints)"
    if "/" not in path:
        return " (a Hugging Face Hub id has the form org/name)"
    return ""


def _reason(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)
