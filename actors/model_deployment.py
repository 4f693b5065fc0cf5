"""The model deployment: one Serve deployment per configured model.

Each replica loads its model once (pinned across the GPUs Ray gave it, or on the CPU) and runs
traces with the shared engine, batching the traces of every request and user that wait for it into
one forward (actors/batcher.py; fair order per user), one batch at a time. A session on this model
alone comes straight from the ingress and runs here whole (`run_session`: its values never leave
this process); for a session across models the session runner sends each segment (`run_segment`),
and values a later segment needs are put in Ray's object store here: only their ObjectRefs travel.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve

from actors.batcher import Batcher
from actors.event_sender import EventSender
from actors.model_loader import load_model, placement, tokenizer_files
from actors.request_store import StoreClient, StoreSpec
from actors.supervisor import Outcome, Supervisor
from intervention import timeline
from intervention.args import ArgError
from intervention.batching import BATCH_WAIT_MS, MAX_BATCH_SIZE, MAX_BATCH_TOKENS, BatchLimits
from intervention.errors import Cancelled, InterventionError, location_dict
from intervention.events import COMPLETED, ERROR, LOG, QUEUED, RUNNING
from intervention.ir import SessionIR, TraceIR
from intervention.limits import MAX_LOG_CHARS, MAX_SAVED_BYTES, MAX_TRACE_BYTES, cap_log
from intervention.module_tree import module_tree
from intervention.order import record_order
from intervention.plan import Segment, plan_session
from intervention.program import Program, ProgramResult
from intervention.session import Outcome as LoopOutcome
from intervention.session import SegmentLoop, SessionLoop
from intervention.wire import encode_result


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
class ModelDeployment:
    def __init__(self, spec: dict[str, Any], store: StoreSpec | None = None):
        self.name = spec["name"]
        self.path = spec["path"]
        self.dtype = spec.get("dtype", "float32")
        self.max_trace_bytes = spec.get("max_trace_bytes", MAX_TRACE_BYTES)
        self.max_saved_bytes = spec.get("max_saved_bytes", MAX_SAVED_BYTES)
        self.max_log_chars = spec.get("max_log_chars", MAX_LOG_CHARS)
        self.model, self.tokenizer = load_model(self.path, self.dtype)
        self.tree = module_tree(self.model)
        self.order = record_order(self.model, self.tokenizer)
        self.store = StoreClient(store or StoreSpec())
        self.supervisor = Supervisor(self.store)  # for sessions sent straight here (run_session)
        self.sessions: set[asyncio.Task] = set()  # those running (each apart from its call: run_session)
        # One forward thread: batches run one at a time, each holding many requests' traces.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{self.name}")
        limits = BatchLimits(spec.get("max_batch_size", MAX_BATCH_SIZE), spec.get("max_batch_tokens", MAX_BATCH_TOKENS),
                             spec.get("batch_wait_ms", BATCH_WAIT_MS))
        self.batcher = Batcher(self.model, self.tokenizer, limits, self.pool)

    def info(self) -> dict[str, Any]:
        """Everything a client needs instead of the Hub: module tree, config, tokenizer."""
        return {
            "name": self.name,
            "module_tree": self.tree,
            "config": self.model.config.to_dict(),
            "tokenizer_files": tokenizer_files(self.path),
            "dtype": self.dtype,
            "placement": placement(self.model),
            "module_order": [list(e) for e in self.order],
        }

    def stats(self) -> dict[str, Any]:
        """Traces waiting and running here (GET /v1/models shows them), batches so far and how
        many programs each had."""
        return self.batcher.stats()

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve's per-replica hook: `GET /v1/models` sums every replica's stats through it and
        lists the nodes they run on (serve_app/replicas.py); a handle call reaches one replica."""
        return {**self.stats(), "node_id": ray.get_runtime_context().get_node_id()}

    async def run_segment(
        self,
        request_id: str,
        segment: Segment,  # validated at the ingress; passed as objects, not re-parsed
        n_traces: int,
        tensors: dict,
        imports: dict[int, ray.ObjectRef],
        saved_before: int = 0,
        user: str = "",
    ) -> dict[str, Any]:
        """Run consecutive traces of a session (all on this model) in order, for the session
        runner. `saved_before`: bytes the request's earlier segments saved (limits.max_saved_bytes
        is the request's, across segments). `user`: whose request, for the fair order.

        Values passed between these traces stay in this process; values that later segments need
        (`segment.exports`) go to the object store. Returns the saves (result bytes), those exports
        as ObjectRefs, whether a stop ended the session, and the numbers of the batches its traces
        ran in; or an error."""
        events = EventSender(self.store, request_id)
        batches: list[int] = []
        try:
            values = await asyncio.gather(*imports.values())
            with self.batcher.request():
                outcome, _ = await self._segment(segment, n_traces, tensors, dict(zip(imports, values, strict=True)),
                                                 self.max_saved_bytes - saved_before, user, events, batches)
        finally:
            await events.flush()  # LOG events land before the caller reports the end
        if outcome.error is not None:
            return {"error": _error(outcome)}
        try:
            data = encode_result(outcome.saves)
        except ArgError:
            return {"error": _unsendable(segment.traces, outcome.saves)}
        return {
            "saves": data,
            "exports": {i: ray.put(v) for i, v in outcome.exports.items()},
            "stopped": outcome.stopped,
            "traces_run": outcome.traces_run,
            "batches": batches,
        }

    async def run_session(self, request_id: str, session: SessionIR, tensors: dict, timeout_s: float,
                          user: str = "", inline_limit: int = 0) -> dict[str, Any] | None:
        """Run a whole session whose traces all use this model, sent straight from the ingress
        (no session runner: one hop and one process fewer), and record its end in the request
        store; values between its traces never leave this process. Returns the end as the store
        records it, mostly before it does ("recorded" False; see actors/supervisor.py: a blocking
        client's stream sends it without asking the store), or None when the request had ended
        elsewhere. The ingress may send it before the store has admitted it (the store holds
        this replica's calls for it until then).

        The session runs apart from this call: the request must outlive the ingress that sent it
        (its end goes to the store), and a call by value (gRPC, serve_app/ingress.py) is
        cancelled when its caller dies. What stops a session is the store (a cancel, a refused
        admission: both reach the replica through its claim) and the time limit."""
        timeline.mark(request_id, "replica.start")
        events = EventSender(self.store, request_id)
        work = self._session(session, tensors, user, events)
        run = asyncio.ensure_future(self.supervisor.run(request_id, work, timeout_s, events=events,
                                                        inline_limit=inline_limit, answer_first=True))
        self.sessions.add(run)
        run.add_done_callback(self.sessions.discard)
        end = await asyncio.shield(run)
        timeline.mark(request_id, "replica.answered")
        return end

    async def _session(self, session: SessionIR, tensors: dict, user: str, events: EventSender) -> Outcome:
        plan = plan_session(session)
        loop = SessionLoop(plan, on_log=lambda message: self._log(events, message), tensors=tensors)
        saved = 0
        with self.batcher.request():
            while (item := loop.next_segment()) is not None:
                segment, imports = item
                outcome, size = await self._segment(segment, plan.n_traces, tensors, imports,
                                                    self.max_saved_bytes - saved, user, events, [])
                saved += size
                loop.record_segment(outcome)
        outcome = loop.outcome
        if outcome.error is not None:
            return ERROR, _error(outcome), None
        try:
            result = encode_result(outcome.saves)
        except ArgError:
            return ERROR, _unsendable(session.traces, outcome.saves), None
        return COMPLETED, {"bytes": len(result), "traces_run": outcome.traces_run}, result

    async def _segment(self, segment: Segment, n_traces: int, tensors: dict, imports: dict[int, Any],
                       budget: int, user: str, events: EventSender, batches: list[int]) -> tuple[LoopOutcome, int]:
        """A segment's traces in order, each in a batch with other requests' traces (batcher.py),
        saving at most `budget` bytes in all. Returns its outcome and the bytes its traces saved;
        the numbers of the batches they ran in are appended to `batches`."""
        traces = _Traces(self, SegmentLoop(segment, imports), n_traces, tensors, budget, events, batches)
        try:
            await self.batcher.run_chain(user, traces)
        except asyncio.CancelledError:
            traces.cancel.set()  # its program stops at its next operation; the batch goes on for the others
            raise
        return traces.loop.outcome, traces.saved

    def _log(self, events: EventSender, message: str) -> None:
        events.send(LOG, {"message": cap_log(message, self.max_log_chars)})


