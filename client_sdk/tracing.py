"""Tracing contexts: sessions, traces and invokes, and the graph they record into.

`with model.trace(...)` and `with session(...)` record nodes while the body runs; the outermost
block executes the whole session (locally or on the cluster) when it exits, then gives each saved
proxy its real value and rebinds the user's names to those values.
"""

from __future__ import annotations

import math
import sys
import threading
from typing import TYPE_CHECKING, Any, Self

import torch

from client_sdk.location import user_location
from client_sdk.proxy import Proxy, TracingError
from client_sdk.rebind import rebind_frame
from intervention import args as argcodec
from intervention.errors import InterventionError
from intervention.ir import Invoke, Node, SessionIR, TraceIR

if TYPE_CHECKING:
    from client_sdk.language_model import LanguageModel

_local = threading.local()


def current_graph() -> Graph | None:
    return getattr(_local, "graph", None)


class Graph:
    """Everything one session records: traces, nodes, client tensors, saved proxies."""

    def __init__(self, remote: bool = False, blocking: bool = True):
        self.remote = remote
        self.blocking = blocking
        self.traces: list[TraceIR] = []
        self.tensors: dict[str, torch.Tensor] = {}
        # id(tensor) -> (blob name, the tensor). Holding the tensor keeps its id from being reused
        # by a later temporary, which would otherwise silently send the earlier tensor's values.
        self._tensor_names: dict[int, tuple[str, torch.Tensor]] = {}
        self.saved: dict[int, Proxy] = {}
        self.proxies: list[Proxy] = []
        self.models: dict[str, LanguageModel] = {}
        self.tracer: Tracer | None = None
        self.stopped_at: int | None = None  # traces from this index on are not run
        self.next_id = 0
        self.done = False
        self.handle: Any = None  # remote, non-blocking: the request handle

    @staticmethod
    def location_now():
        return user_location()

    # -- recording -----------------------------------------------------------------------------

    def record(self, op: str, args: list, kwargs: dict | None = None) -> Proxy:
        tracer = self.tracer
        if self.done:  # a proxy used after its session ran: say why it has no value
            for a in args:
                if isinstance(a, Proxy) and a._graph is self:
                    raise a._unavailable()
        if tracer is None:
            raise TracingError(f"'{op}' must be used inside a trace (a `with model.trace(...)` block)", user_location())
        loc = user_location()
        node = _new_node(
            id=self.next_id,
            op=op,
            args=self.encode(args, loc),
            kwargs=self.encode(kwargs, loc) if kwargs else {},
            invoke=tracer.invoke_index,
            loc=loc,
        )
        self.next_id += 1
        tracer.ir.nodes.append(node)
        proxy = Proxy(self, node.id, loc)
        self.proxies.append(proxy)
        return proxy

    def encode(self, value: Any, loc) -> Any:
        if type(value) is list:  # a node's argument list: most hold only our proxies and scalars
            fast = self._encode_simple(value)
            if fast is not None:
                return fast
        try:
            try:
                encoded = argcodec.encode(value, self._store_tensor, self._ref_of)
            except argcodec.ArgError:
                # Saved proxies of earlier sessions cannot be encoded as they are, only as their
                # values. Substituting them only when encoding failed keeps every other value
                # (this runs for each recorded operation) to one pass; storing tensors is idempotent.
                encoded = argcodec.encode(_saved_values(value, self), self._store_tensor, self._ref_of)
        except argcodec.ArgError as exc:
            raise TracingError(str(exc), loc) from None
        return encoded["$dict"] if isinstance(value, dict) else encoded

    def _encode_simple(self, values: list) -> list | None:
        """What argcodec.encode gives for a list of this graph's proxies, plain scalars (ints,
        strings, bools, None, finite floats) and slices of ints/None/... (`x[:]`), without a call
        per item; None for any other list, which takes the general path."""
        plain = argcodec.PLAIN_TYPES
        out = []
        for v in values:
            if type(v) is Proxy and v._graph is self:
                out.append({"$ref": v._id})
            elif type(v) in plain or (type(v) is float and math.isfinite(v)):
                out.append(v)
            elif type(v) is slice and type(v.start) in plain and type(v.stop) in plain and type(v.step) in plain:
                out.append({"$slice": [v.start, v.stop, v.step]})
            else:
                return None
        return out

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

    def model_name(self, model: LanguageModel) -> str:
        name = model.name
        while self.models.setdefault(name, model) is not model:
            name += "'"  # two local models from the same folder, e.g. different dtypes
        return name

    # -- execution -----------------------------------------------------------------------------

    def session_ir(self) -> SessionIR:
        traces = self.traces if self.stopped_at is None else self.traces[: self.stopped_at]
        return SessionIR(traces=traces)

    def finish(self, frame) -> None:
        """Run the session, hand out saved values, rebind the caller's names."""
        self.done = True
        if not self.session_ir().traces:
            self.resolve({})
            return
        if self.remote:
            from client_sdk import remote

            outcome = remote.run(self)
            if outcome is None:  # non-blocking: values come with handle.result()
                return
        else:
            from client_sdk import local

            outcome = local.run(self)
        self.resolve(outcome)
        rebind_frame(frame, self)

    def resolve(self, saves: dict[int, Any]) -> None:
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


