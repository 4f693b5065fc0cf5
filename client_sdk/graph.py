"""The recorder: what a session's `with` blocks record, as IR.

A `Graph` collects one session's traces: every operation on an envoy or a proxy becomes a node of
the open trace, client tensors become blobs, `.save()` marks what comes back. It never runs
anything: the tracing contexts hand the finished graph to a backend (local or remote), then give
each saved proxy its value (`resolve`).
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import torch

from client_sdk.location import user_location
from client_sdk.proxy import Proxy, TracingError
from intervention import args as argcodec
from intervention.ir import Location, Node, SessionIR, TraceIR
from intervention.validate import CALL_OPS, check_node_alone

_local = threading.local()


def current_graph() -> Graph | None:
    """The graph of the session being recorded in this thread, if any."""
    return getattr(_local, "graph", None)


def set_current_graph(graph: Graph | None) -> None:
    _local.graph = graph


class OpenTrace(Protocol):
    """What the recorder needs of the trace being recorded (client_sdk.tracing.Tracer)."""

    ir: TraceIR
    invoke_index: int | None
    call_index: int
    model: Any


class Graph:
    """Everything one session records: traces, nodes, client tensors, saved proxies."""

    def __init__(self) -> None:
        self.traces: list[TraceIR] = []
        self.tensors: dict[str, torch.Tensor] = {}
        # id(tensor) -> (blob name, the tensor). Holding the tensor keeps its id from being reused
        # by a later temporary, which would otherwise silently send the earlier tensor's values.
        self._tensor_names: dict[int, tuple[str, torch.Tensor]] = {}
        self.saved: dict[int, Proxy] = {}
        self.proxies: list[Proxy] = []
        self.models: dict[str, Any] = {}  # name in the IR -> the LanguageModel it came from
        self.tracer: OpenTrace | None = None
        self.stopped_at: int | None = None  # traces from this index on are not run
        self.next_id = 0
        self.done = False

    @staticmethod
    def location_now() -> Location:
        return user_location()

    # -- recording -----------------------------------------------------------------------------

    # The three ways to record a node. They repeat a few lines on purpose: one of them runs for
    # every operation a trace records, and a shared helper call costs as much as those lines.

    def record(self, op: str, args: list, kwargs: dict | None = None) -> Proxy:
        """Record `op` on `args` (Python values: proxies, tensors, literals) in the open trace."""
        tracer = self.tracer
        if tracer is None or self.done:
            self._closed(op, args)
        loc = user_location(3)  # user code -> a proxy's operator (or envoy, ...) -> record -> here
        try:  # `self.encode(args, loc)`, its fast path inline: this runs for every operation
            encoded = argcodec.encode_list(args, self._store_tensor, self._ref_of, Proxy)
        except argcodec.ArgError:
            encoded = self.encode(args, loc)
        node = Node(self.next_id, op, encoded, self.encode(kwargs, loc) if kwargs else {}, tracer.invoke_index, loc)
        if op in CALL_OPS:
            check_node_alone(node)  # a refused call fails here, at the user's line
        self.next_id += 1
        tracer.ir.nodes.append(node)
        proxy = Proxy(self, node.id, loc)
        self.proxies.append(proxy)
        return proxy

    def record_encoded(self, op: str, args: list) -> Proxy:
        """`record` for arguments that are JSON already (a module path and a call index): the
        most common nodes, so they skip encoding."""
        tracer = self.tracer
        if tracer is None or self.done:
            self._closed(op, args)
        loc = user_location(4)  # user code -> Envoy.output -> Envoy._record -> record_encoded -> here
        node = Node(self.next_id, op, args, {}, tracer.invoke_index, loc)
        self.next_id += 1
        tracer.ir.nodes.append(node)
        proxy = Proxy(self, node.id, loc)
        self.proxies.append(proxy)
        return proxy

    def record_save(self, proxy: Proxy) -> None:
        """`proxy.save()`: a save node, and the proxy's value comes back after the run."""
        tracer = self.tracer
        if tracer is None or self.done:
            self._closed("save", [proxy])
        loc = user_location(3)  # user code -> Proxy.save -> record_save -> here
        node = Node(self.next_id, "save", [{"$ref": proxy._id}], {}, tracer.invoke_index, loc)
        self.next_id += 1
        tracer.ir.nodes.append(node)
        self.saved[proxy._id] = proxy

    def _closed(self, op: str, args: list) -> None:
        """Raise why nothing can be recorded now."""
        for a in args if self.done else ():  # a proxy used after its session ran: say why
            if isinstance(a, Proxy) and a._graph is self:
                raise a._unavailable()
        raise TracingError(f"'{op}' must be used inside a trace (a `with model.trace(...)` block)", user_location())

    def encode(self, value: Any, loc: Location) -> Any:
        try:
            try:
                if type(value) is list:  # a node's argument list: the fast path
                    return argcodec.encode_list(value, self._store_tensor, self._ref_of, Proxy)
                encoded = argcodec.encode(value, self._store_tensor, self._ref_of)
            except argcodec.ArgError:
                # Saved proxies of earlier sessions cannot be encoded as they are, only as their
                # values. Substituting them only when encoding failed keeps every other value
                # (this runs for each recorded operation) to one pass; storing tensors is idempotent.
                encoded = argcodec.encode(_saved_values(value, self), self._store_tensor, self._ref_of)
        except argcodec.ArgError as exc:
            raise TracingError(str(exc), loc) from None
        return encoded["$dict"] if isinstance(value, dict) else encoded

    def _store_tensor(self, t: torch.Tensor) -> str:
        entry = self._tensor_names.get(id(t))
        if entry is not None and entry[1] is t:
            return entry[0]
        name = f"t{len(self.tensors)}"
        self._tensor_names[id(t)] = (name, t)
        self.tensors[name] = t.detach().cpu().contiguous()
        return name

    def _ref_of(self, value: Any) -> int | None:
        if not isinstance(value, Proxy):
            return None
        if value._graph is self:
            return value._id
        if value._state == "ready":  # a saved value of an earlier session: send its value
            return None
        raise value._unavailable()

    def model_name(self, model: Any) -> str:
        name = model.name
        while self.models.setdefault(name, model) is not model:
            name += "'"  # two local models from the same folder, e.g. different dtypes
        return name

    def session_ir(self) -> SessionIR:
        traces = self.traces if self.stopped_at is None else self.traces[: self.stopped_at]
        return SessionIR(traces=traces)

    # -- after the run -------------------------------------------------------------------------

    def resolve(self, saves: dict[int, Any]) -> None:
        """Give saved proxies their values; every other proxy says why it has none."""
        self.done = True
        for proxy in self.proxies:
            if proxy._id in saves and proxy._id in self.saved:
                proxy._value, proxy._state = saves[proxy._id], "ready"
            elif proxy._id in self.saved:
                proxy._state = "not_run"
            else:
                proxy._state = "unsaved"
        self._release_proxies()

    def abandon(self) -> None:
        self.done = True
        for proxy in self.proxies:
            proxy._state = "unsaved"
        self._release_proxies()

    def _release_proxies(self) -> None:
        """Proxies point at their graph and the graph at them: a reference cycle that only
        Python's cyclic collector frees, so every finished session left its graph, nodes and
        proxies to it (~10 objects per operation), and those collections grew costlier than the
        traces themselves. Once the proxies have their final state the graph needs them no more."""
        self.proxies = []
        self.saved = {}


def _saved_values(value: Any, graph: Graph) -> Any:
    """`value` with the saved proxies of earlier sessions replaced by their values, which are
    sent like any client value (a proxy kept where rebinding does not reach, e.g. an attribute)."""
    if isinstance(value, Proxy):
        return value._value if value._graph is not graph and value._state == "ready" else value
    if type(value) in (list, tuple):
        return type(value)(_saved_values(v, graph) for v in value)
    if type(value) is dict:
        return {k: _saved_values(v, graph) for k, v in value.items()}
    if type(value) is slice:
        return slice(*(_saved_values(v, graph) for v in (value.start, value.stop, value.step)))
    return value
