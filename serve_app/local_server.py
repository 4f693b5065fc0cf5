"""`raysight serve`: a local Ray + Serve running raysight on 127.0.0.1 until Ctrl-C or SIGTERM.

The config comes from a file (a Serve config whose raysight app's `args` are used, or a bare
app config) and/or flags; flags win. Without any API key configured, one is generated and printed
once, so the server is never open.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from serve_app import launcher
from serve_app.config import AppConfig, hash_key

IMPORT_PATH = "serve_app.app:build_app"


def load_config(path: str | Path) -> dict[str, Any]:
    """The app args from a Serve config (the app with our import_path) or a bare app config."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if "applications" not in data:
        return data
    for app in data["applications"]:
        if app.get("import_path") == IMPORT_PATH:
            return app.get("args") or {}
    raise ValueError(f"{path} has no application with import_path {IMPORT_PATH}")


def build_config(
    config_path: str | None, models: list[str], api_key: str | None, state_dir: str | None = None
) -> tuple[AppConfig, str | None]:
    """Merge file and flags. Returns the config and a generated key (None if keys were given)."""
    args = load_config(config_path) if config_path else {}
    if models:
        args["models"] = [_parse_model(m) for m in models]
    if state_dir:
        args["state_dir"] = state_dir
    auth = args.setdefault("auth", {}).setdefault("api_keys", [])
    generated = None
    key = api_key or os.environ.get("RAYSIGHT_API_KEY")
    if key:
        auth.append({"user": "default", "key_sha256": hash_key(key)})
    elif not auth:
        generated = secrets.token_urlsafe(24)
        auth.append({"user": "default", "key_sha256": hash_key(generated)})
    return AppConfig.model_validate(args), generated


def _parse_model(spec: str) -> dict[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--model takes NAME=PATH, got {spec!r}")
    return {"name": name, "path": str(Path(path).expanduser())}


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived: stop everything and exit 0. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` in the code it interrupts swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def serve_forever(
    config: AppConfig, port: int, announce: Callable[[str], None], progress: Callable[[str], None] | None = None
) -> int:
    """Start, call `announce(url)` once ready, block until SIGINT/SIGTERM, then stop everything.

    Returns the signal that stopped it (if start fails, its error propagates). The
    handlers are installed again once Ray is up, because ray.init replaces the SIGTERM handler
    (and Ray's core worker adds one that dumps the stack and aborts: status 134)."""
    _on_signals(_raise_stopped)
    ready = False
    # A Ray this process already runs (a test session's cluster) is not this call's to stop.
    ours = not ("ray" in sys.modules and sys.modules["ray"].is_initialized())
    try:
        url = launcher.start(config, port=port, timeout_s=None, progress=progress,
                             after_ray_init=lambda: _on_signals(_raise_stopped))
        ready = True
        announce(url)
        while True:
            signal.pause()  # a handler raises Stopped
    except Stopped as stopped:
        return stopped.signum
    finally:
        if ours:
            launcher.stop(drain=ready)  # before the ready line nobody was told the URL: nothing to drain


def _raise_stopped(signum: int, _frame: object) -> None:
    _on_signals(signal.SIG_DFL)  # stopping now; a second Ctrl-C/SIGTERM ends the process at once
    raise Stopped(signum)


def _on_signals(handler: Any) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