def _unchecked_node(**fields: Any) -> Node:
    """A Node without pydantic's validation, which costs more than the rest of recording an
    operation. Only for nodes the tracer builds itself: every field has its type by construction
    (the encoder's JSON, ints, the location tuple); servers validate what they receive anyway."""
    node = object.__new__(Node)
    object.__setattr__(node, "__dict__", fields)
    object.__setattr__(node, "__pydantic_fields_set__", set(fields))
    object.__setattr__(node, "__pydantic_extra__", None)
    object.__setattr__(node, "__pydantic_private__", None)
    return node


def _pick_node_factory():
    """`_unchecked_node` if this pydantic lays models out as it expects, else plain `Node`."""
    probe = {"id": 0, "op": "save", "args": [{"$ref": 0}], "kwargs": {}, "invoke": None, "loc": ("f", 1, "x")}
    try:
        fast = _unchecked_node(**dict(probe))
        same = fast == Node(**probe) and fast.model_dump_json() == Node(**probe).model_dump_json()
    except (AttributeError, TypeError, ValueError):  # a pydantic whose internals differ
        return Node
    return _unchecked_node if same else Node


_new_node = _pick_node_factory()


def _enter_graph(graph: Graph) -> None:
    if current_graph() is not None:
        raise TracingError("sessions cannot be nested", user_location())
    _local.graph = graph


def _exit_graph(graph: Graph, exc: BaseException | None, frame) -> None:
    _local.graph = None
    if exc is not None:
        graph.abandon()
        return
    try:
        graph.finish(frame)
    except InterventionError as err:
        graph.abandon()
        _free_frames(err)
        # The message names the user's line; engine frames would only hide it.
        raise err.with_traceback(None) from None


def _free_frames(err: BaseException) -> None:
    """Drop the tracebacks of `err`'s chained exceptions (hidden by `from None` anyway): their
    frames are the engine's hooks and the model's forward, holding activations, and a notebook
    keeps the last error alive. Their types and messages stay."""
    seen: set[int] = set()
    chained = err.__cause__ or err.__context__
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        chained.with_traceback(None)
        chained = chained.__cause__ or chained.__context__


class Session:
    """`with client_sdk.session(remote=...) as s:` — several traces, possibly of several models,
    run in order as one request. Values flow between traces without .save()."""

    def __init__(self, remote: bool = False, blocking: bool = True):
        self.graph = Graph(remote=remote, blocking=blocking)

    def __enter__(self) -> Self:
        _enter_graph(self.graph)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        _exit_graph(self.graph, exc, sys._getframe(1))
        return False

    def stop(self) -> None:
        """Stop the session here: nothing after this point runs; what was saved comes back."""
        if self.graph.tracer is not None:
            self.graph.record("stop", ["session"])
        elif self.graph.stopped_at is None:
            self.graph.stopped_at = len(self.graph.traces)

    # Non-blocking remote sessions: the handle's methods.
    @property
    def id(self) -> str:
        return _handle(self.graph).id

    def status(self) -> dict:
        return _handle(self.graph).status()

    def result(self) -> dict[int, Any]:
        """Wait for the result; saved names in the caller's scope then hold their values."""
        return _handle(self.graph).result(sys._getframe(1))

    def cancel(self) -> None:
        _handle(self.graph).cancel()


