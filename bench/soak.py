"""`make soak`: a bounded soak of a real local cluster (its own Ray + Serve on 127.0.0.1).

Several client threads send a mix of requests for a set time: single traces, multi-trace
sessions, cross-model sessions, execution errors, large saves, cancels, time limits and streamed
(blocking-client) submissions. Two phases:

1. steady (no faults): the resident memory (RSS) of every service process (request store,
   ingress, session runner, model replicas, Serve proxy) is read after a warm-up and at the end;
   its growth is reported per 1,000 finished requests.
2. faults: every `--fault-every` seconds one process is killed with SIGKILL, in turn: a model
   replica, the session runner, the ingress, the request store, the Serve HTTP proxy; the load
   goes on through each recovery.

Then the load stops and every request is followed to its end. A request is LOST if the server
accepted it (202 with an id) and it never reached COMPLETED, ERROR or CANCELLED, if its status
vanished (404), or if its finished result could not be fetched before the TTL (a sample of results
is left unfetched until the end and fetched then). The store's own list of unfinished requests
must be empty too (it also holds requests whose 202 never reached a client).

    .venv/bin/python bench/soak.py [--steady-s 240] [--warmup-s 60] [--fault-s 150] [--fault-every 25] [--clients 4]

The figures go into bench/results.json (soak_*). Bars: lost 0; store and ingress RSS growth
<= 20 MB per 1,000 requests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_ADDRESS", "local")  # a cluster of its own, never one found in /tmp/ray

import httpx

from intervention.events import REQUEST_ID_HEADER, TERMINAL

APP = "raysight"
USERS = {"alice": "soak-alice-0123", "bob": "soak-bob-4567", "carol": "soak-carol-8901"}
# (kind, weight): what the clients send, drawn at random
MIX = [("single", 30), ("multi", 14), ("cross", 14), ("error", 10), ("large", 8), ("cancel", 8),
       ("timeout", 6), ("stream", 10)]
KEEP_FRACTION = 0.2  # of completed results, left unfetched until the end (must still be there)
FOLLOW_S = 300.0  # a request not ended this long after it was accepted is stuck (lost)
RECOVERY_S = 180.0  # bound on the service answering /readyz 200 again after a kill
FAULTS = ("model-llama", "SessionRunner", "Ingress", "store", "proxy")
PROCESSES = ("store", "Ingress", "SessionRunner", "model-llama", "model-gpt2", "proxy")
REFUSED_PAUSE_S = 0.25  # a client's pause after a submission that got no 202
SAMPLE_S = 5.0  # between two RSS readings in the steady phase
STRONG_BAR_MB = 20.0  # store and ingress RSS growth per 1,000 requests


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: dict[str, str] = field(default_factory=dict)  # id -> kind
    ended: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (state, error code)
    lost: dict[str, str] = field(default_factory=dict)  # id -> why
    kept: dict[str, str] = field(default_factory=dict)  # completed, unfetched: id -> user
    refused: Counter = field(default_factory=Counter)  # submissions that got no 202 (why)
    finished_count: int = 0

    def end(self, rid: str, state: str, code: str) -> None:
        with self.lock:
            self.ended[rid] = (state, code)
            self.finished_count += 1

    def refuse(self, why: str) -> None:
        with self.lock:
            self.refused[why] += 1

    def lose(self, rid: str, why: str) -> None:
        with self.lock:
            self.lost[rid] = why


class Client:
    """One user's raw HTTP client that rides out a restarting service (retries on transport
    errors and 5xx answers, bounded), as a careful script would."""

    def __init__(self, url: str, key: str):
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=httpx.Timeout(30.0, read=60.0))

    def call(self, method: str, path: str, deadline: float, **kw) -> httpx.Response | None:
        while time.monotonic() < deadline:
            try:
                r = self.http.request(method, path, **kw)
                if r.status_code < 500:
                    return r
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        return None


def bodies(url: str) -> dict[str, bytes]:
    """The request bodies of each kind, recorded with client_sdk's tracing (what a researcher's
    code sends)."""
    import torch

    from client_sdk import CONFIG, LanguageModel, tracing
    from intervention.wire import encode_session

    CONFIG.set_host(url)
    CONFIG.set_default_api_key(USERS["alice"])
    llama, gpt2 = LanguageModel("llama"), LanguageModel("gpt2")
    p1, p2 = "The Eiffel Tower is in the city of", "Buckingham Palace is in the city of"

    def record(fn) -> bytes:
        with tracing.recording(remote=True) as graph:
            fn()
        return encode_session(graph.session_ir(), graph.tensors)

    def single():
        with llama.trace(p1):
            llama.lm_head.output[0, -1].argmax().save()

    def multi():
        with llama.trace(p1):
            hs = llama.model.layers[-1].output[:, -1, :]
        with llama.trace(p2):
            llama.model.layers[1].output[:, -1, :] = hs
            llama.lm_head.output[0, -1].argmax().save()
        with llama.trace(p1):
            llama.model.layers[0].output.mean().save()

    def cross():
        with llama.trace(p1):
            hs = llama.model.layers[-1].output[:, -1, :]
        with gpt2.trace(p2):
            gpt2.transformer.h[1].output[:, -1, :] = hs
            gpt2.lm_head.output[0, -1].save()

    def error():  # a shape mismatch found at execution: ERROR execution_error
        with llama.trace(p1):
            llama.model.layers[0].output[:, -1, :] = llama.model.layers[0].output[:, :2, :]

    def large():  # 4 MiB saved
        with llama.trace(p1):
            (llama.model.layers[0].output.new_ones(1024, 1024) * torch.tensor(2.0)).save()

    def slow():  # seconds of replica time unless stopped (cancel and timeout kinds)
        for _ in range(20):
            with llama.trace(p1):
                work = 0
                for layer in llama.model.layers:
                    x = layer.output.new_ones(1024, 1024)
                    work = work + (x @ x)[0, 0]
                (llama.lm_head.output[0, -1].argmax() + work * 0).save()

    out = {k: record(f) for k, f in
           {"single": single, "multi": multi, "cross": cross, "error": error, "large": large}.items()}
    out["cancel"] = out["timeout"] = record(slow)
    out["stream"] = out["single"]
    return out


def one_request(c: Client, user: str, kind: str, body: bytes, tally: Tally) -> bool:
    """Send one request of `kind` and follow it to its end; False if it was not accepted."""
    headers = {"Content-Type": "application/octet-stream"}
    if kind == "timeout":
        headers["X-Raysight-Timeout"] = "1"
    if kind == "stream":
        headers["Accept"] = "text/event-stream"
    rid = None
    try:
        if kind == "stream":  # a blocking client: the id comes in a header, before any event
            with c.http.stream("POST", "/v1/requests", content=body, headers=headers) as r:
                if r.status_code != 202:
                    r.read()
                    tally.refuse(f"{r.status_code}")
                    return False
                rid = r.headers[REQUEST_ID_HEADER]
                with tally.lock:
                    tally.accepted[rid] = kind
                for line in r.iter_lines():
                    if line.startswith("event: ") and line[7:] in TERMINAL:
                        break
        else:
            r = c.http.post("/v1/requests", content=body, headers=headers)
            if r.status_code != 202:
                tally.refuse(f"{r.status_code}")
                return False
            rid = r.json()["id"]
            with tally.lock:
                tally.accepted[rid] = kind
    except httpx.HTTPError as exc:
        if rid is None:
            tally.refuse(type(exc).__name__)
            return False  # no id: not accepted as far as any client knows (the store's list covers it)
    follow(c, user, rid, kind, tally)
    return True


def follow(c: Client, user: str, rid: str, kind: str, tally: Tally) -> None:
    deadline = time.monotonic() + FOLLOW_S
    cancelled = kind != "cancel"
    while True:
        r = c.call("GET", f"/v1/requests/{rid}", deadline)
        if r is None:
            return tally.lose(rid, f"no terminal state within {FOLLOW_S:g} s")
        if r.status_code == 404:
            return tally.lose(rid, "its status vanished (404)")
        status = r.json()
        state = status["state"]
        if state in TERMINAL:
            break
        if not cancelled and state == "RUNNING":
            cancelled = c.call("DELETE", f"/v1/requests/{rid}", deadline) is not None
        time.sleep(0.2)
    tally.end(rid, state, (status.get("error") or {}).get("code", ""))
    if state != "COMPLETED" or kind == "stream":  # a streamed result may have come inline
        return
    if random.random() < KEEP_FRACTION:
        with tally.lock:
            tally.kept[rid] = user
        return
    res = c.call("GET", f"/v1/requests/{rid}/result", deadline)
    if res is None or res.status_code != 200 or not res.content:
        tally.lose(rid, f"its result could not be fetched ({None if res is None else res.status_code})")


def load(url: str, user: str, body: dict[str, bytes], tally: Tally, stop: threading.Event) -> None:
    c = Client(url, USERS[user])
    kinds, weights = zip(*MIX)
    while not stop.is_set():
        kind = random.choices(kinds, weights)[0]
        if not one_request(c, user, kind, body[kind], tally):
            time.sleep(REFUSED_PAUSE_S)  # the service is restarting or at a limit: not a busy loop


# -- the cluster's processes ----------------------------------------------------------------------


def pids() -> dict[str, int]:
    """Pid of each service process of this cluster (read through Ray, so only this cluster's)."""
    import ray
    from ray.serve._private.constants import SERVE_PROXY_NAME

    from actors.request_store import NAMESPACE, STORE_NAME

    out = {"store": ray.get(ray.get_actor(STORE_NAME, namespace=NAMESPACE).pid.remote(), timeout=30)}
    for a in ray.util.list_named_actors(all_namespaces=True):
        name = a["name"]
        if name.startswith(SERVE_PROXY_NAME):
            what = "proxy"
        elif name.startswith(f"SERVE_REPLICA::{APP}#"):
            what = name.split("#")[1]
        else:
            continue
        actor = ray.get_actor(name, namespace="serve")
        out[what] = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    return out


def rss_mb(pid_of: dict[str, int]) -> dict[str, float]:
    """VmRSS per process, and as `<name>:anon` its RssAnon: RSS also counts the pages of Ray's
    shared-memory object store a process has touched (results pass through it), which grow until
    the store's arena has been used once; RssAnon is the process's own heap."""
    out = {}
    for k, p in pid_of.items():
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines() if ":" in line)
        out[k] = int(fields["VmRSS"].split()[0]) / 1024
        out[f"{k}:anon"] = int(fields["RssAnon"].split()[0]) / 1024
    return out


