"""Scaling figures: autoscaling up and down, and what crossing nodes costs a session.

    .venv/bin/python bench/scale.py [--rounds 3] [--cross-repeats 20] [--write]   # ~4-6 min

1. Autoscale (`autoscale_up_s`, `autoscale_down_s`): a local cluster (`serve_app.launcher`, one
   node) serves the tiny Llama with the autoscaling config of tests/test_autoscale.py (min 1,
   max 3, target 1 ongoing request per replica, upscale_delay_s 1, downscale_delay_s 4, metrics
   every 0.5 s over 2 s). Per round: 6 client threads each submit ~0.5 s requests back to back;
   up = load start -> `GET /v1/models` first shows 2 RUNNING replicas (Serve's decision after its
   delay, plus the new replica's start: a process importing torch and loading the model); then the
   clients stop; down = the last request's end -> 1 replica left (no other replica actor alive).
   Rounds run one after another on one cluster; median [min, max].
2. Cross-node (`cross_node_extra_ms`): tests/multinode_scenario.py (head + 2 worker nodes, fake GPUs)
   times the seed session with its two traces on models whose replicas are on different nodes (the
   last layer's state crosses between the nodes' object stores), on two models' replicas on one
   node (the same two segments and object-store hop, no node crossed), and on one replica (one
   segment), interleaved, `--cross-repeats` times each: median(cross) - median(one node); the
   difference to one replica is kept too (`vs_one_replica_ms`).

`--write` merges the figures into bench/results.json (docs/BENCHMARKS.md's "Scaling" section is
written by hand from them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

MODEL, KEY = "tiny-llama", "bench-scale-key"
AUTOSCALING = {
    "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
    "upscale_delay_s": 1, "downscale_delay_s": 4, "metrics_interval_s": 0.5, "look_back_period_s": 2,
}
CLIENTS = 6


def autoscale(rounds: int) -> dict:
    import ray
    from remote_helpers import P1, api, record, slow_traces

    from client_sdk import CONFIG, LanguageModel
    from fixtures.tiny_models import build_tiny_llama
    from serve_app import launcher
    from serve_app.config import AppConfig, hash_key

    with tempfile.TemporaryDirectory(prefix="raysight-bench-scale-") as tmp:
        path = build_tiny_llama(Path(tmp) / "tiny-llama", seed=0)
        config = AppConfig.model_validate({
            "models": [{"name": MODEL, "path": str(path), "max_ongoing_requests": 4, "autoscaling_config": AUTOSCALING}],
            "auth": {"api_keys": [{"user": "bench", "key_sha256": hash_key(KEY)}]},
            "limits": {"max_concurrent_per_user": 32, "request_timeout_s": 120},
            "state_dir": str(Path(tmp) / "state"),
        })
        from bench.cluster import free_port
        url = launcher.start(config, port=free_port(), num_cpus=2)
        try:
            CONFIG.set_host(url)
            CONFIG.set_default_api_key(KEY)
            model = LanguageModel(MODEL)

            def slow() -> None:
                slow_traces(model, 6, size=512)
                with model.trace(P1):
                    model.lm_head.output[0, -1].save()

            body = record(slow)
            prefix = f"SERVE_REPLICA::{launcher.APP_NAME}#model-{MODEL}#"

            def actors() -> int:
                return sum(a["name"].startswith(prefix) for a in ray.util.list_named_actors(all_namespaces=True))

            ups, downs, decisions = [], [], []
            with api(url, KEY) as a:
                for _ in range(rounds):
                    up, down, decided = _round(a, url, body, actors)
                    ups.append(up)
                    downs.append(down)
                    decisions.append(decided)
                    print(f"autoscale round: up {up:.2f} s (UPSCALING at {decided:.2f} s), down {down:.2f} s", flush=True)
        finally:
            launcher.stop()
    return {"up": ups, "down": downs, "decided": decisions}


def _round(a, url: str, body: bytes, actors) -> tuple[float, float]:
    from remote_helpers import api

    stop = threading.Event()
    ended: list[float] = []
    failures: list[str] = []

    def client() -> None:
        with api(url, KEY) as c:
            while not stop.is_set():
                kind, data = c.end(c.submit(body))
                ended.append(time.monotonic())
                if kind != "COMPLETED":
                    failures.append(f"{kind} {data}")

    decided: list[float] = []  # when Serve first said UPSCALING: its decision, before the replica starts

    def replicas() -> int:
        (m,) = a.http.get("/v1/models").json()
        if m["state"] == "UPSCALING" and not decided:
            decided.append(time.monotonic() - t0)
        return m["replicas"]

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    while replicas() < 2:
        _check(time.monotonic() - t0 < 180, "no second replica within 180 s")
        time.sleep(0.1)
    up = time.monotonic() - t0
    stop.set()
    for t in threads:
        t.join(timeout=120)
    idle = max(ended)
    while replicas() != 1 or actors() != 1:
        _check(time.monotonic() - idle < 180, "not back at 1 replica within 180 s")
        time.sleep(0.1)
    down = time.monotonic() - idle
    _check(not failures, f"requests failed: {failures[:3]}")
    return up, down, (decided or [up])[0]


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(what)


def cross_node(repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="raysight-bench-nodes-") as tmp:
        out = Path(tmp) / "report.json"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PYTHONPATH"] = str(ROOT)
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_scenario.py"), "--out", str(out),
                               "--repeats", str(repeats)], env=env, capture_output=True, text=True, check=False)
        report = json.loads(out.read_text()) if out.exists() else {}
        _check(proc.returncode == 0 and report.get("ok"), f"multinode scenario failed: {report} {proc.stderr[-2000:]}")
        return report


def _mmm(values: list[float], digits: int = 2) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cross-repeats", type=int, default=20)
    parser.add_argument("--write", action="store_true", help="merge into bench/results.json")
    parser.add_argument("--only", choices=("autoscale", "cross"), help="one of the two (--write keeps the other's keys)")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    scaled = autoscale(args.rounds) if args.only != "cross" else None
    nodes = cross_node(args.cross_repeats) if args.only != "autoscale" else None
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    setting = (f"tiny Llama, {CLIENTS} clients of ~0.5 s requests, autoscaling_config {json.dumps(AUTOSCALING)}, "
               "one node (bench/scale.py)")
    figures: dict = {"load_average": {"start": [round(x, 2) for x in load], "end": [round(x, 2) for x in os.getloadavg()]}}
    if scaled is not None:
        figures["autoscale_up_s"] = {**_mmm(scaled["up"]), "unit": "s", "model": "tiny Llama", "generated": when,
                                     "upscaling_seen_s": _mmm(scaled["decided"]),
                                     "what": "load start -> GET /v1/models shows 2 RUNNING replicas; " + setting}
        figures["autoscale_down_s"] = {**_mmm(scaled["down"]), "unit": "s", "model": "tiny Llama", "generated": when,
                                       "what": "last request ended -> 1 replica left (downscale_delay_s 4 included); "
                                               + setting}
    if nodes is not None:
        figures["cross_node_extra_ms"] = {
            "median": round(1000 * nodes["cross_minus_one_node_s"], 1), "unit": "ms", "model": "tiny Llama",
            "generated": when, "n": nodes["repeats"],
            "vs_one_replica_ms": round(1000 * nodes["cross_minus_one_replica_s"], 1),
            "session_ms": {k: round(1000 * v, 1) for k, v in nodes["seed_session_s"].items()},
            "session_min_ms": {k: round(1000 * v, 1) for k, v in nodes["seed_session_min_s"].items()},
            "what": "the seed session (2 traces, the last layer's state patched into another prompt) with its traces on "
                    "models on two worker nodes minus on two models on one node; medians, interleaved runs "
                    "(tests/multinode_scenario.py via bench/scale.py)",
        }
    print(json.dumps(figures, indent=2))
    if args.write:
        path = ROOT / "bench" / "results.json"
        results = json.loads(path.read_text())
        for key in ("autoscale_up_s", "autoscale_down_s", "cross_node_extra_ms"):
            if key in figures:
                results[key] = {**figures[key], "load_average": figures["load_average"]}
        results.setdefault("commands", {})["scale"] = "python bench/scale.py --write"
        path.write_text(json.dumps(results, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
