"""`make bench`: every raysight benchmark in one run, one local cluster, one results file.

    .venv/bin/python bench/run_all.py [--quick] [--json bench/results.json] [--doc docs/BENCHMARKS.md]

1. bench/engine_overhead.py in a subprocess (local engine vs nnsight; before the cluster starts, so
   the machine is as quiet as it gets).
2. `raysight serve --config FILE` as a subprocess, serving SmolLM2-135M ("smollm2-135m") and a tiny
   random Llama under two names ("tiny-llama", "tiny-llama-b": same weights, two replicas, so a
   session can cross the object store). Cold start = launch to its ready line.
3. The remote experiments (bench/experiments.py) against it through client_sdk and raw httpx.
4. Memory of the model replicas (/proc), the request store's event stamps (a Ray driver), stop.
5. bench/results.json, and docs/BENCHMARKS.md regenerated (its "Engine overhead (local)" section,
   written by hand, is kept).

Every figure is a ratio or difference of variants measured side by side in this run, reported as
median [min, max] over repeated rounds. Nothing here is asserted by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub on these machines: fail fast
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1 (ENV.md)

USER = "bench"
# Keys written by benchmarks that run on their own (each with its command in BENCHMARKS.md):
# bench/scan_cost.py, generate_overhead.py, gradient_memory.py, generate_remote.py, instructions.py,
# batching.py, scale.py, soak.py, remote_overhead.py (its variant on Serve's Python proxy).
STANDALONE = ("scan_cpu_ms_", "generate_overhead_ratio_vs_nnsight", "gradient_peak_memory_ratio",
              "autoscale_up_s", "autoscale_down_s", "cross_node_extra_ms",
              "generate_remote_vs_local_ratio_smollm2", "engine_instructions", "batching_", "soak",
              "remote_cpu_overhead_ms_python_proxy", "remote_fixed_overhead_ms_python_proxy")
SMOL, TINY, TINY_B = "smollm2-135m", "tiny-llama", "tiny-llama-b"

# key, what, model, unit, bar ("<=" or ">=", value), goal
HEADLINES = [
    ("engine_overhead_ratio_vs_nnsight", "per-trace overhead of the local engine / nnsight 0.8.1's (bench/engine_overhead.py)",
     "tiny Llama", "x", ("<=", 1.0), "≤ 0.5"),
    ("remote_fixed_overhead_ms", "seed session (2 traces) through `raysight serve` on 127.0.0.1 minus the same session local",
     "tiny Llama", "ms", ("<=", 25.0), "≤ 10"),
    ("session_vs_separate_speedup", "16 chained traces as 16 separate remote requests (client saves and re-sends each intermediate) / as one session",
     "tiny Llama", "x", (">=", 1.5), "high"),
    ("bytes_to_client_ratio", "bytes the client receives for the 16-trace session (on the wire) / bytes of its 15 intermediates",
     "SmolLM2-135M", "x", ("<=", 0.05), "≤ 0.01"),
    ("concurrent_throughput_ratio", "requests/s with 16 concurrent clients / with 1 client; single-trace requests, one replica",
     "SmolLM2-135M", "x", (">=", 2.5), "≥ 3.5"),
    ("cancel_release_ms", "DELETE of a running compute-heavy request (thousands of tensor ops, one module) → the "
     + "next request on that replica reaches RUNNING, at the client", "tiny Llama", "ms", ("<=", 500.0), "≤ 50"),
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: checks the suite runs, figures are rough")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    args = parser.parse_args(argv)
    settings = _settings(args.quick)
    started = time.perf_counter()
    machine = describe_machine()

    from fixtures.tiny_models import build_tiny_llama
    from serve_app.model_store import fetch_model

    with tempfile.TemporaryDirectory(prefix="raysight-bench-") as tmp_name:
        tmp = Path(tmp_name)
        _say("fetching SmolLM2-135M (cached after the first time) and building the tiny Llama")
        smol_path = fetch_model(SMOL)
        tiny_path = build_tiny_llama(tmp / "tiny-llama", seed=0)

        _say("engine overhead vs nnsight (bench/engine_overhead.py, subprocess)")
        engine = run_engine_overhead(tmp, settings)

        key = secrets.token_urlsafe(24)
        config = write_config(tmp / "serve.yaml", key, smol_path, tiny_path)
        from bench.cluster import Server, event_times, free_port
        from intervention import timeline
        port = args.port or free_port()

        # The server's half of the per-hop table (intervention/timeline.py): a mark is one short
        # write, ~10 per request.
        timeline_path = tmp / "timeline.txt"
        server = Server(config, port, tmp / "serve.log", {**os.environ, timeline.ENV: str(timeline_path)})
        _say(f"starting `raysight serve --config {config.name} --port {port}` (cold start is timed)")
        try:
            url = server.start()
            _say(f"ready after {server.cold_start_s:.1f} s at {url}")
            remote = run_remote(url, key, smol_path, tiny_path, settings, server)
            memory = {"replicas": server.replica_memory(), "cluster_rss_mb": server.cluster_rss_mb()}
            _say("reading the request store's event stamps")
            try:
                address = server.gcs_address()
                events = event_times(address, USER, remote.pop("_ids")) if address else {}
                events_error = None if address else "could not find this cluster's GCS address"
            except Exception as exc:  # noqa: BLE001 - the breakdown is optional; the figures stand
                events, events_error = {}, f"{type(exc).__name__}: {exc}"
            marks = timeline.read(str(timeline_path)) if timeline_path.exists() else {}
        except BaseException:
            _say(f"server log: {server.log_path}")
            print(server.log_path.read_text()[-3000:] if server.log_path.exists() else "", file=sys.stderr)
            raise
        finally:
            _say("stopping the cluster (SIGINT)")
            server.stop()

    results = assemble(machine, settings, engine, server, remote, memory, events, events_error, marks)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.json.exists():  # figures of the benchmarks that run on their own: kept
        kept = json.loads(args.json.read_text())
        results.update({k: v for k, v in kept.items() if k.startswith(STANDALONE) and k not in results})
    args.json.write_text(json.dumps(results, indent=2) + "\n")

    from bench.report import render_into

    render_into(args.doc, results)
    print_summary(results)
    _say(f"wrote {_rel(args.json)} and {_rel(args.doc)} in {results['wall_s']:.0f} s")
    return results


def _settings(quick: bool) -> dict:
    if quick:
        return {"quick": True, "engine_rounds": 5, "overhead_rounds": 6, "overhead_rounds_smol": 3,
                "chain_rounds": 2, "chain_rounds_smol": 1, "download_reps": 2, "load_reps": 1,
                "load_duration_s": 3.0, "load_reps_tiny": 1, "load_duration_tiny_s": 2.0, "http_floor_n": 20,
                "cpu_sessions": 10, "cancel_rounds": 3}
    return {"quick": False, "engine_rounds": None, "overhead_rounds": 40, "overhead_rounds_smol": 30,
            "chain_rounds": 10, "chain_rounds_smol": 4, "download_reps": 5, "load_reps": 3,
            "load_duration_s": 8.0, "load_reps_tiny": 2, "load_duration_tiny_s": 4.0, "http_floor_n": 100,
            "cpu_sessions": 60, "cancel_rounds": 10}


# -- setup -------------------------------------------------------------------------------------------


def describe_machine() -> dict:
    from importlib.metadata import version

    import torch
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": mem_gib, "gpu": None,
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "ray": version("ray"), "transformers": transformers.__version__,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def run_engine_overhead(tmp: Path, settings: dict) -> dict:
    script = ROOT / "bench" / "engine_overhead.py"
    out = tmp / "engine_overhead.json"
    if not script.exists():
        return {"error": "bench/engine_overhead.py is not there yet"}
    cmd = [sys.executable, str(script), "--json", str(out)]
    if settings["engine_rounds"]:
        cmd += ["--rounds", str(settings["engine_rounds"])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout)[-1500:]
        return {"error": f"exit {proc.returncode}: {tail}"}
    data = json.loads(out.read_text())
    data["subprocess_wall_s"] = round(time.perf_counter() - t0, 1)
    return data


def write_config(path: Path, key: str, smol: Path, tiny: Path) -> Path:
    """A config file, as an operator would write one; the per-user cap is raised for 16 clients."""
    import yaml

    from serve_app.config import AppConfig, hash_key

    cfg = {
        "models": [
            {"name": SMOL, "path": str(smol), "dtype": "float32"},
            {"name": TINY, "path": str(tiny), "dtype": "float32"},
            {"name": TINY_B, "path": str(tiny), "dtype": "float32"},
        ],
        "auth": {"api_keys": [{"user": USER, "key_sha256": hash_key(key)}]},
        "limits": {"max_concurrent_per_user": 64, "request_timeout_s": 300},
    }
    AppConfig.model_validate(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# -- the remote experiments ------------------------------------------------------------------------


def run_remote(url: str, key: str, smol_path: Path, tiny_path: Path, s: dict, server=None) -> dict:
    import torch

    from bench import experiments as ex
    from bench.probe import Probe
    from client_sdk import CONFIG, LanguageModel

    # Ray runs each replica (num_cpus 0) with OMP_NUM_THREADS=1: the local side matches it.
    torch.set_num_threads(1)
    CONFIG.set_host(url)
    CONFIG.set_default_api_key(key)
    CONFIG.show_status = False
    probe = Probe()
    probe.install()
    try:
        out: dict = {}
        smol_r, tiny_r, tiny_b = LanguageModel(SMOL), LanguageModel(TINY), LanguageModel(TINY_B)

        _say("first requests after ready (SmolLM2 seed session)")
        t0 = time.perf_counter()
        _ = smol_r.tokenizer, smol_r.module_tree  # GET /v1/models/{name}: tree, config, tokenizer
        info_ms = (time.perf_counter() - t0) * 1000
        first, _ = ex._timed(probe, lambda: ex.seed_session(smol_r, smol_r, True))
        second, _ = ex._timed(probe, lambda: ex.seed_session(smol_r, smol_r, True))
        out["first_request"] = {"model_info_ms": round(info_ms, 1), "first_seed_ms": round(first["ms"], 1),
                                "second_seed_ms": round(second["ms"], 1)}
        for m in (tiny_r, tiny_b):
            _ = m.tokenizer, m.module_tree
        tiny_local = LanguageModel(str(tiny_path), dtype=torch.float32)
        _ = tiny_local.local_module, tiny_local.module_order
        _freeze_gc()

        _say(f"remote fixed overhead, tiny Llama ({s['overhead_rounds']} rounds: local / remote / split)")
        out["overhead_tiny"] = ex.fixed_overhead(tiny_local, tiny_r, tiny_b, probe, s["overhead_rounds"])

        meter = ex.CpuMeter(server.cpu_ticks) if server is not None else None
        if meter is not None:
            _say(f"CPU time per seed session, all cluster processes, tiny Llama ({s['cpu_sessions']} sessions)")
            out["cpu_tiny"] = ex.cpu_cost(
                meter, lambda: ex.seed_session(tiny_r, tiny_r, True),
                lambda: ex.seed_session(tiny_local, tiny_local, False), s["cpu_sessions"],
            )

        _say("HTTP floor (GET /healthz, GET /v1/requests/{id})")
        rid = out["overhead_tiny"]["records"][-1]["id"]
        out["http_floor"] = ex.http_floor(url, key, rid, s["http_floor_n"])

        _say(f"remote fixed overhead, SmolLM2 ({s['overhead_rounds_smol']} rounds: local / remote)")
        smol_local = LanguageModel(str(smol_path), dtype=torch.float32)
        _ = smol_local.local_module, smol_local.module_order
        _freeze_gc()
        out["overhead_smol"] = ex.fixed_overhead(smol_local, smol_r, None, probe, s["overhead_rounds_smol"])
        del smol_local

        _say(f"16 chained traces: one session vs 16 requests, tiny Llama ({s['chain_rounds']} rounds)")
        out["chain_tiny"] = ex.session_vs_separate(tiny_r, probe, s["chain_rounds"])
        _say(f"16 chained traces: one session vs 16 requests, SmolLM2 ({s['chain_rounds_smol']} rounds)")
        out["chain_smol"] = ex.session_vs_separate(smol_r, probe, s["chain_rounds_smol"])

        _say(f"64 MiB result download, tiny Llama ({s['download_reps']} reps)")
        out["download"] = ex.download(tiny_r, probe, s["download_reps"])

        ex.single_trace(smol_r)
        smol_body = probe.last_body
        ex.single_trace(tiny_r)
        tiny_body = probe.last_body
        _say(f"cancel of a compute-heavy request -> the next one starts, tiny Llama ({s['cancel_rounds']} rounds)")
        from client_sdk import tracing
        from intervention.wire import encode_session

        with tracing.recording(remote=True) as graph:
            ex.heavy_trace(tiny_r)
        heavy_body = encode_session(graph.session_ir(), graph.tensors)
        out["cancel_tiny"] = ex.cancel_release(url, key, heavy_body, tiny_body, s["cancel_rounds"])
        _say(f"concurrent clients 1/4/16, SmolLM2 single-trace requests ({s['load_reps']} x {s['load_duration_s']:g} s per level)")
        out["load_smol"] = ex.concurrency(url, key, smol_body, (1, 4, 16), s["load_reps"], s["load_duration_s"], meter)
        _say(f"concurrent clients 1/4/16, tiny Llama single-trace requests ({s['load_reps_tiny']} x {s['load_duration_tiny_s']:g} s)")
        out["load_tiny"] = ex.concurrency(url, key, tiny_body, (1, 4, 16), s["load_reps_tiny"],
                                          s["load_duration_tiny_s"], meter)

        ids = [r["id"] for k in ("overhead_tiny", "overhead_smol") for r in out[k]["records"] if r.get("id")]
        ids += [r["id"] for r in out["overhead_tiny"].get("split_records", []) if r.get("id")]
        ids += [r["id"] for k in ("chain_tiny", "chain_smol", "download") for r in out[k]["records"] if r.get("id")]
        for k in ("load_smol", "load_tiny"):
            ids += out[k]["ids"]["1"] + out[k]["ids"]["16"]
        out["_ids"] = ids
        return out
    finally:
        probe.uninstall()


def _freeze_gc() -> None:
    """Move what is loaded into the GC's permanent generation: a full collection walking the
    models' objects would otherwise land in some timed round (100+ ms here)."""
    import gc

    gc.collect()
    gc.freeze()


