"""The remote experiments `bench/run_all.py` runs against its one local cluster.

Every figure is measured side by side in the same run: the variants being compared alternate
round by round (their order rotating), so drift and background load hit all of them alike.
Client-side marks come from `bench.probe`; server-side marks are the request store's event
stamps, read after the timed work (see `bench.cluster.event_times`).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import torch

import client_sdk
from bench.probe import Probe
from bench.stats import paired, percentile, summary
from intervention.events import REQUEST_ID_HEADER
from intervention.wire import decode_result

P1 = "The Eiffel Tower is in the city of"
P2 = "Buckingham Palace is in the city of"
BIG_REPEAT = 262_144  # 64 floats (a hidden state of the tiny Llama) x this = 64 MiB of float32


# -- the experiments, as a researcher writes them ------------------------------------------------


def seed_session(m1, m2, remote: bool):
    """The seed session: trace 1 reads a hidden state (unsaved), trace 2 patches it in."""
    with client_sdk.session(remote=remote):
        with m1.trace(P1):
            hs = m1.model.layers[-1].output[:, -1, :]
            t1 = m1.lm_head.output.argmax(dim=-1).save()
        with m2.trace(P2):
            m2.model.layers[1].output[:, -1, :] = hs
            t2 = m2.lm_head.output.argmax(dim=-1).save()
    return t1, t2


def chain_session(model, n: int):
    """n chained traces as ONE session: each patches the previous trace's last hidden state into
    layer 1 at the last token; the intermediates stay in the cluster."""
    with model.session(remote=True):
        prev = None
        for i in range(n):
            with model.trace(P1 if i == 0 else P2):
                if prev is not None:
                    model.model.layers[1].output[:, -1, :] = prev
                prev = model.model.layers[-1].output[:, -1, :]
                if i == n - 1:
                    out = model.lm_head.output.argmax(dim=-1).save()
    return out


def chain_separate(model, n: int, probe: Probe) -> tuple[Any, int, list[dict]]:
    """The same chain as n separate remote requests: the client saves each intermediate,
    downloads it and sends it back in the next request. Returns (out, intermediate bytes, records)."""
    prev, inter_bytes, records = None, 0, []
    for i in range(n):
        records.append(probe.start())
        with model.trace(P1 if i == 0 else P2, remote=True):
            if prev is not None:
                model.model.layers[1].output[:, -1, :] = prev
            if i < n - 1:
                hs = model.model.layers[-1].output[:, -1, :].save()
            else:
                out = model.lm_head.output.argmax(dim=-1).save()
        probe.mark("t_end")
        probe.stop()
        if i < n - 1:
            prev = hs
            inter_bytes += hs.numel() * hs.element_size()
    return out, inter_bytes, records


def single_trace(model):
    with model.trace(P1, remote=True):
        out = model.lm_head.output.argmax(dim=-1).save()
    return out


def big_result(model):
    """A 64 MiB saved tensor: results over 1 MB are not inlined, they come through GET /result."""
    with model.trace(P1, remote=True):
        big = model.model.norm.output[0, -1].repeat(BIG_REPEAT).save()
    return big


# -- timing helpers ------------------------------------------------------------------------------


def _timed(probe: Probe, fn: Callable[[], Any], **fields) -> tuple[dict, Any]:
    rec = probe.start(**fields)
    cpu = time.process_time()
    try:
        out = fn()
        probe.mark("t_end")
    finally:
        probe.stop()
    rec["cpu_ms"] = (time.process_time() - cpu) * 1000  # this process's CPU: shows descheduling
    rec["ms"] = (rec["t_end"] - rec["t0"]) * 1000
    return rec, out


def _rounds(variants: dict[str, Callable[[], Any]], rounds: int, probe: Probe, warmup: int = 2):
    """Run every variant once per round, the order rotating; records per variant."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names = list(variants)
    recs: dict[str, list[dict]] = {n: [] for n in names}
    outs: dict[str, Any] = {}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            rec, outs[name] = _timed(probe, variants[name], variant=name, round=r)
            recs[name].append(rec)
    return recs, outs


def _same(a, b) -> bool:
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(torch.as_tensor(a), torch.as_tensor(b))


# -- 1. fixed overhead of a remote session ---------------------------------------------------------


