"""Remote generation on SmolLM2-135M: end-to-end time of 16 new tokens, remote / local.

    .venv/bin/python bench/generate_remote.py [--rounds 8] [--write]

Starts raysight on 127.0.0.1 (launcher, one SmolLM2-135M float32 replica), then alternates, round by
round, the same greedy 16-token generation with one read and one edit per step (the shape of
bench/generate_overhead.py) run remotely (`remote=True`: record, HTTP, queue, replica, result) and
locally on the same folder (one torch thread, as the replica runs). Both must give the same tokens.
`generate_remote_vs_local_ratio_smollm2` = median remote wall time / median local wall time; min
and max are over rounds. `--write` merges it into bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The Eiffel Tower is in the city of"
N = 16


def generate(model, remote: bool):
    reads = []
    with model.generate(PROMPT, max_new_tokens=N, remote=remote) as tracer:
        for _step in tracer.all():
            reads.append(model.model.layers[10].output[:, -1].save())
            model.model.layers[12].output[:, -1] += 0.5
        ids = tracer.result.save()
    return ids


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    sys.path.insert(0, str(ROOT))
    import torch

    from client_sdk import CONFIG, LanguageModel
    from serve_app import launcher, model_store
    from serve_app.config import AppConfig, hash_key

    folder = model_store.fetch_model("smollm2-135m")
    key = secrets.token_urlsafe(16)
    config = AppConfig.model_validate({
        "models": [{"name": "smollm2-135m", "path": str(folder), "dtype": "float32"}],
        "auth": {"api_keys": [{"user": "bench", "key_sha256": hash_key(key)}]},
    })
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = launcher.start(config, port=port, num_cpus=2)
    try:
        CONFIG.set_host(url)
        CONFIG.set_default_api_key(key)
        CONFIG.show_status = False
        remote, local = LanguageModel("smollm2-135m"), LanguageModel(str(folder), dtype=torch.float32)
        torch.set_num_threads(1)
        assert torch.equal(generate(remote, True), generate(local, False)), "remote and local tokens differ"
        times: dict[str, list[float]] = {"remote": [], "local": []}
        for _ in range(args.rounds):
            for name, (model, is_remote) in (("remote", (remote, True)), ("local", (local, False))):
                t0 = time.perf_counter()
                generate(model, is_remote)
                times[name].append(time.perf_counter() - t0)
    finally:
        launcher.stop()
    ratios = [r / lo for r, lo in zip(times["remote"], times["local"], strict=True)]
    figure = {
        "median": statistics.median(times["remote"]) / statistics.median(times["local"]),
        "min": min(ratios), "max": max(ratios), "n": args.rounds, "unit": "x", "model": "SmolLM2-135M",
        "what": "16 new tokens (greedy, one read + one edit per step), end to end: remote through raysight "
                "on 127.0.0.1 / local (bench/generate_remote.py)",
        "remote_ms": statistics.median(times["remote"]) * 1e3, "local_ms": statistics.median(times["local"]) * 1e3,
    }
    print(f"remote {figure['remote_ms']:.0f} ms, local {figure['local_ms']:.0f} ms: "
          f"generate_remote_vs_local_ratio_smollm2 {figure['median']:.3f} [{figure['min']:.3f}, {figure['max']:.3f}]")
    if args.write:
        path = ROOT / "bench" / "results.json"
        results = json.loads(path.read_text())
        results["generate_remote_vs_local_ratio_smollm2"] = figure
        path.write_text(json.dumps(results, indent=2) + "\n")
    return figure


if __name__ == "__main__":
    main(sys.argv[1:])
