"""The model deployment: one Serve deployment per configured model.

Each replica loads its model once (pinned across the GPUs Ray gave it, or on the CPU) and runs
traces with the shared engine, batching the traces of every request and user that wait for it into
one forward (actors/batcher.py; fair order per user), one batch at a time. Values a later trace
needs are put in Ray's object store here and only their ObjectRefs travel on.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve

from actors.batcher import Batcher
from actors.event_sender import EventSender
from actors.model_loader import load_model, placement, tokenizer_files
from actors.request_store import StoreClient, StoreSpec
from intervention.args import ArgError
from intervention.batching import BATCH_WAIT_MS, MAX_BATCH_SIZE, MAX_BATCH_TOKENS, BatchLimits
from intervention.errors import Cancelled, InterventionError, location_dict
from intervention.events import LOG, QUEUED, RUNNING
from intervention.ir import TraceIR
from intervention.limits import MAX_LOG_CHARS, MAX_SAVED_BYTES, MAX_TRACE_BYTES, cap_log
from intervention.module_tree import module_tree
from intervention.order import record_order
from intervention.plan import Segment
from intervention.program import ProgramResult
from intervention.session import SegmentLoop
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
        """Run consecutive traces of a session (all on this model) in order, each in a batch with
        other requests' traces (batcher.py). `saved_before`: bytes the request's earlier segments
        saved (limits.max_saved_bytes is the request's, across segments). `user`: whose request,
        for the fair order.

        Values passed between these traces stay in this process; values that later segments need
        (`segment.exports`) go to the object store. Returns the saves (result bytes), those exports
        as ObjectRefs, whether a stop ended the session, and the numbers of the batches its traces
        ran in; or an error."""
        events = EventSender(self.store, request_id)
        emit = events.send  # called from the forward thread too (LOG)
        cancel = threading.Event()
        batches: list[int] = []

        def on_log(message: str) -> None:
            emit(LOG, {"message": cap_log(message, self.max_log_chars)})

        def on_queued(position: int) -> None:
            emit(QUEUED, {"position": position, "model": self.name})

        try:
            values = await asyncio.gather(*imports.values())
            loop = SegmentLoop(segment, dict(zip(imports, values, strict=True)))
            budget, saved = self.max_saved_bytes - saved_before, 0
            while (work := loop.next_trace()) is not None:
                try:
                    program = work.program(tensors, on_log=on_log, cancel=cancel,
                                           max_trace_bytes=self.max_trace_bytes, max_saved_bytes=budget - saved)
                except InterventionError as err:
                    loop.record_trace(ProgramResult(error=err))
                    continue

                def on_start(batch: int, size: int, index: int = work.index) -> None:
                    batches.append(batch)
                    emit(RUNNING, {"trace": index + 1, "of": n_traces, "model": self.name,
                                   "batch": batch, "batch_size": size})

                result = await self.batcher.run(user, program, on_start, on_queued)
                saved += program.saved_bytes
                loop.record_trace(result)
        except asyncio.CancelledError:
            cancel.set()  # its program stops at its next operation; the batch goes on for the others
            raise
        finally:
            await events.flush()  # LOG events land before the caller reports the end
        outcome = loop.outcome
        if outcome.error is not None:
            if isinstance(outcome.error, Cancelled):
                return {"error": {"code": "cancelled", "message": "cancelled", "location": None}}
            return {"error": {**outcome.error.to_dict(), "trace": outcome.error_trace + 1}}
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