def _handle(graph: Graph):
    if graph.handle is None:
        raise TracingError("this session was not submitted with remote=True, blocking=False")
    return graph.handle


class Tracer(Session):
    """`with model.trace(input) as tracer:` — one forward pass. Outside a session it is a session
    of one trace."""

    def __init__(self, model: LanguageModel, input: Any, remote: bool, blocking: bool, kwargs: dict):
        self.model = model
        self.input = input
        self.kwargs = kwargs
        self.remote, self.blocking = remote, blocking
        self.invoke_index: int | None = None
        self.owns_graph = False
        self.graph: Graph | None = None
        self.ir: TraceIR | None = None

    def __enter__(self) -> Self:
        graph = current_graph()
        if graph is None:
            graph = Graph(remote=self.remote, blocking=self.blocking)
            _enter_graph(graph)
            self.owns_graph = True
        elif self.remote and not graph.remote:
            raise TracingError("remote=True on a trace inside a local session: pass it to the session", user_location())
        if graph.tracer is not None:
            raise TracingError("traces cannot be nested", user_location())
        loc = user_location()
        self.graph = graph
        self.ir = TraceIR(model=graph.model_name(self.model), kwargs=graph.encode(self.kwargs, loc), loc=loc)
        if self.input is not None:
            self.ir.invokes.append(Invoke(input=graph.encode(self.input, loc)))
        graph.traces.append(self.ir)
        graph.tracer = self
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.graph.tracer = None
        if exc is None and not self.ir.invokes:
            exc = TracingError("this trace has no input: pass a prompt to trace() or use tracer.invoke()", self.ir.loc)
            if self.owns_graph:
                _exit_graph(self.graph, exc, None)
            raise exc
        if self.owns_graph:
            _exit_graph(self.graph, exc, sys._getframe(1))
        return False

    def invoke(self, input: Any) -> Invoker:
        """Add `input` to this trace's batch; code in the block sees only its rows."""
        return Invoker(self, input)

    def stop(self) -> None:
        """Stop this trace here: the rest of its forward pass does not run."""
        self.graph.record("stop", ["trace"])


class Invoker:
    def __init__(self, tracer: Tracer, input: Any):
        self.tracer, self.input = tracer, input

    def __enter__(self) -> Self:
        tracer = self.tracer
        if tracer.invoke_index is not None:
            raise TracingError("invokes cannot be nested", user_location())
        tracer.ir.invokes.append(Invoke(input=tracer.graph.encode(self.input, user_location())))
        tracer.invoke_index = len(tracer.ir.invokes) - 1
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.tracer.invoke_index = None
        return False


# -- module-level helpers (client_sdk.save / log / stop / session) ---------------------------------


def _require_graph(what: str) -> Graph:
    graph = current_graph()
    if graph is None or graph.tracer is None:
        raise TracingError(f"client_sdk.{what}() must be called inside a trace", user_location())
    return graph


def save(value: Any) -> Any:
    """Keep `value` for after the block (same as value.save())."""
    if isinstance(value, Proxy):
        return value.save()
    _require_graph("save")
    return value


def log(*values: Any) -> None:
    """Print `values` on the client when the model reaches this point, in order."""
    _require_graph("log").record("log", list(values))


def stop() -> None:
    """Stop the innermost trace here: nothing after this point in it runs."""
    _require_graph("stop").record("stop", ["trace"])


def session(remote: bool = False, blocking: bool = True) -> Session:
    """A session that may hold traces of several models."""
    return Session(remote=remote, blocking=blocking)