# -- results ------------------------------------------------------------------------------------


ENGINE_FIGURES = [  # key, what, bar (<=)
    ("engine_read_overhead_ratio_vs_nnsight", "local engine's cost per read (`module.output.save()`) / nnsight 0.8.1's", 1.0),
    ("engine_edit_overhead_ratio_vs_nnsight", "local engine's cost per edit (`module.output[:] += 0.5`) / nnsight 0.8.1's", 1.0),
    ("engine_programs_per_forward", "16 single-read programs in one forward: overhead per program / one program's alone", 2.0),
    ("engine_programs_per_forward_total", "16 single-read programs in one forward: overhead in all / one program's alone", 2.0),
]


def assemble(machine, settings, engine, server, remote, memory, events, events_error, marks) -> dict:
    from bench import breakdown

    ot, os_, ct, cs = remote["overhead_tiny"], remote["overhead_smol"], remote["chain_tiny"], remote["chain_smol"]
    ls, lt, dl = remote["load_smol"], remote["load_tiny"], remote["download"]
    head_values = {
        "engine_overhead_ratio_vs_nnsight": engine.get("engine_overhead_ratio_vs_nnsight"),
        "remote_fixed_overhead_ms": ot["overhead_ms"],
        "session_vs_separate_speedup": ct["speedup"],
        "bytes_to_client_ratio": cs["bytes_to_client_ratio"],
        "concurrent_throughput_ratio": ls["throughput_ratio"],
        "cancel_release_ms": remote["cancel_tiny"]["release_ms"],
    }
    results: dict = {"generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": "make bench",
                     "machine": machine, "settings": settings}
    for key, what, model, unit, (op, bar), goal in HEADLINES:
        v = head_values[key]
        if v is None:
            results[key] = {"median": None, "error": engine.get("error"), "model": model, "what": what}
            continue
        med = v["median"]
        meets = None if med is None else (med <= bar if op == "<=" else med >= bar)
        results[key] = {**_stat(v), "unit": unit, "model": model, "what": what,
                        "bar": f"{op} {bar:g}", "goal": goal, "meets_bar": meets}

    # The engine's per-operation and many-programs figures (bench/engine_overhead.py, issue 8).
    for key, what, bar in ENGINE_FIGURES:
        if engine.get(key):
            med = engine[key]["median"]
            results[key] = {**_stat(engine[key]), "unit": "x", "model": "tiny Llama", "what": what,
                            "bar": f"<= {bar:g}", "meets_bar": med <= bar}

    # The other figures the issue asks for, and the variants beside the headline ones.
    cpu = remote.get("cpu_tiny")
    if cpu:
        results["remote_cpu_overhead_ms"] = {
            "value": cpu["remote_minus_local_cpu_ms"], "n": cpu["sessions"], "unit": "ms CPU", "model": "tiny Llama",
            "what": "CPU time of one remote seed session summed over the client and every cluster process, "
                    "minus the CPU time of the same session local (mean over the sessions)",
            "remote_cpu_ms": cpu["remote_cpu_ms"], "local_cpu_ms": cpu["local_cpu_ms"],
        }
    results["remote_fixed_overhead_ms_smollm2"] = {**_stat(os_["overhead_ms"]), "unit": "ms", "model": "SmolLM2-135M"}
    results["segment_boundary_ms"] = {**_stat(ot.get("segment_boundary_ms")), "unit": "ms", "model": "tiny Llama",
                                      "what": "seed session split over two served copies of the model minus the same session on one"}
    results["session_vs_separate_speedup_smollm2"] = {**_stat(cs["speedup"]), "unit": "x", "model": "SmolLM2-135M"}
    results["bytes_to_client_ratio_tiny"] = {**_stat(ct["bytes_to_client_ratio"]), "unit": "x", "model": "tiny Llama"}
    results["concurrent_throughput_ratio_tiny"] = {**_stat(lt["throughput_ratio"]), "unit": "x", "model": "tiny Llama"}
    results["latency_ms"] = {
        "model": "SmolLM2-135M", "request": "single trace, blocking (POST with the event stream, result inline)",
        **{n: {"p50": lv["p50_ms"], "p99": lv["p99_ms"], "requests": lv["requests"], "errors": lv["errors"],
               "requests_per_s": lv["rps"]} for n, lv in ls["levels"].items()},
    }
    results["latency_ms_tiny"] = {
        "model": "tiny Llama",
        **{n: {"p50": lv["p50_ms"], "p99": lv["p99_ms"], "requests": lv["requests"], "errors": lv["errors"],
               "requests_per_s": lv["rps"]} for n, lv in lt["levels"].items()},
    }
    results["result_download_mib_per_s"] = {**_stat(dl["transfer_mib_per_s"]), "unit": "MiB/s", "model": "tiny Llama",
                                            "result_mib": dl["result_mib"],
                                            "with_decode_mib_per_s": dl["fetch_and_decode_mib_per_s"],
                                            "request_total_ms": dl["request_total_ms"]}
    results["cold_start_s"] = {"value": round(server.cold_start_s, 2), "n": 1, "unit": "s",
                               "what": "launch of `raysight serve --config` to its ready line: Ray, Serve, "
                                       "SmolLM2-135M + two tiny-Llama replicas loaded, /readyz answering 200",
                               "stop_s": round(server.stop_s, 2) if server.stop_s else None}
    results["replica_peak_rss_mb"] = {name: m["peak_rss_mb"] for name, m in sorted(memory["replicas"].items())}
    results["replica_rss_mb"] = {name: m["rss_mb"] for name, m in sorted(memory["replicas"].items())}
    results["cluster_rss_mb"] = memory["cluster_rss_mb"]
    results["http_roundtrip_ms"] = remote["http_floor"]
    results["first_request"] = remote["first_request"]

    details = {
        "overhead_tiny": _strip(ot), "overhead_smol": _strip(os_), "chain_tiny": _strip(ct),
        "chain_smol": _strip(cs), "download": _strip(dl),
        "load_smol": _strip(ls), "load_tiny": _strip(lt), "cpu_tiny": remote.get("cpu_tiny"),
        "engine_overhead": {k: v for k, v in engine.items()},
    }
    details["breakdown"] = {
        "seed_tiny": breakdown.summarize(ot["records"], marks),
        "seed_smol": breakdown.summarize(os_["records"], marks),
        "chain16_tiny": breakdown.summarize(ct["records"], marks),
        "chain16_smol": breakdown.summarize(cs["records"], marks),
    }
    if events:
        details["breakdown"] |= {
            "load_smol_1_client": breakdown.server_side(events, ls["ids"]["1"]),
            "load_smol_16_clients": breakdown.server_side(events, ls["ids"]["16"]),
            "load_tiny_1_client": breakdown.server_side(events, lt["ids"]["1"]),
            "load_tiny_16_clients": breakdown.server_side(events, lt["ids"]["16"]),
        }
    else:
        details["breakdown"]["events_error"] = events_error
    results["details"] = details
    return results