def fixed_overhead(local, remote_a, remote_b, probe: Probe, rounds: int) -> dict:
    """The seed session locally, remotely (one model: one segment) and remotely split over two
    served copies of the same model (two segments: the hidden state crosses the object store)."""
    variants = {
        "local": lambda: seed_session(local, local, False),
        "remote": lambda: seed_session(remote_a, remote_a, True),
    }
    if remote_b is not None:
        variants["split"] = lambda: seed_session(remote_a, remote_b, True)
    recs, outs = _rounds(variants, rounds, probe)
    for name in variants:
        if not _same(outs[name], outs["local"]):
            raise AssertionError(f"seed session: {name} result differs from local: {outs[name]} vs {outs['local']}")
    ms = {n: [r["ms"] for r in recs[n]] for n in variants}
    out = {
        "local_ms": summary(ms["local"]),
        "local_cpu_ms": summary([r["cpu_ms"] for r in recs["local"]]),
        "remote_ms": summary(ms["remote"]),
        "remote_client_cpu_ms": summary([r["cpu_ms"] for r in recs["remote"]]),
        "rounds_ms": {n: [round(x, 2) for x in ms[n]] for n in variants},
        "overhead_ms": summary(paired(ms["remote"], ms["local"], lambda a, b: a - b)),
        "records": recs["remote"],
    }
    if "split" in variants:
        out["split_ms"] = summary(ms["split"])
        out["segment_boundary_ms"] = summary(paired(ms["split"], ms["remote"], lambda a, b: a - b))
        out["split_records"] = recs["split"]
    return out


class CpuMeter:
    """CPU time (not wall time) by cluster process, from /proc ticks: other work on the machine
    inflates wall times but barely moves CPU times. The cluster's idle CPU (Ray's own polling),
    measured once over `idle_s`, is subtracted pro rata from every measurement."""

    def __init__(self, snapshot: Callable[[], dict], idle_s: float = 2.0):
        import os

        self.snapshot = snapshot
        self.tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
        a, t0 = snapshot(), time.perf_counter()
        time.sleep(idle_s)
        self.idle = {k: v / (time.perf_counter() - t0) for k, v in self._delta(a, snapshot()).items()}  # ms/s

    def _delta(self, a: dict, b: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, (label, ticks) in b.items():
            used = ticks - a.get(pid, (label, 0))[1]
            if used:
                out[label] = out.get(label, 0.0) + used * self.tick_ms
        return out

    def start(self) -> tuple:
        return self.snapshot(), time.perf_counter()

    def since(self, mark: tuple) -> dict[str, float]:
        """ms of CPU by process label since `mark`, net of idle."""
        a, t0 = mark
        wall = time.perf_counter() - t0
        return {k: v - self.idle.get(k, 0.0) * wall for k, v in self._delta(a, self.snapshot()).items()}


def cpu_cost(meter: CpuMeter, remote_fn: Callable[[], Any], local_fn: Callable[[], Any], n: int) -> dict:
    """CPU time a remote session costs, summed over every process of the cluster and the client,
    against the same session run locally (n of each, back to back)."""
    mark, c0, t0 = meter.start(), time.process_time(), time.perf_counter()
    for _ in range(n):
        remote_fn()
    wall = time.perf_counter() - t0
    client = (time.process_time() - c0) * 1000
    per_proc = {k: v / n for k, v in meter.since(mark).items()}
    per_proc["client (this process)"] = client / n

    c0 = time.process_time()
    for _ in range(n):
        local_fn()
    local = (time.process_time() - c0) * 1000 / n
    remote_total = sum(per_proc.values())
    return {
        "sessions": n,
        "remote_cpu_ms": round(remote_total, 2),
        "local_cpu_ms": round(local, 2),
        "remote_minus_local_cpu_ms": round(remote_total - local, 2),
        "remote_wall_ms_per_session": round(wall * 1000 / n, 2),
        "by_process_ms": {k: round(v, 2) for k, v in sorted(per_proc.items(), key=lambda kv: -kv[1])},
        "idle_cluster_cpu_ms_per_s": round(sum(meter.idle.values()), 2),
    }


# -- 2. one session vs separate requests -----------------------------------------------------------


def session_vs_separate(model, probe: Probe, rounds: int, n: int = 16) -> dict:
    chain_session(model, n)  # warm-up
    chain_separate(model, n, probe)
    sess_ms, sep_ms, sess_rx, sep_rx, sep_tx, sess_tx, inter, sess_recs = [], [], [], [], [], [], [], []
    for r in range(rounds):
        order = ("session", "separate") if r % 2 == 0 else ("separate", "session")
        for which in order:
            if which == "session":
                rec, out_session = _timed(probe, lambda: chain_session(model, n))
                sess_ms.append(rec["ms"])
                sess_rx.append(rec["rx"])
                sess_tx.append(rec["tx"])
                sess_recs.append(rec)
            else:
                t0 = time.time()
                out_sep, inter_bytes, recs = chain_separate(model, n, probe)
                sep_ms.append((time.time() - t0) * 1000)
                sep_rx.append(sum(r["rx"] for r in recs))
                sep_tx.append(sum(r["tx"] for r in recs))
                inter.append(inter_bytes)
        if not _same(out_session, out_sep):
            raise AssertionError(f"chain: the session's answer {out_session} differs from separate requests' {out_sep}")
    return {
        "traces": n,
        "session_ms": summary(sess_ms),
        "separate_ms": summary(sep_ms),
        "speedup": summary(paired(sep_ms, sess_ms, lambda a, b: a / b)),
        "session_rx_bytes": summary(sess_rx, 0),
        "session_tx_bytes": summary(sess_tx, 0),
        "separate_rx_bytes": summary(sep_rx, 0),
        "separate_tx_bytes": summary(sep_tx, 0),
        "intermediate_bytes": summary(inter, 0),
        "bytes_to_client_ratio": summary(paired(sess_rx, inter, lambda a, b: a / b), 5),
        "session_rx_composition": _composition(sess_recs[-1]),
        "records": sess_recs,
    }


def _composition(rec: dict) -> dict:
    """What the bytes a session's client received are: events by kind, and the rest (HTTP)."""
    sse = dict(rec.get("sse_bytes", {}))
    counts = rec.get("sse_counts", {})
    return {"total": rec["rx"], "http_status_and_headers": rec["rx"] - sum(sse.values()),
            "events": {k: {"count": counts.get(k, 0), "bytes": v} for k, v in sse.items()}}


# -- 3. concurrent clients ------------------------------------------------------------------------


def _one_request(client: httpx.Client, body: bytes) -> tuple[float, str | None]:
    """POST a session, read its event stream to COMPLETED, decode the inline result.
    Returns (seconds, request id)."""
    t0 = time.perf_counter()
    headers = {"Content-Type": "application/octet-stream", "Accept": "text/event-stream"}
    with client.stream("POST", "/v1/requests", content=body, headers=headers) as response:
        if response.status_code >= 400:
            response.read()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        rid = response.headers.get(REQUEST_ID_HEADER)  # the stream starts after RECEIVED
        kind = None
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:") and kind in ("COMPLETED", "ERROR", "CANCELLED"):
                for _ in lines:  # the stream's end, as client_sdk reads it: the connection is kept
                    pass
                data = json.loads(line[5:])
                if kind != "COMPLETED":
                    raise RuntimeError(f"{kind}: {data}")
                decode_result(base64.b64decode(data["result"]))
                break
    return time.perf_counter() - t0, rid


def _load_level(url: str, key: str, body: bytes, clients: int, duration_s: float) -> dict:
    """`clients` closed-loop clients (threads, each with its own HTTP connection) for duration_s."""
    latencies: list[float] = []
    ids: list[str] = []
    errors: list[str] = []
    ends: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    state = {}

    def worker():
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                          timeout=httpx.Timeout(30.0, read=120.0)) as client:
            _one_request(client, body)  # open the connection outside the timed window
            barrier.wait()
            while time.perf_counter() < state["deadline"]:
                try:
                    s, rid = _one_request(client, body)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                with lock:
                    latencies.append(s)
                    ids.append(rid)
                    ends.append(time.perf_counter())

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    state["deadline"] = float("inf")
    barrier.wait()
    start = time.perf_counter()
    state["deadline"] = start + duration_s
    for t in threads:
        t.join()
    elapsed = max(ends) - start if ends else float("nan")
    return {"clients": clients, "completed": len(latencies), "errors": errors, "elapsed_s": elapsed,
            "rps": len(latencies) / elapsed if ends else 0.0, "latencies_s": latencies, "ids": ids}


