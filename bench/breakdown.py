"""Where the time of a remote request goes: client marks + the request store's event stamps.

For one request the marks are, in order (c: client clock, s: server stamp, same machine):

    c t0            the `with` block starts (tracing)
    c encode_start  the session IR is built; encoding the request body starts
    c post          the POST leaves (after encoding)
    s RECEIVED      the ingress read, decoded and validated the body, and the store admitted it
    s QUEUED        the model replica got the segment call (from the session runner)
    s RUNNING #1    the replica took its lock and starts the first trace
    s RUNNING #k    the forward thread starts trace k (k > 1)
    s COMPLETED     the runner recorded the outcome and the result in the store
    c COMPLETED     the COMPLETED event (result inline) reached the client
    c t_end         values decoded and rebound in the caller's frame (or fetched, if large)
"""

from __future__ import annotations

from bench.stats import summary

# (key, label, what it contains)
PHASES = [
    ("client_tracing", "client: tracing", "the `with` block recording the IR (client CPU)"),
    ("client_encode", "client: encode body", "safetensors + JSON of the session"),
    ("http_ingress", "HTTP in + ingress", "POST through Serve's proxy to the ingress; read, decode and validate the body; admit in the request store"),
    ("runner", "ingress → session runner → replica", "handle call to the runner, which decodes the body again and calls the replica's run_segment"),
    ("queue", "replica queue", "waiting for the replica's one-forward-at-a-time lock"),
    ("traces_before_last", "replica: traces before the last", "engine + forward of all traces but the last (incl. the hop to the forward thread)"),
    ("last_trace_and_result", "replica: last trace + result", "last trace, result encoding, the reply to the runner, store.finish"),
    ("result_to_client", "COMPLETED → client", "the store wakes the ingress's SSE loop; event through the proxy to the client"),
    ("client_decode", "client: decode (+ fetch)", "decode the result, rebind names; for large results also GET /result"),
]


def phases(rec: dict, events: list[tuple[str, float, dict]]) -> dict[str, float] | None:
    """Phase -> milliseconds for one request, or None if a mark is missing."""
    try:
        times = {}
        running = [t for e, t, _ in events if e == "RUNNING"]
        times["RECEIVED"] = next(t for e, t, _ in events if e == "RECEIVED")
        times["QUEUED"] = next(t for e, t, _ in events if e == "QUEUED")
        times["COMPLETED"] = next(t for e, t, _ in events if e == "COMPLETED")
        arrived = next(t for e, t in rec["events"] if e == "COMPLETED")
        ms = lambda a, b: (b - a) * 1000
        return {
            "client_tracing": ms(rec["t0"], rec["encode_start"]),
            "client_encode": ms(rec["encode_start"], rec["post"]),
            "http_ingress": ms(rec["post"], times["RECEIVED"]),
            "runner": ms(times["RECEIVED"], times["QUEUED"]),
            "queue": ms(times["QUEUED"], running[0]),
            "traces_before_last": ms(running[0], running[-1]),
            "last_trace_and_result": ms(running[-1], times["COMPLETED"]),
            "result_to_client": ms(times["COMPLETED"], arrived),
            "client_decode": ms(arrived, rec["t_end"]),
            "total": ms(rec["t0"], rec["t_end"]),
        }
    except (KeyError, StopIteration, IndexError):
        return None


def summarize(records: list[dict], events: dict[str, list]) -> dict | None:
    """Median [min, max] per phase over the requests whose events were found."""
    rows = [p for r in records if r.get("id") in events for p in [phases(r, events[r["id"]])] if p]
    if not rows:
        return None
    return {key: summary([row[key] for row in rows], 2) for key in rows[0]}


def server_side(events: dict[str, list], ids: list[str]) -> dict | None:
    """For requests sent raw (no client marks): queue wait and replica time, from events only."""
    queue, replica, runner, n_events, n_queued = [], [], [], [], []
    for rid in ids:
        ev = events.get(rid)
        if not ev:
            continue
        n_events.append(len(ev))
        n_queued.append(sum(1 for e, _, _ in ev if e == "QUEUED"))
        t = {}
        for e, ts, _ in ev:
            t.setdefault(e, ts)
        if {"RECEIVED", "QUEUED", "RUNNING", "COMPLETED"} <= set(t):
            runner.append((t["QUEUED"] - t["RECEIVED"]) * 1000)
            queue.append((t["RUNNING"] - t["QUEUED"]) * 1000)
            replica.append((t["COMPLETED"] - t["RUNNING"]) * 1000)
    if not queue:
        return None
    return {"runner_ms": summary(runner, 2), "queue_ms": summary(queue, 2), "replica_and_result_ms": summary(replica, 2),
            "events_per_request": summary(n_events, 1), "queued_events_per_request": summary(n_queued, 1)}
