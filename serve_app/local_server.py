"""`raysight serve`: a local Ray + Serve running raysight on 127.0.0.1 until Ctrl-C or SIGTERM.

The config comes from a file (a Serve config whose raysight app's `args` are used, or a bare
app config) and/or flags; flags win. Without any API key configured, one is generated and printed
once, so the server is never open.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
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
    config_path: str | None, models: list[str], api_key: str | None
) -> tuple[AppConfig, str | None]:
    """Merge file and flags. Returns the config and a generated key (None if keys were given)."""
    args = load_config(config_path) if config_path else {}
    if models:
        args["models"] = [_parse_model(m) for m in models]
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


def serve_forever(config: AppConfig, port: int, announce) -> None:
    """Start, call `announce(url)` once ready, block until SIGINT/SIGTERM, then stop everything."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = launcher.start(config, port=port)
        announce(url)
        stop.wait()
    finally:
        launcher.stop()
