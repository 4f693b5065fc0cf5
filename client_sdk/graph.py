"""The recorder: what a session's `with` blocks record, as IR.

A `Graph` collects one session's traces: every operation on an envoy or a proxy becomes a node of
the open trace, client tensors become blobs, `.save()` marks what comes back. It never runs
anything: the tracing contexts hand the finished graph to a backend (local or remote), then give
each saved proxy its value (`resolve`).
"""

from __future__ import annotations

import math
import sys
import threading
from typing import Any, Protocol

import torch

from client_sdk.location import SITES, user_location
from client_sdk.proxy import Proxy, TracingError
from intervention import args as argcodec
from intervention.ir import Location, Node, SessionIR, SessionStep, TraceIR
from intervention.order import ranks_by_kind
from intervention.program import Recording
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
    recording: Recording | None  # its steps compiled as recorded (local runs; see Graph.open)


class Graph:
    """Everything one session records: traces, nodes, client tensors, saved proxies."""

    def __init__(self, compiled: bool = False) -> None:
        """`compiled`: the session runs in this process, so each trace is compiled for the engine
        as it is recorded (`recordings`), sparing the engine a pass over its IR and the decoding
        of the arguments the recorder knew already."""
        self.traces: list[TraceIR] = []
        self.steps: list[SessionStep] = []  # logs and stops in the session body, between traces
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
        # Lazy subscripts (see `subscript`): those of the open trace, and the in-place op on one
        # that waits to see whether Python's setitem of an augmented assignment follows.
        self._lazies: list[Proxy] = []
        self._pending: Proxy | None = None
        # id(TraceIR) -> its steps, compiled as its nodes are recorded (intervention.program's
        # Recording), for a session run in this process; None: nothing compiled here (remote).
        self.recordings: dict[int, Recording] | None = {} if compiled else None

    @staticmethod
    def location_now() -> Location:
        return user_location()

    def open(self, tracer: OpenTrace) -> None:
        """`tracer`'s trace is recorded from now on (its IR is the last of `traces`)."""
        self.traces.append(tracer.ir)
        if self.recordings is not None:
            # The model's module order, once known (recorded at its first run), is checked as
            # nodes are recorded.
            order = getattr(tracer.model, "known_module_order", None)
            rank = ranks_by_kind(order) if order else None
            tracer.recording = self.recordings[id(tracer.ir)] = Recording(self.tensors, rank)
        self.tracer = tracer

    # -- recording -----------------------------------------------------------------------------

    # The three ways to record a node. They repeat a few lines on purpose: one of them runs for
    # every operation a trace records, and a shared helper call costs as much as those lines.

    def record(
        self, op: str, args: list, kwargs: dict | None = None, result: bool = True, depth: int = 3,
        loc: Location | None = None,
    ) -> Proxy | None:
        """Record `op` on `args` (Python values: proxies, tensors, literals) in the open trace.
        Returns the proxy of its value (`result=False`: None, for ops whose value is None).
        `depth`: frames from `user_location` up to the user's code, at the nearest; `loc`: the
        location, when the caller knows it already."""
        tracer = self.tracer
        if tracer is None or self.done:
            self._closed(op, args)
        if self._pending is not None:
            self._flush(self._pending)
        if op == "stop":  # nothing after a stop runs: what was written before it must be recorded
            self.flush_lazies()
        if loc is None:
            loc = user_location(depth)  # user code -> a proxy's operator (or envoy, ...) -> record -> here
        try:  # `self.encode(args, loc)`, its fast path inline: this runs for every operation
            encoded = argcodec.encode_list(args, self._store_tensor, self._ref_of, Proxy)
        except argcodec.ArgError:
            encoded = self.encode(args, loc)
        node = Node(self.next_id, op, encoded, self.encode(kwargs, loc) if kwargs else _NO_KWARGS, tracer.invoke_index, loc)
        if op in CALL_OPS:
            check_node_alone(node)  # a refused call fails here, at the user's line
        self.next_id += 1
        tracer.ir.nodes.append(node)
        if tracer.recording is not None:
            tracer.recording.add(node)
        if not result:
            return None
        proxy = Proxy(self, node.id, loc)
        self.proxies.append(proxy)
        return proxy

    def record_encoded(self, op: str, args: list) -> Proxy:
        """`record` for arguments that are JSON already (a module path and a call index): the
        most common nodes, so they skip encoding."""
        tracer = self.tracer
        if tracer is None or self.done:
            self._closed(op, args)
        if self._pending is not None:
            self._flush(self._pending)
        frame = _getframe(2)  # user code -> Envoy.output -> here: `user_location(3)`'s cached hit, inline
        site = SITES.get(id(code := frame.f_code))
        if site is None or site[0] is not code or (loc := site[1].get(frame.f_lasti)) is None:
            loc = user_location(3)
        node_id = self.next_id
        node = _new(Node)  # `Node(node_id, op, args, {}, tracer.invoke_index, loc)`: see _new
        node.id = node_id
        node.op = op
        node.args = args
        node.kwargs = _NO_KWARGS
        node.invoke = tracer.invoke_index
        node.loc = loc
        tracer.ir.nodes.append(node)
        self.next_id = node_id + 1
        if tracer.recording is not None:
            tracer.recording.read(node_id, op, loc, args, node.invoke)
        proxy = _new(Proxy)  # `Proxy(self, node_id, loc)`
        proxy._graph = self
        proxy._id = node_id
        proxy._loc = loc
        proxy._state = "pending"
        proxy._value = proxy._lazy = None
        self.proxies.append(proxy)
        return proxy

    def record_save(self, proxy: Proxy) -> None:
        """`proxy.save()`: a save node, and the proxy's value comes back after the run."""
        tracer = self.tracer
        if tracer is None or self.done:
            self._closed("save", [proxy])
        if self._pending is not None:
            self._flush(self._pending)
        if proxy._lazy is not None:
            self._flush(proxy)
        frame = _getframe(2)  # user code -> Proxy.save -> here: `user_location(3)`'s cached hit, inline
        site = SITES.get(id(code := frame.f_code))
        if site is None or site[0] is not code or (loc := site[1].get(frame.f_lasti)) is None:
            loc = user_location(3)
        node_id, ref = self.next_id, proxy._id
        node = _new(Node)  # `Node(node_id, "save", [{"$ref": ref}], {}, tracer.invoke_index, loc)`: see _new
        node.id = node_id
        node.op = "save"
        node.args = [{"$ref": ref}]
        node.kwargs = _NO_KWARGS
        node.invoke = tracer.invoke_index
        node.loc = loc
        tracer.ir.nodes.append(node)
        self.next_id = node_id + 1
        if tracer.recording is not None:
            tracer.recording.save(node_id, ref, loc, node.invoke)
        self.saved[ref] = proxy

    # -- lazy subscripts ---------------------------------------------------------------------
    #
    # Python runs `x[i] += v` as three calls: t = x.__getitem__(i); t = t.__iadd__(v);
    # x.__setitem__(i, t). Recorded one by one that is three nodes, the costliest part of the
    # commonest edit. So a basic subscript (ints, slices, ...: a view of x) is recorded lazily,
    # on first use; an in-place op on such a subscript waits for the next call; and if that is
    # the matching setitem, the three become one `augassign` node with Python's own semantics.
    # Anything else records what was deferred, at its own line, before the next node: for views
    # recording later is the same as recording at once (they see the same memory).

    def subscript(self, target: Proxy, index: Any) -> Proxy:
        """`target[index]`: lazy for a basic index, recorded now otherwise."""
        tracer = self.tracer
        if type(index) is slice:  # `_basic`, inline for the commonest index (`[:]` the commonest)
            basic = index == _WHOLE or (type(index.start) in _PLAIN_INDEX and type(index.stop) in _PLAIN_INDEX
                                        and type(index.step) in _PLAIN_INDEX)
        else:
            basic = _basic(index)
        if tracer is None or self.done or not basic:
            return self.record("getitem", [target, index])
        proxy = _new(Proxy)  # `Proxy(self, None, loc)`: see _new
        proxy._graph = self
        proxy._id = None
        frame = _getframe(2)  # user code -> Proxy.__getitem__ -> here: `user_location(3)`'s hit, inline
        site = SITES.get(id(code := frame.f_code))
        if site is None or site[0] is not code or (loc := site[1].get(frame.f_lasti)) is None:
            loc = user_location(3)
        proxy._loc = loc
        proxy._state = "pending"
        proxy._value = None
        proxy._lazy = ("item", target, index, tracer.invoke_index, tracer, False)
        self.proxies.append(proxy)
        self._lazies.append(proxy)
        return proxy

    def record_inplace(self, op: str, proxy: Proxy, other: Any) -> Proxy:
        """`proxy op= other`: deferred when `proxy` is a lazy subscript, else recorded.

        Deferred, its result is `proxy` itself, as torch's in-place ops return the tensor they
        edit (so `t += v` leaves `t` the same object, as it would be outside a trace): one proxy
        for the subscript and its in-place result. Its lazy entry then holds the op (with its
        own line) and the subscript's entry: see `_flush` and `assign_item`."""
        lazy = proxy._lazy
        if lazy is None or lazy[0] != "item" or self._pending is not None or self.tracer is not lazy[4]:
            return self.record(op, [proxy, other])
        frame = _getframe(2)  # user code -> Proxy.__iadd__ -> here: `user_location(3)`'s hit, inline
        site = SITES.get(id(code := frame.f_code))
        if site is None or site[0] is not code or (loc := site[1].get(frame.f_lasti)) is None:
            loc = user_location(3)
        proxy._lazy = ("op", op, lazy, other, lazy[3], lazy[4], loc)
        self._pending = proxy
        return proxy

    def assign_item(self, target: Proxy, index: Any, value: Any) -> None:
        """`target[index] = value`: one `augassign` node when it completes `target[index] op= v`."""
        pending = self._pending
        if pending is not None and value is pending:
            _, op, lazy, other, invoke, tracer, loc = pending._lazy  # (`lazy`: its subscript's)
            if lazy[1] is target and (lazy[2] is index or _same_index(lazy[2], index)):  # (`x[i] += v`: the same object)
                self._pending = None
                pending._lazy = lazy  # the subscript again, should `other` be it (`x[i] += x[i]`)
                # `loc`: the in-place op's, the same statement as this setitem in `x[i] += v`
                # (for `t = x[i]; t += v; x[i] = t` the `+=` line), and no third frame walk.
                to = type(other)
                if tracer is not self.tracer or self.done:  # says why it cannot
                    self.record("augassign", [target, index, op, other], result=False, loc=loc)
                elif (to is float or to is int) and index == _WHOLE and target._lazy is None and -_INF < other < _INF:
                    # `x[:] += 0.5`, the commonest edit: its node inline (`record` and
                    # `encode_list` as they would make it; NaN fails the bounds too). The index is
                    # basic (see `subscript`): never a proxy, so == is safe.
                    node_id, target_id = self.next_id, target._id
                    node = _new(Node)  # see _new
                    node.id = node_id
                    node.op = "augassign"
                    node.args = [{"$ref": target_id}, {"$slice": [None, None, None]}, op, other]
                    node.kwargs = _NO_KWARGS
                    node.invoke = tracer.invoke_index
                    node.loc = loc
                    tracer.ir.nodes.append(node)
                    self.next_id = node_id + 1
                    if tracer.recording is not None:
                        tracer.recording.augassign(node_id, loc, target_id, index, op, other, None, True, node.invoke)
                else:
                    self._record_augassign(tracer, target, index, op, other, loc)
                # A view of target[index] now; used later, it records that subscript.
                pending._lazy = ("item", target, index, invoke, tracer, True)
                return
        self.record("setitem", [target, index, value], result=False, depth=4)

    def _record_augassign(self, tracer: OpenTrace, target: Proxy, index: Any, op: str, other: Any, loc: Location) -> None:
        """The `augassign` node of `target[index] op= other` (but `x[:] op= number`: see
        `assign_item`). Its target is a proxy of this graph, its index basic (see `subscript`),
        its op a name; for a local run its step is compiled here too (`Recording.augassign`)
        when `other` is a scalar or a proxy of this graph: the arguments are known, nothing to
        decode."""
        args = [target, index, op, other]
        try:
            encoded = argcodec.encode_list(args, self._store_tensor, self._ref_of, Proxy)
        except argcodec.ArgError:
            encoded = self.encode(args, loc)
        node_id = self.next_id  # (encoding records a lazy target or operand first)
        node = Node(node_id, "augassign", encoded, _NO_KWARGS, tracer.invoke_index, loc)
        tracer.ir.nodes.append(node)
        self.next_id = node_id + 1
        rec = tracer.recording
        if rec is None:
            return
        view = type(index) in _VIEW_INDEX  # (tuples too may be views: the engine checks those)
        to = type(other)
        if to in _SCALARS:
            rec.augassign(node_id, loc, target._id, index, op, other, None, view, tracer.invoke_index)
        elif to is Proxy and other._graph is self:
            rec.augassign(node_id, loc, target._id, index, op, None, other._id, view, tracer.invoke_index)
        else:
            rec.add(node)

    def flush_lazies(self) -> None:
        """At the end of a trace: record what was deferred and not absorbed into an augassign,
        so it runs in this trace (and a bad index still fails at its line)."""
        if self._pending is not None:
            self._flush(self._pending)
        for proxy in self._lazies:
            lazy = proxy._lazy
            if lazy is not None and not lazy[5]:
                self._flush(proxy)
        self._lazies = []

    def _flush(self, proxy: Proxy) -> None:
        """Record a lazy proxy's node now, at the line and in the invoke where it was written."""
        lazy, proxy._lazy = proxy._lazy, None
        if proxy is self._pending:
            self._pending = None
        if lazy[0] == "item":
            op, args, invoke, tracer, loc = "getitem", [lazy[1], lazy[2]], lazy[3], lazy[4], proxy._loc
        else:  # an in-place op on the subscript this proxy also is (record_inplace): that first
            proxy._lazy = lazy[2]
            self._flush(proxy)
            op, args, invoke, tracer, loc = lazy[1], [proxy, lazy[3]], lazy[4], lazy[5], lazy[6]
        encoded = self.encode(args, loc)  # may record the lazy target first
        if tracer is not self.tracer:  # used in a later trace: recorded there
            invoke = self.tracer.invoke_index
        node = Node(self.next_id, op, encoded, _NO_KWARGS, invoke, loc)
        self.next_id += 1
        self.tracer.ir.nodes.append(node)
        if self.tracer.recording is not None:
            self.tracer.recording.add(node)
        proxy._id = node.id

    def record_step(self, op: str, args: list, loc: Location) -> None:
        """A log or a stop in the session body, outside any trace: it runs after the traces
        recorded so far and before the next. After a session stop nothing more is recorded to run."""
        if self.stopped_at is not None:
            return
        if any(isinstance(a, Proxy) and a._graph is self for a in args):
            raise TracingError(
                f"client_sdk.{op}() in a session body runs between traces, so it cannot use a value "
                "computed in a trace: call it inside that trace, or .save() the value and print it "
                "after the session", loc,
            )
        encoded = self.encode(list(args), loc)
        if argcodec.refs_in(encoded, {}):
            raise TracingError(f"client_sdk.{op}() in a session body cannot use a value computed in a trace", loc)
        self.steps.append(SessionStep(op, len(self.traces), encoded, loc))
        if op == "stop":
            self.stopped_at = len(self.traces)

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
            if value._lazy is not None:
                self._flush(value)
            return value._id
        if value._state == "ready":  # a saved value of an earlier session: send its value
            return None
        raise value._unavailable()

    def model_name(self, model: Any) -> str:
        name = model.name
        while (known := self.models.setdefault(name, model)) is not model:
            if not (known.is_local or model.is_local):
                return name  # two handles on one served model: the server knows it by this name
            name += "'"  # two local models from the same folder, e.g. different dtypes
        return name

    def session_ir(self) -> SessionIR:
        traces = self.traces if self.stopped_at is None else self.traces[: self.stopped_at]
        return SessionIR(traces=traces, steps=self.steps)

    # -- after the run -------------------------------------------------------------------------

    def resolve(self, saves: dict[int, Any]) -> None:
        """Give saved proxies their values; every other proxy says why it has none."""
        self.done = True
        for proxy in self.proxies:
            proxy._state = "unsaved"
        for i, proxy in self.saved.items():
            if i in saves:
                proxy._value, proxy._state = saves[i], "ready"
            else:
                proxy._state = "not_run"
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


