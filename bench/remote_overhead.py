"""The request path's cost alone (issue 9, item 5): CPU per process, fixed overhead, bytes to client.

    .venv/bin/python bench/remote_overhead.py [--sessions 60] [--rounds 20] [--chain-rounds 3]
        [--smol] [--json OUT] [--py-spy-s 0]

The part of `make bench` (bench/run_all.py) that measures one request's path, without the load,
download and engine benchmarks: `raysight serve` serving the tiny Llama under two names (and,
with --smol, SmolLM2-135M for the bytes figure on its model), then

- `remote_cpu_overhead_ms`: CPU of `--sessions` remote seed sessions over every cluster process
  and the client, from /proc ticks (bench.experiments.cpu_cost), minus the same sessions local;
  per process, so the table in docs/BENCHMARKS.md can say where it goes;
- `remote_fixed_overhead_ms`: the seed session remote minus local, paired round by round;
- `bytes_to_client_ratio`: bytes the client receives for the 16-trace chained session / bytes of
  its 15 intermediates (SmolLM2 with --smol, else the tiny Llama: `bytes_to_client_ratio_tiny`).

With --py-spy-s N, py-spy samples the ingress, runner, store, replica and proxy processes for N s
while seed sessions run, and writes one flat profile per process next to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from bench.cluster import free_port
from bench.run_all import SMOL, TINY, TINY_B, USER, _freeze_gc


def write_config(path: Path, key: str, tiny: Path, smol: Path | None) -> Path:
    import yaml

    from serve_app.config import AppConfig, hash_key

    models = [{"name": TINY, "path": str(tiny), "dtype": "float32"},
              {"name": TINY_B, "path": str(tiny), "dtype": "float32"}]
    if smol is not None:
        models.insert(0, {"name": SMOL, "path": str(smol), "dtype": "float32"})
    cfg = {"models": models, "auth": {"api_keys": [{"user": USER, "key_sha256": hash_key(key)}]},
           "limits": {"max_concurrent_per_user": 64, "request_timeout_s": 300},
           "state_dir": str(path.parent / "state")}
    AppConfig.model_validate(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=60, help="seed sessions for the CPU figure")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the fixed-overhead pairs")
    parser.add_argument("--chain-rounds", type=int, default=3)
    parser.add_argument("--smol", action="store_true", help="serve SmolLM2-135M too (bytes figure on its model)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--py-spy-s", type=float, default=0.0)
    args = parser.parse_args(argv)

    import torch

    from bench import experiments as ex
    from bench.cluster import Server
    from bench.probe import Probe
    from client_sdk import CONFIG, LanguageModel
    from fixtures.tiny_models import build_tiny_llama

    out: dict = {"load_average_start": [round(x, 2) for x in os.getloadavg()],
                 "command": "bench/remote_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    with tempfile.TemporaryDirectory(prefix="raysight-lean-") as tmp_name:
        tmp = Path(tmp_name)
        tiny_path = build_tiny_llama(tmp / "tiny-llama", seed=0)
        smol_path = None
        if args.smol:
            from serve_app.model_store import fetch_model

            smol_path = fetch_model(SMOL)
        key = secrets.token_urlsafe(24)
        config = write_config(tmp / "serve.yaml", key, tiny_path, smol_path)
        server = Server(config, free_port(), tmp / "serve.log", dict(os.environ))
        try:
            url = server.start()
            torch.set_num_threads(1)
            CONFIG.set_host(url)
            CONFIG.set_default_api_key(key)
            CONFIG.show_status = False
            probe = Probe()
            probe.install()
            tiny_r, tiny_b = LanguageModel(TINY), LanguageModel(TINY_B)
            for m in (tiny_r, tiny_b):
                _ = m.tokenizer, m.module_tree
            tiny_local = LanguageModel(str(tiny_path), dtype=torch.float32)
            _ = tiny_local.local_module, tiny_local.module_order
            for _ in range(3):
                ex.seed_session(tiny_r, tiny_r, True)
            _freeze_gc()
            if args.py_spy_s:
                out["profiles"] = profile(server, lambda: ex.seed_session(tiny_r, tiny_r, True), args.py_spy_s,
                                          (args.json or Path("lean")).with_suffix(""))
            meter = ex.CpuMeter(server.cpu_ticks)
            cpu = ex.cpu_cost(meter, lambda: ex.seed_session(tiny_r, tiny_r, True),
                              lambda: ex.seed_session(tiny_local, tiny_local, False), args.sessions)
            out["cpu_tiny"] = cpu
            ot = ex.fixed_overhead(tiny_local, tiny_r, tiny_b, probe, args.rounds)
            out["overhead_tiny"] = {k: v for k, v in ot.items() if not k.endswith("records")}
            last = ot["records"][-1]  # what the client's stream carried, with arrival times (ms)
            out["overhead_tiny"]["last_events"] = [(k, round((t - last["t0"]) * 1000, 1)) for k, t in last["events"]]
            chain_model = tiny_r
            if smol_path is not None:
                chain_model = LanguageModel(SMOL)
                _ = chain_model.tokenizer, chain_model.module_tree
            ch = ex.session_vs_separate(chain_model, probe, args.chain_rounds)
            out["chain"] = {k: v for k, v in ch.items() if k != "records"}
            out["chain"]["model"] = SMOL if smol_path is not None else TINY
            probe.uninstall()
        except BaseException:
            print(server.log_path.read_text()[-3000:] if server.log_path.exists() else "", file=sys.stderr)
            raise
        finally:
            server.stop()
    out["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    summary = {
        "remote_cpu_overhead_ms": out["cpu_tiny"]["remote_minus_local_cpu_ms"],
        "remote_cpu_ms_by_process": out["cpu_tiny"]["by_process_ms"],
        "remote_fixed_overhead_ms": out["overhead_tiny"]["overhead_ms"],
        "bytes_to_client_ratio": out["chain"]["bytes_to_client_ratio"],
        "session_rx_composition": out["chain"]["session_rx_composition"],
        "seed_session_events": out["overhead_tiny"]["last_events"],
    }
    out["summary"] = summary
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(json.dumps(summary, indent=2))
    return out


def profile(server, fn, seconds: float, prefix: Path) -> dict[str, str]:
    """py-spy each request-path process (flat, by function) while `fn` runs in a loop."""
    exe = Path(sys.executable).with_name("py-spy")
    wanted = ("Ingress", "SessionRunner", "RequestStore", f"replica:model-{TINY}", "ProxyActor")
    procs, files = [], {}
    for pid, (label, _) in server.cpu_ticks().items():
        hit = next((w for w in wanted if w in label), None)
        if hit is None or (hit.startswith("replica:") and TINY_B in label):
            continue
        path = Path(f"{prefix}-pyspy-{hit.replace(':', '_')}-{pid}.txt")
        files[label] = str(path)
        procs.append((subprocess.Popen([str(exe), "record", "--pid", str(pid), "--duration", str(int(seconds)),
                                        "--format", "raw", "--rate", "500", "--nonblocking", "-o", str(path)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), path))
    stop = threading.Event()
    time.sleep(0.5)
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline and not stop.is_set():
        fn()
        n += 1
    for p, _ in procs:
        p.wait(timeout=60)
    files["sessions"] = str(n)
    return files


if __name__ == "__main__":
    main()
