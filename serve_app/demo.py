"""`raysight demo` (what `make demo` runs): the default model, a local server, the seed example.

Fetches SmolLM2-135M once (cached), starts raysight in-process with a fresh API key on 127.0.0.1,
serving that model twice: "smollm2-135m" (float32) and "smollm2-135m-bf16" (bfloat16, same
folder), so every script in examples/ runs against it (examples/cross_model.py uses both). Runs
examples/seed_session.py then examples/patch_answer.py — or the examples named on the command
line — against it in other processes, each after a line saying what it should print, then stops
the cluster.
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
BF16_MODEL = f"{DEFAULT_MODEL}-bf16"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE = EXAMPLES / "seed_session.py"
DEFAULT_EXAMPLES = ["seed_session", "patch_answer"]
# What each example prints on the demo's float32 SmolLM2-135M (checked by running `make demo`).
EXPECT = {
    "seed_session": "T1 ' Paris'. T2 is no city ('\\n'): the seed tutorial writes the LAST layer's state "
    "into layer 1, where it is out of place, to show the mechanics. T3 holds layer 0's output, shape (1, 8, 576).",
    "patch_answer": "' Rome' as is; ' Paris' once layer 23's last-token state comes from the Eiffel Tower "
    "prompt: a same-layer patch moves the answer.",
    "attribution_patching": "answers ' Paris' (clean) and ' Rome' (corrupted), metric ~2.86; the attribution "
    "of layer 15 is largest (negative) at 'iffel' and ' Tower'.",
    "generate_steering": "without steering ' gym and I was working out. ...'; with the beach-minus-city "
    "vector added at layer 6 on every step: ' beach and ...'; then the steered model's confidence per step.",
}


def example_names() -> list[str]:
    return sorted(p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith(("_", "seed_session_")))


def run_demo(port: int = 8000, examples: list[str] | None = None) -> int:
    """Serve the demo models, run `examples` (names in examples/, or "all"; default: the seed
    session and patch_answer) one after the other, stop. Returns the first non-zero exit status, else 0."""
    names = examples or DEFAULT_EXAMPLES
    if "all" in names:
        names = [EXAMPLE.stem] + [n for n in example_names() if n != EXAMPLE.stem]
    unknown = [n for n in names if not (EXAMPLES / f"{n}.py").is_file()]
    if unknown:
        known = ", ".join([*example_names(), "all"])
        print(f"no example named {', '.join(unknown)} (known: {known})", file=sys.stderr)
        return 2
    folder = model_store.fetch_model(DEFAULT_MODEL)
    key = secrets.token_urlsafe(24)
    config = AppConfig.model_validate(
        {
            "models": [
                {"name": DEFAULT_MODEL, "path": str(folder), "dtype": "float32"},
                {"name": BF16_MODEL, "path": str(folder), "dtype": "bfloat16"},
            ],
            "auth": {"api_keys": [{"user": "demo", "key_sha256": hash_key(key)}]},
        }
    )
    print(f"starting raysight with {DEFAULT_MODEL} and {BF16_MODEL} ...", flush=True)
    url = launcher.start(config, port=port if _port_free(port) else _any_port())
    try:
        env = {**os.environ, "RAYSIGHT_HOST": url, "RAYSIGHT_API_KEY": key}
        print(f"raysight is ready at {url}", flush=True)
        status = 0
        for name in names:
            print(f"--- examples/{name}.py", flush=True)
            if name in EXPECT:
                print(f"expect: {EXPECT[name]}", flush=True)
            script = str(EXAMPLES / f"{name}.py")
            rc = subprocess.run([sys.executable, script], env=env, check=False).returncode
            status = status or rc
        return status
    finally:
        launcher.stop()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _any_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
