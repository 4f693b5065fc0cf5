"""The model deployment: one Serve deployment per configured model.

Each replica loads its model once (pinned across the GPUs Ray gave it, or on the CPU) and runs
traces with the shared engine. Until cross-request batching lands, a replica runs one forward at a
time; the others wait in FIFO order and their queue position is reported as it changes. Values a
later trace needs are put in Ray's object store here and only their ObjectRefs travel on.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve

from actors.model_loader import load_model, placement, tokenizer_files
from actors.request_store import get_store
from intervention.args import ArgError
from intervention.engine import Cancelled, run_trace
from intervention.errors import InterventionError
from intervention.inputs import prepare_batch
from intervention.ir import TraceIR
from intervention.module_tree import module_tree
from intervention.order import record_order
from intervention.wire import encode_result


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
class ModelDeployment:
    def __init__(self, spec: dict[str, Any], result_ttl_s: float = 3600.0):
        self.name = spec["name"]
        self.path = spec["path"]
        self.dtype = spec.get("dtype", "float32")
        self.model, self.tokenizer = load_model(self.path, self.dtype)
        self.tree = module_tree(self.model)
        self.order = record_order(self.model, self.tokenizer)
        self.store = get_store(result_ttl_s)
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
        traces: list[TraceIR],  # validated at the ingress; passed as objects, not re-parsed
        first: int,
        count: int,
        tensors: dict,
        externals: dict[int, ray.ObjectRef],
        keeps: list[list[int]],
        out_keep: list[int],
    ) -> dict[str, Any]:
        """Run consecutive traces of a session (all on this model) in order, in one go.

        Values passed between these traces stay in this process; values that traces after the
        segment need (`out_keep`) go to the object store. Returns the saves (result bytes), those
        exports as ObjectRefs, and whether a stop ended the session; or an error."""
        events = _EventSender(self.store, request_id)
        self.waiting.append(events)
        if self.lock.locked() or len(self.waiting) > 1:  # only a request that waits is queued
            self._report_queue()
        try:
            async with self.lock:
                self.waiting.remove(events)
                if self.waiting:
                    self._report_queue()
                events.send("RUNNING", {"trace": first + 1, "of": count, "model": self.name})
                return await self._run(events, traces, first, count, tensors, externals, keeps, set(out_keep))
        finally:
            if events in self.waiting:  # cancelled while queued
                self.waiting.remove(events)
                self._report_queue()

    async def _run(self, events, traces, first, count, tensors, externals, keeps, out_keep) -> dict[str, Any]:
        values = await asyncio.gather(*externals.values())
        ext = dict(zip(externals, values, strict=True))
        emit = events.send  # called from the forward thread too

        cancel = threading.Event()
        job = asyncio.get_running_loop().run_in_executor(
            self.pool, self._forward, traces, first, count, tensors, ext, keeps, emit, cancel
        )
        try:
            outcome = await asyncio.shield(job)
        except asyncio.CancelledError:
            cancel.set()  # the forward stops at the next module boundary
            await asyncio.wait([job])
            raise
        finally:
            await asyncio.gather(*events.sent)  # LOG events land before the caller reports the end
        if "error" in outcome:
            return outcome
        values = outcome.pop("values")
        outcome["exports"] = {i: ray.put(values[i]) for i in out_keep if i in values}
        return outcome

    def _forward(self, traces, first, count, tensors, externals, keeps, emit, cancel) -> dict[str, Any]:
        saves: dict[int, Any] = {}
        values = dict(externals)
        stopped = None
        for k, trace in enumerate(traces):
            if k:
                emit("RUNNING", {"trace": first + k + 1, "of": count, "model": self.name})
            try:
                batch, spans = prepare_batch(self.tokenizer, trace, tensors)
                result = run_trace(
                    self.model, trace, batch, spans, tensors=tensors, externals=values,
                    keep=set(keeps[k]), on_log=lambda m: emit("LOG", {"message": m}), cancel=cancel,
                )
            except InterventionError as err:
                return {"error": {**err.to_dict(), "trace": first + k + 1}}
            except Cancelled:
                return {"error": {"code": "cancelled", "message": "cancelled", "location": None}}
            saves.update(result.saves)
            values.update(result.exports)
            if result.stopped == "session":
                stopped = "session"
                break
        try:
            data = encode_result(saves)
        except ArgError:
            return {"error": _unsendable(traces, saves)}
        return {"saves": data, "values": values, "stopped": stopped, "traces_run": k + 1}

    def _report_queue(self) -> None:
        """Tell waiting requests their position. Every move changes every position, so beyond the
        first few only round numbers are reported: O(n) events per move would make a long queue
        slower still (each event is work for the store and every open stream)."""
        ahead = 1 if self.lock.locked() else 0
        for pos, waiter in enumerate(self.waiting):
            position = pos + ahead
            if position < 4 or position % 8 == 0 or waiter is self.waiting[-1]:
                waiter.send("QUEUED", {"position": position, "model": self.name})


class _EventSender:
    """One segment call's events to the request store, numbered: the store is an async actor, so
    calls may start out of order; it puts numbered events back in order (LOGs stay in order)."""

    def __init__(self, store: Any, request_id: str):
        self.store, self.request_id = store, request_id
        self.source = uuid.uuid4().hex
        self.numbers = itertools.count()  # next() is atomic: the forward thread sends too
        self.sent: list[ray.ObjectRef] = []

    def send(self, kind: str, data: dict) -> None:
        order = (self.source, next(self.numbers))
        self.sent.append(self.store.add_event.remote(self.request_id, kind, data, order))


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
                "location": {"file": loc[0], "line": loc[1], "code": loc[2]} if loc else None,
            }
    return {"code": "unsendable_value", "message": "a saved value cannot be sent back from the cluster", "location": None}
