"""The session runner: executes a session's traces strictly in order, across model deployments.

Sessions whose traces use several models run here (one on a single model goes straight from the
ingress to that model's replica, which runs it the same way: actors/supervisor.py). Each becomes
one asyncio task (a Serve deployment, so it scales and restarts like any other; the request's
state lives in the request store, not in this process). Values one trace exports to later traces
are ObjectRefs created by the model replica: this runner only passes them on, it never
materializes them, and nothing of them reaches the ingress or the client. A model replica that
dies mid-session is retried once (RETRYING event) before the request fails.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from actors.request_store import StoreClient, StoreSpec
from actors.supervisor import Outcome, Supervisor, replica_failure
from intervention.events import COMPLETED, ERROR, LOG, RETRYING
from intervention.ir import SessionIR
from intervention.plan import plan_session
from intervention.session import Outcome as LoopOutcome
from intervention.session import SessionLoop
from intervention.wire import encode_result, merge_results


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class SessionRunner:
    def __init__(self, models: dict[str, Any], store: StoreSpec | None = None):
        self.models = models  # name -> DeploymentHandle
        self.store = StoreClient(store or StoreSpec())
        self.supervisor = Supervisor(self.store)
        self.users: dict[str, str] = {}  # request id -> its user, while it runs here

    async def run(self, request_id: str, session: SessionIR, tensors: dict, timeout_s: float, user: str = "") -> None:
        """Run the session (decoded and validated by the ingress); its outcome is recorded in
        the request store. `user`: whose request (model replicas serve users in turn)."""
        self.users[request_id] = user
        try:
            await self.supervisor.run(request_id, self._run_with_retry(request_id, session, tensors), timeout_s)
        finally:
            self.users.pop(request_id, None)

    async def _run_with_retry(self, request_id: str, session: SessionIR, tensors: dict) -> Outcome:
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

    async def _run(self, request_id: str, session: SessionIR, tensors: dict) -> Outcome:
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
                raise _ReplicaFailed(replica_failure(segment.traces[0], segment.first, exc)) from exc
            if "error" in out:
                return ERROR, out["error"], None
            parts.append(out["saves"])
            loop.record_segment(LoopOutcome(exports=out["exports"], stopped=out["stopped"],
                                            traces_run=out["traces_run"]))
        result = parts[0] if len(parts) == 1 else merge_results(parts) if parts else encode_result({})
        return COMPLETED, {"bytes": len(result), "traces_run": loop.outcome.traces_run}, result


class _ReplicaFailed(Exception):
    def __init__(self, error: dict):
        super().__init__(error["message"])
        self.error = error