def concurrency(url: str, key: str, body: bytes, levels: tuple[int, ...], reps: int, duration_s: float,
                meter: CpuMeter | None = None) -> dict:
    runs: dict[int, list[dict]] = {n: [] for n in levels}
    cpu: dict[int, dict[str, float]] = {n: {} for n in levels}
    for _ in range(reps):
        for n in levels:
            mark = meter.start() if meter else None
            runs[n].append(_load_level(url, key, body, n, duration_s))
            if meter:
                for k, v in meter.since(mark).items():
                    cpu[n][k] = cpu[n].get(k, 0.0) + v
    out: dict[str, Any] = {"levels": {}, "reps": reps, "duration_s": duration_s,
                           "ids": {str(n): [i for run in runs[n] for i in run["ids"] if i] for n in levels}}
    for n in levels:
        lat = [x * 1000 for run in runs[n] for x in run["latencies_s"]]
        out["levels"][str(n)] = {
            "rps": summary([run["rps"] for run in runs[n]], 3),
            "p50_ms": round(percentile(lat, 50), 1) if lat else None,
            "p99_ms": round(percentile(lat, 99), 1) if lat else None,
            "requests": len(lat),
            "errors": sum(len(run["errors"]) for run in runs[n]),
            "first_errors": [e for run in runs[n] for e in run["errors"]][:3],
        }
        if meter and lat:
            per_req = {k: v / len(lat) for k, v in cpu[n].items()}  # cluster processes (clients: not counted)
            out["levels"][str(n)]["cpu_ms_per_request"] = {
                k: round(v, 2) for k, v in sorted(per_req.items(), key=lambda kv: -kv[1]) if abs(v) >= 0.05
            }
    lo, hi = min(levels), max(levels)
    out["throughput_ratio"] = summary(
        paired([r["rps"] for r in runs[hi]], [r["rps"] for r in runs[lo]], lambda a, b: a / b), 3
    )
    return out