def wait_ready(url: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < RECOVERY_S:
        try:
            if httpx.get(f"{url}/readyz", timeout=5.0).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the service was not ready {RECOVERY_S:g} s after a kill")


def kill(what: str) -> int:
    pid = pids()[what]
    os.kill(pid, signal.SIGKILL)
    return pid


def wait_replaced(what: str, old: int) -> None:
    """Bounded wait until a new process runs `what` (Ray or Serve restarts it)."""
    start, last = time.monotonic(), None
    while time.monotonic() - start < RECOVERY_S:
        try:
            if pids().get(what, old) != old:
                return
        except Exception as exc:  # noqa: BLE001 - the actor is dead or restarting: look again
            last = exc
        time.sleep(0.5)
    raise RuntimeError(f"{what} was not restarted {RECOVERY_S:g} s after its kill ({last!r})")


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of RSS (MB) over finished requests, per 1,000 requests."""
    n = len(points)
    if n < 2:
        return None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return None if sxx == 0 else 1000 * sum((x - mx) * (y - my) for x, y in points) / sxx


# -- the run --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steady-s", type=float, default=240.0, help="phase 1: load without faults")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="of phase 1, before the first RSS reading")
    parser.add_argument("--fault-s", type=float, default=150.0, help="phase 2: load with faults")
    parser.add_argument("--fault-every", type=float, default=25.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    random.seed(args.seed)

    import ray

    from actors.request_store import NAMESPACE, STORE_NAME
    from fixtures.tiny_models import build_tiny_gpt2, build_tiny_llama
    from serve_app import launcher
    from serve_app.config import AppConfig, hash_key

    t_start = time.monotonic()
    tally = Tally()
    samples: list = []
    with tempfile.TemporaryDirectory(prefix="raysight-soak-") as tmp:
        config = AppConfig.model_validate({
            "models": [{"name": "llama", "path": str(build_tiny_llama(Path(tmp) / "llama", seed=0))},
                       {"name": "gpt2", "path": str(build_tiny_gpt2(Path(tmp) / "gpt2", seed=0))}],
            "auth": {"api_keys": [{"user": u, "key_sha256": hash_key(k)} for u, k in USERS.items()]},
            "limits": {"max_concurrent_per_user": 8, "request_timeout_s": 120},
            "state_dir": str(Path(tmp) / "state"),
        })
        from bench.cluster import free_port
        url = launcher.start(config, port=free_port(), num_cpus=2)
        try:
            body = bodies(url)
            stop = threading.Event()
            users = list(USERS)
            threads = [threading.Thread(target=load, args=(url, users[i % len(users)], body, tally, stop),
                                        daemon=True) for i in range(args.clients)]
            for t in threads:
                t.start()
            # phase 1: steady; RSS read every SAMPLE_S after the warm-up
            time.sleep(args.warmup_s)
            pid0 = pids()
            samples = []  # (finished requests, {process: RSS MB})
            steady_end = time.monotonic() + max(0.0, args.steady_s - args.warmup_s)
            while True:
                samples.append((tally.finished_count, rss_mb(pid0)))
                if time.monotonic() >= steady_end:
                    break
                time.sleep(min(SAMPLE_S, max(0.0, steady_end - time.monotonic())))
            assert pids() == pid0, "a process restarted during the steady phase"
            steady_requests = samples[-1][0] - samples[0][0]
            rss0, rss1 = samples[0][1], samples[-1][1]
            # phase 2: faults
            faults = []
            t0 = time.monotonic()
            end = t0 + args.fault_s
            for i in range(int(args.fault_s // args.fault_every)):  # kill i at t0 + (i+1) * fault_every
                time.sleep(max(0.0, t0 + (i + 1) * args.fault_every - time.monotonic()))
                what = FAULTS[i % len(FAULTS)]
                killed_at = time.monotonic()
                pid = kill(what)
                wait_replaced(what, pid)
                wait_ready(url)
                back = time.monotonic() - killed_at
                faults.append({"killed": what, "pid": pid, "ready_again_s": round(back, 1)})
                print(f"soak: killed {what} (pid {pid}); ready again in {back:.1f} s", flush=True)
            time.sleep(max(0.0, end - time.monotonic()))
            stop.set()
            for t in threads:
                t.join(timeout=FOLLOW_S + 60)
            stuck_threads = sum(t.is_alive() for t in threads)
            # the end: kept results are still there, the store holds nothing unfinished
            for rid, user in tally.kept.items():
                r = Client(url, USERS[user]).call("GET", f"/v1/requests/{rid}/result", time.monotonic() + 60)
                if r is None or r.status_code != 200 or not r.content:
                    tally.lose(rid, f"its unfetched result vanished ({None if r is None else r.status_code})")
            store = ray.get_actor(STORE_NAME, namespace=NAMESPACE)
            unfinished = ray.get(store.unfinished.remote())
            for rid, _, state in unfinished:
                tally.lose(rid, f"still {state} in the store at the end")
        finally:
            launcher.stop()

    accepted = len(tally.accepted)
    growth = {k: _r2(slope([(n, r[k]) for n, r in samples])) for k in rss0}
    # the same over the later half of the samples: a leak keeps its slope, a warm-up flattens
    later = {k: _r2(slope([(n, r[k]) for n, r in samples[len(samples) // 2:]])) for k in rss0}
    outcomes = Counter(f"{tally.accepted[r]}:{s}{':' + c if c else ''}" for r, (s, c) in tally.ended.items())
    result = {
        "soak_requests_lost": len(tally.lost),
        "soak_requests_accepted": accepted,
        "soak_store_rss_growth_mb_per_1000": growth.get("store"),
        "soak_ingress_rss_growth_mb_per_1000": growth.get("Ingress"),
        "soak_store_anon_growth_mb_per_1000": growth.get("store:anon"),
        "soak_ingress_anon_growth_mb_per_1000": growth.get("Ingress:anon"),
        "soak": {
            "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": ".venv/bin/python bench/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "wall_s": round(time.monotonic() - t_start, 1),
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "doc")},
            "bars": {"requests_lost": 0, "store_and_ingress_rss_growth_mb_per_1000": f"<= {STRONG_BAR_MB:g}"},
            "meets_bars": len(tally.lost) == 0 and all(
                growth.get(k) is not None and growth[k] <= STRONG_BAR_MB for k in ("store", "Ingress")),
            "lost": tally.lost,
            "requests_ended": len(tally.ended),
            "outcomes": dict(sorted(outcomes.items())),
            "refused_submissions": dict(tally.refused),
            "kept_results_checked": len(tally.kept),
            "steady_phase": {"requests": steady_requests, "rss_mb_start": _round(rss0), "rss_mb_end": _round(rss1),
                             "rss_samples": len(samples),
                             "rss_growth_mb_per_1000": growth, "rss_growth_mb_per_1000_later_half": later,
                             "how": "least-squares slope of RSS over "
                             f"finished requests, RSS read every {SAMPLE_S:g} s after a {args.warmup_s:g} s warm-up"},
            "faults": faults,
            "client_threads_stuck": stuck_threads,
        },
    }
    print(json.dumps(result, indent=1))
    if args.json.exists():
        results = json.loads(args.json.read_text())
        results.update(result)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        if args.doc.exists():
            splice_section(args.doc, results)
    return result


def splice_section(doc: Path, results: dict) -> None:
    """Replace (or add, before the method section) the soak's section of docs/BENCHMARKS.md;
    the rest of the document is `make bench`'s."""
    import re

    from bench.report import SOAK_HEADING, soak_section

    text = doc.read_text()
    section = soak_section(results) + "\n"
    pattern = re.compile(rf"^{re.escape(SOAK_HEADING)}[^\n]*\n.*?(?=^## |\Z)", flags=re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        anchor = text.find("## Engine overhead (local)")
        text = text[:anchor] + section + text[anchor:] if anchor >= 0 else text.rstrip() + "\n\n" + section
    doc.write_text(text)


def _r2(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in d.items()}


if __name__ == "__main__":
    main()
