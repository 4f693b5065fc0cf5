"""Where the time of a remote request goes: the client's marks joined with the server's.

The client's marks come from bench/probe.py; the server's from intervention/timeline.py (the
benchmark starts `raysight serve` with RAYSIGHT_TIMELINE set). All are `time.time()` on one
machine. For one blocking request on one model, in order (c: client, s: server):

    c t0                the `with` block starts (tracing)
    c encode_start      the session IR is built; encoding the request body starts
    c post              the POST leaves
    s ingress.entered   the ingress's route starts (after HAProxy, uvicorn, FastAPI, Serve)
    s ingress.sent      body decoded and validated, admit call and Serve call to the replica sent
    s replica.start     the replica's `run_session` starts
    s run.work_done     the engine has run every trace (forwards included) and encoded the result
    s replica.answered  the replica returns its answer (the store's `finish` starts 1 ms later)
    s ingress.answered  the ingress has the answer
    c COMPLETED         the end (result inline) reached the client
    c t_end             values decoded and rebound in the caller's frame
"""

from __future__ import annotations

from bench.stats import summary

# (key, label, what it contains, (from, to)): c: a client mark, else a server mark
PHASES = [
    ("client", "client: tracing + encoding", "the `with` block recording the IR, then the body (client CPU)",
     ("c:t0", "c:post")),
    ("http_in", "HTTP into the ingress", "httpx, HAProxy, uvicorn and FastAPI in the ingress replica",
     ("c:post", "ingress.entered")),
    ("ingress", "ingress: decode, validate, send", ("read, decode and validate the body; the admit call and "
     "the Serve call to the replica leave together"), ("ingress.entered", "ingress.sent")),
    ("call_in", "Serve call to the replica", ("the DeploymentHandle call (by value: Serve's gRPC "
     "straight to the replica): the ingress's router, the transport, the replica's event loops"), ("ingress.sent", "replica.start")),
    ("work", "replica: engine and forwards", ("plan, run every trace (the forwards), encode the saves: "
     "what the local run does too"), ("replica.start", "run.work_done")),
    ("after_work", "replica: the end", "events settled, the answer made (the store's `finish` call starts 1 ms after it)",
     ("run.work_done", "replica.answered")),
    ("call_out", "answer back to the ingress", "Serve's return path", ("replica.answered", "ingress.answered")),
    ("to_client", "end to the client", "the SSE chunk through uvicorn and HAProxy to httpx",
     ("ingress.answered", "c:COMPLETED")),
    ("decode", "client: decode", "decode the inline result, rebind names", ("c:COMPLETED", "c:t_end")),
]


def _time(point: str, rec: dict, server: dict[str, float]) -> float:
    if not point.startswith("c:"):
        return server[point]
    name = point[2:]
    if name == "COMPLETED":
        return next(t for kind, t in rec["events"] if kind == name)
    return rec[name]


def phases(rec: dict, server: dict[str, float]) -> dict[str, float] | None:
    """Phase -> milliseconds for one request, or None if a mark is missing."""
    try:
        out = {key: (_time(b, rec, server) - _time(a, rec, server)) * 1000 for key, _, _, (a, b) in PHASES}
        out["total"] = (rec["t_end"] - rec["t0"]) * 1000
        return out
    except (KeyError, StopIteration):
        return None


def summarize(records: list[dict], timeline: dict[str, dict[str, float]]) -> dict | None:
    """Median [min, max] per phase over the requests whose marks were all found."""
    rows = [p for r in records if r.get("id") in timeline for p in [phases(r, timeline[r["id"]])] if p]
    if not rows:
        return None
    return {key: summary([row[key] for row in rows], 2) for key in rows[0]}


def server_side(events: dict[str, list], ids: list[str]) -> dict | None:
    """For requests sent raw (no client marks): queue wait and replica time, from events only."""
    queue, replica = [], []
    for rid in ids:
        t: dict[str, float] = {}
        for e, ts, _ in events.get(rid, []):
            t.setdefault(e, ts)
        if {"QUEUED", "RUNNING", "COMPLETED"} <= set(t):
            queue.append((t["RUNNING"] - t["QUEUED"]) * 1000)
            replica.append((t["COMPLETED"] - t["RUNNING"]) * 1000)
    if not queue:
        return None
    return {"queue_ms": summary(queue, 2), "replica_and_result_ms": summary(replica, 2)}
