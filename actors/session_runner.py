"""The session runner: executes a session's traces strictly in order, across model deployments.

Each accepted request becomes one asyncio task here (a Serve deployment, so it scales and restarts
like any other; the request's state lives in the request store, not in this process). Values one
trace exports to later traces are ObjectRefs created by the model replica: this runner only passes
them on, it never materializes them, and nothing of them reaches the ingress or the client.
Cancellation and the time limit cancel the running trace call, which stops its forward.
A model replica that dies mid-session is retried once (RETRYING event) before the request fails;
the runner holds a lease on its requests in the store (renewed every HEARTBEAT_S), so requests of
a runner that died with its ingress are ended by the store instead of running forever.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from ray import serve

from actors.request_store import HEARTBEAT_S, StoreClient, StoreSpec, StoreUnavailable
from intervention.errors import location_dict
from intervention.events import CANCELLED, COMPLETED, ERROR, LOG, RETRYING
from intervention.ir import SessionIR
from intervention.plan import Segment, plan_session
from intervention.session import Outcome, SessionLoop
from intervention.wire import encode_result, merge_results


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class SessionRunner:
    def __init__(self, models: dict[str, Any], store: StoreSpec | None = None):
        self.models = models  # name -> DeploymentHandle
        self.store = StoreClient(store or StoreSpec())
        self.id = uuid.uuid4().hex  # this replica's lease on the requests it runs
        self.active = 0
        self.heartbeat: asyncio.Task | None = None
        self.users: dict[str, str] = {}  # request id -> its user, while it runs here

    async def run(self, request_id: str, session: SessionIR, tensors: dict, timeout_s: float, user: str = "") -> None:
        """Run the session (decoded and validated by the ingress); its outcome is recorded in
        the request store. `user`: whose request (model replicas serve users in turn)."""
        started = time.perf_counter()
        self.active += 1
        self.users[request_id] = user
        if self.heartbeat is None:
            self.heartbeat = asyncio.ensure_future(self._renew_lease())
        try:
            await self._supervise(request_id, session, tensors, timeout_s, started)
        finally:
            self.active -= 1
            self.users.pop(request_id, None)

    async def _supervise(self, request_id: str, session: SessionIR, tensors: dict, timeout_s: float,
                         started: float) -> None:
        work = asyncio.ensure_future(self._run_with_retry(request_id, session, tensors))
        cancel = asyncio.ensure_future(self._cancelled(request_id))
        done, _ = await asyncio.wait({work, cancel}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            cancel.cancel()
            outcome = work.result()
            kind, data, result = outcome
            data["elapsed_s"] = round(time.perf_counter() - started, 4)
            await self.store.call("finish", request_id, kind, data, result)
            return
        work.cancel()
        await asyncio.wait([work])
        if cancel in done:
            if cancel.result():  # else the request ended elsewhere (an orphan sweep): nothing to record
                await self.store.call("finish", request_id, CANCELLED, {})
        else:
            cancel.cancel()
            message = f"the request ran longer than its time limit of {timeout_s:g} s and was stopped"
            await self.store.call(
                "finish", request_id, ERROR, {"code": "timeout", "message": message, "location": None}
            )

    async def _cancelled(self, request_id: str) -> bool:
        """True once a cancel is requested; False once the request has ended elsewhere."""
        try:
            return await self.store.call("watch", request_id, self.id)
        except StoreUnavailable:
            await asyncio.Event().wait()  # without a store only the time limit stops the work
            raise AssertionError("unreachable") from None

    async def _renew_lease(self) -> None:
        """Tell the store this replica is alive while it runs requests: its requests are orphans
        (ended by the store) once the renewals stop."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if self.active:
                try:
                    await self.store.call("heartbeat", self.id)
                except StoreUnavailable:
                    pass

    async def _run_with_retry(self, request_id: str, session: SessionIR, tensors: dict) -> tuple[str, dict, bytes | None]:
        """A model replica that dies mid-session is retried once, from the first trace (traces have
        no side effects; values exported by the dead replica are gone with it)."""
        try:
            return await self._run(request_id, session, tensors)
        except _ReplicaFailed as failed:
            reason = {"code": "replica_failed", "model": failed.error["model"], "attempt": 2}
            await self.store.call("add_event", request_id, RETRYING, reason)
        try:
            return await self._run(request_id, session, tensors)
        except _ReplicaFailed as failed:
            return ERROR, failed.error, None

    async def _run(self, request_id: str, session: SessionIR, tensors: dict) -> tuple[str, dict, bytes | None]:
        plan = plan_session(session)
        logs: list[str] = []  # the session steps' log lines, sent before the next segment starts
        # Its values: ObjectRefs, owned by the replicas that made them.
        loop = SessionLoop(plan, on_log=logs.append, tensors=tensors)
        parts: list[bytes] = []
        while True:
            item = loop.next_segment()
            for message in logs:  # one by one, in order, before any later trace's events
                await self.store.call("add_event", request_id, LOG, {"message": message})
            logs.clear()
            if item is None:
                break
            segment, imports = item
            blobs = tensors if segment.blobs is None else {k: tensors[k] for k in segment.blobs}
            saved_before = sum(len(part) for part in parts)  # the cap on saves is the request's
            response = self.models[segment.model].run_segment.remote(
                request_id, segment, plan.n_traces, blobs, imports, saved_before, self.users.get(request_id, "")
            )
            try:
                out = await response
            except asyncio.CancelledError:
                response.cancel()  # stops the forward on the replica and frees it
                raise
            except Exception as exc:
                raise _ReplicaFailed(_replica_failure(segment, exc)) from exc
            if "error" in out:
                return ERROR, out["error"], None
            parts.append(out["saves"])
            loop.record_segment(Outcome(exports=out["exports"], stopped=out["stopped"], traces_run=out["traces_run"]))
        result = parts[0] if len(parts) == 1 else merge_results(parts) if parts else encode_result({})
        return COMPLETED, {"bytes": len(result), "traces_run": loop.outcome.traces_run}, result


class _ReplicaFailed(Exception):
    def __init__(self, error: dict):
        super().__init__(error["message"])
        self.error = error


def _replica_failure(segment: Segment, exc: Exception) -> dict:
    trace, index = segment.traces[0], segment.first
    message = (
        f"the replica of model '{trace.model}' failed while running the session (from trace {index + 1}) "
        f"({type(exc).__name__}), also when retried once; Serve restarts it: retry the request later"
    )
    return {"code": "replica_failed", "message": message, "location": location_dict(trace.loc), "trace": index + 1,
            "model": trace.model}
