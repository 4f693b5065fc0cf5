"""Cross-request batching and the fair queue, on SmolLM2-135M served by one replica.

    .venv/bin/python bench/batching.py [--quick] [--write]

One local Ray + Serve (serve_app/launcher.py, in this process; 127.0.0.1) serves SmolLM2-135M
(float32, one replica, default batching limits) to two users, each with a per-user cap of 64 requests (and 128 open event streams).

- Throughput and latency: N closed-loop clients (threads, each with its own HTTP connection;
  bench/experiments.py `concurrency`), N = 1, 4, 16, 64, each sending the single-trace request of
  `make bench` (read the logits' argmax at the last position). Keys: `batching_throughput_ratio_16`
  (requests/s at 16 clients / at 1: the measurement of `concurrent_throughput_ratio`, bar >= 2.5)
  and `_64`, `batching_latency_ms` (p50/p99 per level), `batching_batch_sizes` (how many programs
  each batch of each level held, from the replica's `stats()`).
- Fairness (`batching_fairness_ratio`): user B's one request, submitted once user A's burst of 40
  concurrent requests is waiting on the replica, from POST to COMPLETED / the same request on an
  idle server (median of B's idle runs). FIFO would put B behind all 40 (about 40/16 batches).

`--write` merges the keys into bench/results.json (bench/run_all.py keeps them) and regenerates
docs/BENCHMARKS.md from it. Figures are wall-clock: note the machine's load when reading them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_ADDRESS", "local")  # a cluster of its own, never one already running here

SMOL = "smollm2-135m"
KEYS = {"a": "bench-user-a-key-0123", "b": "bench-user-b-key-4567"}
LEVELS = (1, 4, 16, 64)


def _say(msg: str) -> None:
    print(f"[batching {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short levels, one round: rough figures")
    parser.add_argument("--write", action="store_true", help="merge into bench/results.json and BENCHMARKS.md")
    args = parser.parse_args(argv)
    reps, duration = (1, 3.0) if args.quick else (2, 8.0)
    fair_rounds = 1 if args.quick else 3

    from bench import experiments as ex
    from serve_app import launcher
    from serve_app.config import AppConfig, hash_key
    from serve_app.model_store import fetch_model

    smol = fetch_model(SMOL)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="raysight-batching-") as tmp:
        config = AppConfig.model_validate({
            "models": [{"name": SMOL, "path": str(smol), "dtype": "float32"}],
            "auth": {"api_keys": [{"user": u, "key_sha256": hash_key(k)} for u, k in KEYS.items()]},
            "limits": {"max_concurrent_per_user": 64, "max_streams_per_user": 128, "request_timeout_s": 300},
            "state_dir": tmp,
        })
        _say("starting Ray + Serve with SmolLM2-135M")
        from bench.cluster import free_port
        url = launcher.start(config, port=free_port(), num_cpus=os.cpu_count())
        try:
            from ray import serve

            handle = serve.get_deployment_handle(f"model-{SMOL}", app_name=launcher.APP_NAME)
            body = _single_trace_body(url)
            for _ in range(3):  # warm up: first forwards, connections
                ex._load_level(url, KEYS["a"], body, 1, 1.0)
            out: dict = {"levels": {}, "batch_sizes": {}}
            for n in LEVELS:
                before = handle.stats.remote().result()["batch_sizes"]
                _say(f"{n} closed-loop clients ({reps} x {duration:g} s)")
                level = ex.concurrency(url, KEYS["a"], body, (n,), reps, duration)["levels"][str(n)]
                after = handle.stats.remote().result()["batch_sizes"]
                out["levels"][str(n)] = level
                out["batch_sizes"][str(n)] = {k: after.get(k, 0) - before.get(k, 0) for k in after
                                              if after.get(k, 0) - before.get(k, 0)}
            _say(f"fairness: B's request behind A's burst of 40 ({fair_rounds} rounds)")
            out["fairness"] = fairness(url, handle, body, fair_rounds)
        finally:
            launcher.stop()
    out["load_avg_before"] = [round(x, 2) for x in load_before]
    out["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    results = to_results(out, " ".join(["python", "bench/batching.py", *(argv or sys.argv[1:])]))
    print(json.dumps(results, indent=2))
    if args.write:
        write(results)
    return results


def _single_trace_body(url: str) -> bytes:
    """The request body of bench/experiments.py `single_trace`, recorded, not sent."""
    from client_sdk import CONFIG, LanguageModel, tracing
    from intervention.wire import encode_session

    CONFIG.set_host(url)
    CONFIG.set_default_api_key(KEYS["a"])
    model = LanguageModel(SMOL)
    _ = model.tokenizer, model.module_tree
    with tracing.recording(remote=True) as graph, model.trace("The Eiffel Tower is in the city of"):
        model.lm_head.output.argmax(dim=-1).save()
    return encode_session(graph.session_ir(), graph.tensors)


def fairness(url: str, handle, body: bytes, rounds: int) -> dict:
    import httpx

    from bench import experiments as ex

    def client(user: str) -> httpx.Client:
        return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS[user]}"},
                            timeout=httpx.Timeout(30.0, read=300.0))

    with client("b") as b:
        ex._one_request(b, body)
        idle = [ex._one_request(b, body)[0] for _ in range(5)]
    idle_s = statistics.median(idle)
    behind, burst_s, waiting_at_submit, a_batches_before_b, a_batches_total = [], [], [], [], []
    for _ in range(rounds):
        a_clients = [client("a") for _ in range(40)]
        for c in a_clients:  # open the connections outside the measured window
            c.get("/healthz")
        done: list[float] = []
        a_ids: list[str] = []
        start = time.perf_counter()

        def one(c: httpx.Client, done: list[float] = done, start: float = start, a_ids: list[str] = a_ids) -> None:
            a_ids.append(ex._one_request(c, body)[1])
            done.append(time.perf_counter() - start)

        threads = [threading.Thread(target=one, args=(c,), daemon=True) for c in a_clients]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # A's burst is queued on the replica
            stats = handle.stats.remote().result()
            if stats["waiting"] >= 24:
                break
            time.sleep(0.01)
        waiting_at_submit.append(stats["waiting"])
        with client("b") as b:
            seconds, b_id = ex._one_request(b, body)
            behind.append(seconds)
            b_batch = _batch_of(b, b_id)
        for t in threads:
            t.join()
        burst_s.append(max(done))
        # Where B ran among the burst's batches (in arrival order it would follow all of them).
        a_batches = sorted({_batch_of(a_clients[0], rid) for rid in a_ids})
        a_batches_before_b.append(sum(1 for n in a_batches if n < b_batch))
        a_batches_total.append(len(a_batches))
        for c in a_clients:
            c.close()
    return {"idle_ms": round(idle_s * 1000, 1), "behind_burst_ms": [round(x * 1000, 1) for x in behind],
            "a_burst_total_ms": [round(x * 1000, 1) for x in burst_s], "a_waiting_at_b_submit": waiting_at_submit,
            "ratio": [round(x / idle_s, 3) for x in behind], "a_batches_before_b": a_batches_before_b,
            "a_batches": a_batches_total}


def _batch_of(client, request_id: str) -> int:
    """The replica's batch number in a finished request's RUNNING event (its events replayed)."""
    from bench import experiments as ex

    for kind, data in ex._sse(client, request_id):
        if kind == "RUNNING":
            return data["batch"]
    raise RuntimeError(f"request {request_id} has no RUNNING event")


def to_results(out: dict, command: str) -> dict:
    from bench.stats import summary

    lv = out["levels"]
    rps = {n: lv[n]["rps"]["median"] for n in lv}
    machine = (f"{os.cpu_count()} cores; load average {out['load_avg_before']} before, "
               f"{out['load_avg_after']} after (other work on the machine)")
    common = {"model": "SmolLM2-135M", "machine": machine}
    return {
        "batching_throughput_ratio_16": {
            "value": round(rps["16"] / rps["1"], 3), "unit": "x", **common, "bar": ">= 2.5", "goal": ">= 3.5",
            "meets_bar": rps["16"] / rps["1"] >= 2.5,
            "what": "requests/s with 16 concurrent clients / with 1; single-trace requests, one replica, cross-request batching"},
        "batching_throughput_ratio_64": {
            "value": round(rps["64"] / rps["1"], 3), "unit": "x", **common,
            "what": "requests/s with 64 concurrent clients / with 1 (as above)"},
        "batching_latency_ms": {
            n: {"p50": lv[n]["p50_ms"], "p99": lv[n]["p99_ms"], "requests_per_s": lv[n]["rps"],
                "requests": lv[n]["requests"], "errors": lv[n]["errors"]} for n in lv} | {"unit": "ms", **common},
        "batching_batch_sizes": {**out["batch_sizes"], **common,
                                 "what": "programs per batch -> number of batches, per client level"},
        "batching_fairness_ratio": {
            **summary(out["fairness"]["ratio"], 3), "unit": "x", **common, **out["fairness"],
            "what": "user B's single request submitted while user A's burst of 40 waits on the replica, "
                    "POST to COMPLETED / the same request on an idle server"},
        "batching_command": command,
    }


def write(results: dict) -> None:
    from bench import report

    path = ROOT / "bench" / "results.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update({k: v for k, v in results.items() if k != "batching_command"})
    data.setdefault("commands", {})["batching"] = results["batching_command"]
    data["concurrent_throughput_ratio"] = headline(data.get("concurrent_throughput_ratio", {}), results)
    path.write_text(json.dumps(data, indent=2) + "\n")
    report.render_into(ROOT / "docs" / "BENCHMARKS.md", data)


def headline(old: dict, results: dict) -> dict:
    """The headline `concurrent_throughput_ratio` from this run: `make bench` measures it the same
    way (SmolLM2, one replica, single-trace requests, closed-loop clients, 16 / 1), so the newer
    measurement stands until the next `make bench`. min/max pair the levels' extremes."""
    lat = results["batching_latency_ms"]
    one, sixteen = lat["1"]["requests_per_s"], lat["16"]["requests_per_s"]
    ratio = results["batching_throughput_ratio_16"]["value"]
    return {**old, "median": ratio, "min": round(sixteen["min"] / one["max"], 3),
            "max": round(sixteen["max"] / one["min"], 3), "n": min(one["n"], sixteen["n"]),
            "bar": ">= 2.5", "goal": "≥ 3.5", "meets_bar": ratio >= 2.5, "source": f"{results['batching_command']} ({lat['machine']})"}


if __name__ == "__main__":
    main()