_SCALARS = frozenset({int, float, str, bool, type(None)})
_INF = math.inf
_NO_KWARGS: dict = {}  # the kwargs of every node recorded without any: shared, never mutated
# The hot paths (a node and a proxy per recorded operation) make Nodes and Proxies with
# `_new(cls)` and a store per slot, every slot: calling the class costs a type call and an
# __init__ frame on top, ~1k instructions a node in CPython 3.11 (~40% of making one).
_new = object.__new__
_getframe = sys._getframe
_WHOLE = slice(None)  # `x[:]`
_VIEW_INDEX = frozenset({int, slice, type(None), type(Ellipsis)})  # x[i] of these is a view of x
_BASIC = (int, slice, type(None), type(Ellipsis), str)


def _basic(index: Any) -> bool:
    """Whether `x[index]` is a view (ints, slices of ints, None, ...; no tensors, lists or traced
    values), so recording it later is the same as recording it now."""
    if type(index) is tuple:
        return all(_basic_item(i) for i in index)
    return _basic_item(index)


def _basic_item(i: Any) -> bool:
    if type(i) is slice:
        return type(i.start) in _PLAIN_INDEX and type(i.stop) in _PLAIN_INDEX and type(i.step) in _PLAIN_INDEX
    return type(i) in _BASIC


_PLAIN_INDEX = (int, type(None))


def _same_index(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and a == b)  # basic indices: ints, slices, tuples of them


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
