"""`raysight demo` (what `make demo` runs): the default model, a local server, the seed example.

Fetches SmolLM2-135M once (cached), starts `raysight serve` in-process with a fresh API key on
127.0.0.1, runs examples/seed_session.py against it in another process, and stops the cluster.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

from serve_app import launcher, model_store
from serve_app.config import AppConfig, hash_key

DEFAULT_MODEL = "smollm2-135m"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "seed_session.py"


def run_demo(port: int = 8000) -> int:
    folder = model_store.fetch_model(DEFAULT_MODEL)
    key = secrets.token_urlsafe(24)
    config = AppConfig.model_validate(
        {
            "models": [{"name": DEFAULT_MODEL, "path": str(folder)}],
            "auth": {"api_keys": [{"user": "demo", "key_sha256": hash_key(key)}]},
        }
    )
    print(f"starting raysight with {DEFAULT_MODEL} ...", flush=True)
    url = launcher.start(config, port=port if _port_free(port) else _any_port())
    try:
        print(f"raysight is ready at {url}; running {EXAMPLE.name}", flush=True)
        env = {**os.environ, "RAYSIGHT_HOST": url, "RAYSIGHT_API_KEY": key}
        return subprocess.run([sys.executable, str(EXAMPLE), DEFAULT_MODEL], env=env, check=False).returncode
    finally:
        launcher.stop()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _any_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