def _stat(v: dict | None) -> dict:
    if not v:
        return {"median": None}
    return {k: v.get(k) for k in ("median", "min", "max", "n")}


def _strip(d: dict) -> dict:
    """Drop raw per-request records and ids (kept out of results.json)."""
    return {k: v for k, v in d.items() if not k.endswith("records") and k != "ids"}


def print_summary(results: dict) -> None:
    print()
    for key, *_ in HEADLINES:
        r = results[key]
        if r.get("median") is None:
            print(f"{key:40s} n/a ({r.get('error', '')[:80]})")
            continue
        mark = {True: "meets bar", False: "MISSES bar", None: ""}[r.get("meets_bar")]
        print(f"{key:40s} {r['median']:>10.4g} [{r['min']:.4g}, {r['max']:.4g}] {r['unit']:3s} "
              f"({r['model']}; bar {r['bar']}: {mark})")
    lat = results["latency_ms"]
    print("latency p50/p99 ms (SmolLM2): " + ", ".join(f"{n} clients {lat[n]['p50']}/{lat[n]['p99']}" for n in ("1", "4", "16")))
    print(f"64 MiB result download: {results['result_download_mib_per_s']['median']} MiB/s; "
          f"cold start {results['cold_start_s']['value']} s; replica peak RSS MB {results['replica_peak_rss_mb']}")


def _say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


if __name__ == "__main__":
    main(sys.argv[1:])
