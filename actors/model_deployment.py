"""The model deployment: one Serve deployment per configured model.

Each replica loads its model once (pinned across the GPUs Ray gave it, or on the CPU) and runs
traces with the shared engine. Until cross-request batching lands, a replica runs one forward at a
time; the others wait in FIFO order and their queue position is reported as it changes. Values a
later trace needs are put in Ray's object store here and only their ObjectRefs travel on.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve

from actors.event_sender import EventSender as _EventSender
from actors.model_loader import load_model, placement, tokenizer_files
from actors.request_store import StoreClient, StoreSpec
from intervention.args import ArgError
from intervention.errors import Cancelled, location_dict
from intervention.events import LOG, QUEUED, RUNNING
from intervention.ir import TraceIR
from intervention.limits import MAX_LOG_CHARS, MAX_SAVED_BYTES, MAX_TRACE_BYTES, cap_log
from intervention.module_tree import module_tree
from intervention.order import record_order
from intervention.plan import Segment
from intervention.session import run_segment
from intervention.wire import encode_result


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
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
        self.lock = asyncio.Lock()  # one forward at a time; FIFO
        self.waiting: list[_EventSender] = []
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{self.name}")

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

    def stats(self) -> dict[str, int]:
        return {"waiting": len(self.waiting), "running": int(self.lock.locked())}

    async def run_segment(
        self,
        request_id: str,
        segment: Segment,  # validated at the ingress; passed as objects, not re-parsed
        n_traces: int,
        tensors: dict,
        imports: dict[int, ray.ObjectRef],
        saved_before: int = 0,
    ) -> dict[str, Any]:
        """Run consecutive traces of a session (all on this model) in order, in one go.
        `saved_before`: bytes the request's earlier segments saved (limits.max_saved_bytes is
        the request's, across segments).

        Values passed between these traces stay in this process; values that later segments need
        (`segment.exports`) go to the object store. Returns the saves (result bytes), those exports
        as ObjectRefs, and whether a stop ended the session; or an error."""
        events = _EventSender(self.store, request_id)
        self.waiting.append(events)
        if self.lock.locked() or len(self.waiting) > 1:  # only a request that waits is queued
            self._report_queue()
        try:
            async with self.lock:
                self.waiting.remove(events)
                if self.waiting:
                    self._report_queue()
                return await self._run(events, segment, n_traces, tensors, imports, saved_before)
        finally:
            if events in self.waiting:  # cancelled while queued
                self.waiting.remove(events)
                self._report_queue()

    async def _run(self, events, segment: Segment, n_traces: int, tensors, imports, saved_before: int) -> dict[str, Any]:
        values = await asyncio.gather(*imports.values())
        imported = dict(zip(imports, values, strict=True))
        emit = events.send  # called from the forward thread too

        def on_trace(index: int) -> None:
            emit(RUNNING, {"trace": index + 1, "of": n_traces, "model": self.name})

        cancel = threading.Event()
        job = asyncio.get_running_loop().run_in_executor(
            self.pool, lambda: run_segment(
                self.model, self.tokenizer, segment, imported, tensors,
                on_log=lambda m: emit(LOG, {"message": cap_log(m, self.max_log_chars)}), on_trace=on_trace,
                cancel=cancel, max_trace_bytes=self.max_trace_bytes,
                max_saved_bytes=self.max_saved_bytes - saved_before,
            )
        )
        try:
            outcome = await asyncio.shield(job)
        except asyncio.CancelledError:
            cancel.set()  # the forward stops at the next layer
            await asyncio.wait([job])
            raise
        finally:
            await events.flush()  # LOG events land before the caller reports the end
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
        }

    def _report_queue(self) -> None:
        """Tell waiting requests their position. Every move changes every position, so beyond the
        first few only round numbers are reported: O(n) events per move would make a long queue
        slower still (each event is work for the store and every open stream)."""
        ahead = 1 if self.lock.locked() else 0
        for pos, waiter in enumerate(self.waiting):
            position = pos + ahead
            if position < 4 or position % 8 == 0 or waiter is self.waiting[-1]:
                waiter.send(QUEUED, {"position": position, "model": self.name})


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
