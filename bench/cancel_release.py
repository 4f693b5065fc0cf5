"""`cancel_release_ms` on its own: a local cluster with the tiny Llama, the cancel experiment of
bench/experiments.py, the figure merged into bench/results.json (`make bench` measures it too).

    .venv/bin/python bench/cancel_release.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

WHAT = ("DELETE of a running compute-heavy request (thousands of tensor ops, one module) → the next "
        "request on that replica reaches RUNNING, at the client")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results.json")
    args = parser.parse_args(argv)

    from bench import experiments as ex
    from client_sdk import CONFIG, LanguageModel, tracing
    from fixtures.tiny_models import build_tiny_llama
    from intervention.wire import encode_session
    from serve_app import launcher
    from serve_app.config import AppConfig, hash_key

    key = "bench-key-0123"
    with tempfile.TemporaryDirectory(prefix="raysight-cancel-") as tmp:
        path = build_tiny_llama(Path(tmp) / "tiny-llama", seed=0)
        config = AppConfig.model_validate({
            "models": [{"name": "tiny-llama", "path": str(path)}],
            "auth": {"api_keys": [{"user": "bench", "key_sha256": hash_key(key)}]},
            "limits": {"max_concurrent_per_user": 8, "request_timeout_s": 600},
        })
        from bench.cluster import free_port
        url = launcher.start(config, port=free_port(), num_cpus=2)
        try:
            CONFIG.set_host(url)
            CONFIG.set_default_api_key(key)
            model = LanguageModel("tiny-llama")

            def body(fn) -> bytes:
                with tracing.recording(remote=True) as graph:
                    fn()
                return encode_session(graph.session_ir(), graph.tensors)

            heavy = body(lambda: ex.heavy_trace(model))
            small = body(lambda: _small(model))
            out = ex.cancel_release(url, key, heavy, small, args.rounds)
        finally:
            launcher.stop()
    median = out["release_ms"]["median"]
    result = {**out["release_ms"], "unit": "ms", "model": "tiny Llama", "what": WHAT, "bar": "<= 500",
              "goal": "≤ 50", "meets_bar": None if median is None else median <= 500,
              "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "command": ".venv/bin/python bench/cancel_release.py"}
    print(json.dumps(result, indent=1), "heavy requests ended:", out["heavy_ends"])
    if args.json.exists():
        results = json.loads(args.json.read_text())
        results["cancel_release_ms"] = result
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return result


def _small(model) -> None:
    from bench.experiments import P1

    with model.trace(P1):
        model.lm_head.output[0, -1].argmax().save()


if __name__ == "__main__":
    main()