# -- 4. large results ----------------------------------------------------------------------------


def download(model, probe: Probe, reps: int) -> dict:
    big_result(model)  # warm-up
    recs, mbps_transfer, mbps_total, total_ms = [], [], [], []
    for _ in range(reps):
        rec, big = _timed(probe, lambda: big_result(model))
        nbytes = big.numel() * big.element_size()
        rec["result_bytes"] = nbytes
        transfer = rec["decode_start"] - rec["fetch_start"]  # GET /result until the last byte
        full = rec["fetch_end"] - rec["fetch_start"]  # ... and decoded into a tensor
        mbps_transfer.append(nbytes / 2**20 / transfer)
        mbps_total.append(nbytes / 2**20 / full)
        total_ms.append(rec["ms"])
        recs.append(rec)
        del big
    return {
        "result_mib": recs[-1]["result_bytes"] / 2**20,
        "transfer_mib_per_s": summary(mbps_transfer, 1),
        "fetch_and_decode_mib_per_s": summary(mbps_total, 1),
        "request_total_ms": summary(total_ms, 1),
        "records": recs,
    }


# -- 5. the HTTP floor ---------------------------------------------------------------------------


def http_floor(url: str, key: str, request_id: str, n: int) -> dict:
    """Round trips on one keep-alive connection: GET /healthz (proxy + ingress, nothing else) and
    GET /v1/requests/{id} (plus auth and one request-store call), interleaved."""
    health, status = [], []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
        for _ in range(3):
            client.get("/healthz")
        for _ in range(n):
            t0 = time.perf_counter()
            client.get("/healthz").raise_for_status()
            t1 = time.perf_counter()
            client.get(f"/v1/requests/{request_id}").raise_for_status()
            t2 = time.perf_counter()
            health.append((t1 - t0) * 1000)
            status.append((t2 - t1) * 1000)
    return {"healthz_ms": summary(health, 2), "status_ms": summary(status, 2)}


# -- cancel: how soon the replica is free again ----------------------------------------------------


def heavy_trace(model, ops: int = 4000):
    """One trace that touches one module, then thousands of 1024x1024 matmuls with no module in
    between: minutes of replica time unless a cancel stops it between operations."""
    with model.trace(P1):
        x = model.model.layers[0].output.new_ones(1024, 1024)
        acc = x[0, 0]
        for _ in range(ops):
            acc = acc + (x @ x)[0, 0]
        acc.save()


def _sse(client: httpx.Client, request_id: str):
    """(event, data) pairs of a request's stream, as they arrive."""
    with client.stream("GET", f"/v1/requests/{request_id}/events") as r:
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind is not None:
                yield kind, json.loads(line[6:])
                kind = None


def cancel_release(url: str, key: str, heavy_body: bytes, next_body: bytes, rounds: int) -> dict:
    """`cancel_release_ms`: a compute-heavy request is RUNNING and another waits (QUEUED) on the
    same replica; from the DELETE of the first to the second's RUNNING event at the client (the
    replica has started it). Both ends are client marks, so the store and stream hops are in."""
    release, ends = [], []
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(30.0, read=300.0)) as client:
        for _ in range(rounds):
            heavy = client.post("/v1/requests", content=heavy_body).json()["id"]
            for kind, _data in _sse(client, heavy):
                if kind == "RUNNING":
                    break
            nxt = client.post("/v1/requests", content=next_body).json()["id"]
            events = _sse(client, nxt)
            for kind, _data in events:
                if kind in ("QUEUED", "RUNNING"):
                    break
            if kind != "QUEUED":  # it did not have to wait: nothing to measure this round
                continue
            t0 = time.perf_counter()
            client.delete(f"/v1/requests/{heavy}")
            for kind, _data in events:
                if kind == "RUNNING":
                    release.append((time.perf_counter() - t0) * 1000)
                    break
            for kind, _data in events:
                if kind in ("COMPLETED", "ERROR", "CANCELLED"):
                    break
            events.close()
            ends.append(next(k for k, _ in _sse(client, heavy) if k in ("COMPLETED", "ERROR", "CANCELLED")))
    return {"release_ms": summary(release), "heavy_ends": ends}
