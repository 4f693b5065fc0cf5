"""Gradient memory: peak memory of a gradient trace / of the same forward trace, on SmolLM2-135M.

    .venv/bin/python bench/gradient_memory.py [--reps 3] [--rounds 3] [--write]  # in Serve replicas
    .venv/bin/python bench/gradient_memory.py --in-process [--pairs 3] [--write]  # local processes

Default (the headline figure, `gradient_peak_memory_ratio`): `raysight serve --config FILE` serves
SmolLM2-135M (float32) under two names, so two model replicas with the same weights; the forward
trace is sent `--reps` times to one and the gradient trace `--reps` times to the other (client_sdk,
remote=True), then each replica process's peak resident memory (VmHWM in /proc/<pid>/status, weights
included) is read. Ratio = peak(gradient replica) / peak(forward replica), median over `--rounds`
fresh clusters.

`--in-process` (secondary key `gradient_peak_memory_ratio_in_process`): each variant runs in a
fresh local process that loads the model the way a replica does (float32, weights frozen) and runs
its trace `--reps` times with the shared engine; the figure is that process's peak resident memory
(ru_maxrss). The traces, in both modes:

- forward:  read layer 15's output, save the last position's logits.
- gradient: the same, then `with logit.backward(): h.grad.save()` (the gradient of the top logit
            w.r.t. layer 15's output).

In-process, the ratio is the median over `--pairs` fresh process pairs. Either way it stays near 1
because no weight gradients are computed or kept (0.5 GB of them for this model). `--write` merges
the figure into bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The Eiffel Tower is in the city of"


def run_trace(model, variant: str, remote: bool) -> None:
    """One forward or gradient trace (the same in a replica and in process)."""
    with model.trace(PROMPT, remote=remote):
        h = model.model.layers[15].output
        logits = model.lm_head.output[0, -1]
        top = logits.save()
        if variant == "gradient":
            with logits.max().backward():
                g = h.grad.save()
    assert top.shape[-1] > 0 and (variant == "forward" or g.shape[-1] == 576)


def child(variant: str, reps: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import torch

    from client_sdk import LanguageModel
    from serve_app.model_store import fetch_model

    torch.set_num_threads(1)
    model = LanguageModel(str(fetch_model("smollm2-135m")), dtype=torch.float32)
    model.local_module  # noqa: B018 - load now
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(reps):
        run_trace(model, variant, remote=False)
        assert all(p.grad is None for p in model.local_module.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"loaded_kb": loaded, "peak_kb": peak}))


def run(variant: str, reps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--reps", str(reps)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


FORWARD_NAME, GRADIENT_NAME = "smollm2-forward", "smollm2-gradient"  # two replicas, same weights


def replicas(reps: int) -> dict:
    """Serve SmolLM2 under two names; forward traces to one, gradient traces to the other; read
    each replica process's peak RSS (VmHWM) after the traces."""
    import secrets
    import socket
    import tempfile

    import yaml

    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # 127.0.0.1 (ENV.md)
    from bench.cluster import Server
    from client_sdk import CONFIG, LanguageModel
    from serve_app.config import AppConfig, hash_key
    from serve_app.model_store import fetch_model

    smol = fetch_model("smollm2-135m")
    key = secrets.token_urlsafe(24)
    cfg = {
        "models": [{"name": n, "path": str(smol), "dtype": "float32"} for n in (FORWARD_NAME, GRADIENT_NAME)],
        "auth": {"api_keys": [{"user": "bench", "key_sha256": hash_key(key)}]},
    }
    AppConfig.model_validate(cfg)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="raysight-gradmem-") as tmp_name:
        tmp = Path(tmp_name)
        config = tmp / "serve.yaml"
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        server = Server(config, port, tmp / "serve.log", dict(os.environ))
        print(f"[gradient_memory] starting `raysight serve --config {config.name} --port {port}`", flush=True)
        try:
            url = server.start()
            CONFIG.set_host(url)
            CONFIG.set_default_api_key(key)
            CONFIG.show_status = False
            before = server.replica_memory()
            for name, variant in ((FORWARD_NAME, "forward"), (GRADIENT_NAME, "gradient")):
                model = LanguageModel(name)
                for _ in range(reps):
                    run_trace(model, variant, remote=True)
            after = server.replica_memory()
        except BaseException:
            print(server.log_path.read_text()[-3000:] if server.log_path.exists() else "", file=sys.stderr)
            raise
        finally:
            server.stop()
    missing = {FORWARD_NAME, GRADIENT_NAME} - set(after)
    if missing:
        raise RuntimeError(f"no replica process found for {sorted(missing)} (found {sorted(after)})")
    return {"load_start": load_start, "load_end": [round(x, 2) for x in os.getloadavg()],
            **{v: {"peak_mb": after[n]["peak_rss_mb"], "rss_mb": after[n]["rss_mb"],
                   "peak_mb_at_ready": before.get(n, {}).get("peak_rss_mb")}
               for n, v in ((FORWARD_NAME, "forward"), (GRADIENT_NAME, "gradient"))}}


