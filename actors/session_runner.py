"""The session runner: executes a session's traces strictly in order, across model deployments.

Each accepted request becomes one asyncio task here (a Serve deployment, so it scales and restarts
like any other; the request's state lives in the request store, not in this process). Values one
trace exports to later traces are ObjectRefs created by the model replica: this runner only passes
them on, it never materializes them, and nothing of them reaches the ingress or the client.
Cancellation and the time limit cancel the running trace call, which stops its forward.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray import serve

from actors.request_store import get_store
from intervention.args import refs_in, walk
from intervention.ir import TraceIR
from intervention.wire import decode_session, merge_results


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class SessionRunner:
    def __init__(self, models: dict[str, Any], result_ttl_s: float = 3600.0):
        self.models = models  # name -> DeploymentHandle
        self.store = get_store(result_ttl_s)

    async def run(self, request_id: str, body: bytes, timeout_s: float) -> None:
        """Run the session; its outcome is recorded in the request store."""
        started = time.perf_counter()
        work = asyncio.ensure_future(self._run(request_id, body))
        cancel = asyncio.ensure_future(self.store.wait_cancel.remote(request_id))
        done, _ = await asyncio.wait({work, cancel}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            cancel.cancel()
            outcome = work.result()
            kind, data, result = outcome
            data["elapsed_s"] = round(time.perf_counter() - started, 4)
            await self.store.finish.remote(request_id, kind, data, result)
            return
        work.cancel()
        await asyncio.wait([work])
        if cancel in done:
            await self.store.finish.remote(request_id, "CANCELLED", {})
        else:
            cancel.cancel()
            message = f"the request ran longer than its time limit of {timeout_s:g} s and was stopped"
            await self.store.finish.remote(
                request_id, "ERROR", {"code": "timeout", "message": message, "location": None}
            )

    async def _run(self, request_id: str, body: bytes) -> tuple[str, dict, bytes | None]:
        session, tensors = decode_session(body)
        exports = session.exports()
        externals: dict[int, Any] = {}  # node id -> ObjectRef, owned by the replica that made it
        parts: list[bytes] = []
        traces_run = 0
        for first, traces in _segments(session.traces):
            last = first + len(traces)
            needed = _needed_after(session.traces, exports, first, last)
            response = self.models[traces[0].model].run_segment.remote(
                request_id, traces, first, len(session.traces),
                _blobs_of(traces, tensors),
                {k: externals[k] for t in traces for k in _refs_of(t) if k in externals},
                [sorted(exports[i]) for i in range(first, last)], sorted(needed),
            )
            try:
                out = await response
            except asyncio.CancelledError:
                response.cancel()  # stops the forward on the replica and frees it
                raise
            except Exception as exc:  # noqa: BLE001 - the replica died or Serve could not reach it
                return "ERROR", _replica_failure(traces[0], first, exc), None
            if "error" in out:
                return "ERROR", out["error"], None
            parts.append(out["saves"])
            externals.update(out["exports"])
            traces_run += out["traces_run"]
            if out["stopped"] == "session":
                break
        result = parts[0] if len(parts) == 1 else merge_results(parts)
        return "COMPLETED", {"bytes": len(result), "traces_run": traces_run}, result


def _segments(traces: list[TraceIR]) -> list[tuple[int, list[TraceIR]]]:
    """Runs of consecutive traces on the same model: each run is one call to one replica."""
    out: list[tuple[int, list[TraceIR]]] = []
    for i, trace in enumerate(traces):
        if out and out[-1][1][0].model == trace.model:
            out[-1][1].append(trace)
        else:
            out.append((i, [trace]))
    return out


def _needed_after(traces: list[TraceIR], exports: list[set[int]], first: int, last: int) -> set[int]:
    """Values made in traces [first, last) that traces from `last` on refer to."""
    made = set().union(*exports[first:last])
    used_later = {r for t in traces[last:] for r in _refs_of(t)}
    return made & used_later


def _refs_of(trace: TraceIR) -> set[int]:
    return {r for node in trace.nodes for r in refs_in(node.args, node.kwargs)}


def _blobs_of(traces: list[TraceIR], tensors: dict) -> dict:
    """Only the client tensors these traces use travel with them."""
    names = set()
    for trace in traces:
        names |= {b for n in trace.nodes for tag, b in walk([n.args, list(n.kwargs.values())]) if tag == "$tensor"}
        names |= {b for inv in trace.invokes for tag, b in walk(inv.input) if tag == "$tensor"}
    return {k: tensors[k] for k in names}


def _replica_failure(trace: TraceIR, index: int, exc: Exception) -> dict:
    message = (
        f"the replica of model '{trace.model}' failed while running the session (from trace {index + 1}) "
        f"({type(exc).__name__}); Serve restarts it: retry the request"
    )
    return {"code": "replica_failed", "message": message, "location": trace.loc and _loc(trace.loc), "trace": index + 1}


def _loc(loc) -> dict:
    return {"file": loc[0], "line": loc[1], "code": loc[2]}