class _Traces:
    """A segment's traces as the batcher's chain (actors/batcher.py): each one's program made
    when the ones before it have run, in the event loop or the forward thread; the events they
    send (RUNNING, QUEUED, LOG) may come from either."""

    def __init__(self, replica: ModelDeployment, loop: SegmentLoop, n_traces: int, tensors: dict, budget: int,
                 events: EventSender, batches: list[int]):
        self.replica, self.loop, self.n_traces, self.tensors = replica, loop, n_traces, tensors
        self.budget, self.saved = budget, 0
        self.events, self.batches = events, batches
        self.cancel = threading.Event()

    def next(self) -> tuple[Program, Callable[[int, int], None]] | None:
        while not self.cancel.is_set() and (work := self.loop.next_trace()) is not None:
            try:
                program = work.program(self.tensors, on_log=self._log, cancel=self.cancel,
                                       max_trace_bytes=self.replica.max_trace_bytes,
                                       max_saved_bytes=self.budget - self.saved)
            except InterventionError as err:
                self.loop.record_trace(ProgramResult(error=err))
                continue
            return program, functools.partial(self._on_start, work.index)
        return None

    def record(self, program: Program, result: ProgramResult) -> None:
        self.saved += program.saved_bytes
        self.loop.record_trace(result)

    def on_queued(self, position: int) -> None:
        self.events.send(QUEUED, {"position": position, "model": self.replica.name})

    def _on_start(self, index: int, batch: int, size: int) -> None:
        self.batches.append(batch)
        self.events.send(RUNNING, {"trace": index + 1, "of": self.n_traces, "model": self.replica.name,
                                   "batch": batch, "batch_size": size})

    def _log(self, message: str) -> None:
        self.replica._log(self.events, message)


def _error(outcome: LoopOutcome) -> dict[str, Any]:
    """The ERROR event's data for a segment or session that failed."""
    if isinstance(outcome.error, Cancelled):
        return {"code": "cancelled", "message": "cancelled", "location": None}
    return {**outcome.error.to_dict(), "trace": outcome.error_trace + 1}


def _unsendable(traces: list[TraceIR], saves: dict[int, Any]) -> dict[str, Any]:
    """The error for a saved value the wire cannot carry (e.g. a layer's .inputs holding a KV
    cache object), at the line that saved it. Locally such a value comes back as is."""
    locs = {n.id: n.loc for t in traces for n in t.nodes}
    for node_id, value in saves.items():
        try:
            encode_result({node_id: value})
        except ArgError as exc:
            loc = locs.get(node_id)
            return {
                "code": "unsendable_value",
                "message": f"this saved value cannot be sent back from the cluster ({exc}): save the tensors in it instead",
                "location": location_dict(loc),
            }
    return {"code": "unsendable_value", "message": "a saved value cannot be sent back from the cluster", "location": None}