def replica_figure(reps: int, rounds: int) -> dict:
    """`rounds` fresh clusters (two replicas each); the ratio's median over them."""
    runs = [replicas(reps) for _ in range(rounds)]
    ratios = [r["gradient"]["peak_mb"] / r["forward"]["peak_mb"] for r in runs]
    med = statistics.median(ratios)

    def median_of(variant: str, field: str) -> float:
        return statistics.median(r[variant][field] for r in runs)

    return {
        "median": med, "min": min(ratios), "max": max(ratios), "n": len(ratios), "unit": "x", "model": "SmolLM2-135M",
        "what": f"peak RSS (VmHWM) of the Serve replica that ran a gradient trace {reps}x / of the replica that ran "
                f"the same forward trace {reps}x; SmolLM2 served float32 under two names by `raysight serve "
                "--config`, one fresh cluster per round (bench/gradient_memory.py)",
        "bar": "<= 1.5", "meets_bar": med <= 1.5, "reps": reps,
        "peak_mb": {v: median_of(v, "peak_mb") for v in ("forward", "gradient")},
        "peak_mb_at_ready": {v: median_of(v, "peak_mb_at_ready") for v in ("forward", "gradient")},
        "above_ready_mb": {v: statistics.median(r[v]["peak_mb"] - r[v]["peak_mb_at_ready"] for r in runs)
                           for v in ("forward", "gradient")},
        "load_average": {"start": runs[0]["load_start"], "end": runs[-1]["load_end"]},
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def in_process(reps: int, pairs: int) -> dict:
    runs = [(run("forward", reps), run("gradient", reps)) for _ in range(pairs)]
    ratios = [g["peak_kb"] / f["peak_kb"] for f, g in runs]
    above = [(g["peak_kb"] - g["loaded_kb"]) / 1024 for _, g in runs], [(f["peak_kb"] - f["loaded_kb"]) / 1024 for f, _ in runs]
    return {
        "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios),
        "unit": "x", "model": "SmolLM2-135M",
        "what": "peak memory of a local process running a gradient trace / the same forward trace, weights frozen "
                "(bench/gradient_memory.py --in-process)",
        "bar": "<= 1.5", "meets_bar": statistics.median(ratios) <= 1.5,
        "peak_mb": {"forward": statistics.median(f["peak_kb"] for f, _ in runs) / 1024,
                    "gradient": statistics.median(g["peak_kb"] for _, g in runs) / 1024},
        "above_loaded_mb": {"gradient": statistics.median(above[0]), "forward": statistics.median(above[1])},
    }


def main(argv: list[str]) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="replicas: fresh clusters")
    parser.add_argument("--pairs", type=int, default=3, help="--in-process: fresh process pairs")
    parser.add_argument("--in-process", action="store_true", help="local processes instead of Serve replicas")
    parser.add_argument("--child", choices=["forward", "gradient"])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.reps)
        return None
    if args.in_process:
        key, figure = "gradient_peak_memory_ratio_in_process", in_process(args.reps, args.pairs)
        print(f"{key}: {figure['median']:.3f} [{figure['min']:.3f}, {figure['max']:.3f}]; "
              f"peak MB forward {figure['peak_mb']['forward']:.0f}, gradient {figure['peak_mb']['gradient']:.0f}; "
              f"above the loaded model: forward {figure['above_loaded_mb']['forward']:.0f} MB, "
              f"gradient {figure['above_loaded_mb']['gradient']:.0f} MB")
    else:
        key, figure = "gradient_peak_memory_ratio", replica_figure(args.reps, args.rounds)
        print(f"{key}: {figure['median']:.3f} [{figure['min']:.3f}, {figure['max']:.3f}] over {figure['n']} clusters; "
              f"replica peak RSS MB forward {figure['peak_mb']['forward']}, gradient {figure['peak_mb']['gradient']} "
              f"(at ready {figure['peak_mb_at_ready']}; above ready {figure['above_ready_mb']}); "
              f"load average {figure['load_average']}")
    if args.write:
        path = ROOT / "bench" / "results.json"
        results = json.loads(path.read_text())
        results[key] = figure
        path.write_text(json.dumps(results, indent=2) + "\n")
    return figure


if __name__ == "__main__":
    main(sys.argv[1:])
