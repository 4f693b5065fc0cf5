"""Proxies: stand-ins for values that exist only when the model runs.

Every operation on a proxy records a node in the current trace and returns a new proxy. Python
operators, indexing, whitelisted tensor methods and torch functions (through `__torch_function__`)
are recorded; anything that would need the concrete value now (`if proxy:`, `int(proxy)`,
iterating) raises an error that says what to do instead.
"""

from __future__ import annotations

from typing import Any, NoReturn, Protocol, Self

import torch

from intervention import ops
from intervention.errors import InterventionError
from intervention.ir import Location


class TracingError(InterventionError):
    code = "tracing_error"


class Recorder(Protocol):
    """What a proxy needs of the graph that records it (client_sdk.graph.Graph)."""

    saved: dict[int, Proxy]

    def record(self, op: str, args: list, kwargs: dict | None = None) -> Proxy: ...

    def record_save(self, proxy: Proxy) -> None: ...

    def subscript(self, target: Proxy, index: Any) -> Proxy: ...

    def record_inplace(self, op: str, proxy: Proxy, other: Any) -> Proxy: ...

    def assign_item(self, target: Proxy, index: Any, value: Any) -> None: ...

    def location_now(self) -> Location: ...


class Proxy:
    __slots__ = ("__weakref__", "_graph", "_id", "_lazy", "_loc", "_state", "_value")

    def __init__(self, graph: Recorder, node_id: int | None, loc):
        self._graph = graph
        self._id = node_id  # None while lazy: recorded on first use (see Graph.subscript)
        self._loc = loc
        self._state = "pending"  # -> "ready" (value set) | "unsaved" | "not_run"
        self._value: Any = None
        self._lazy: tuple | None = None

    # -- saving and results --------------------------------------------------------------------

    def save(self) -> Proxy:
        """Keep this value: after the outermost block it holds the real value."""
        self._graph.record_save(self)
        return self

    @property
    def value(self) -> Any:
        if self._state == "ready":
            return self._value
        raise self._unavailable()

    def _unavailable(self) -> TracingError:
        where = f"{self._loc[0]}, line {self._loc[1]}" if self._loc else "its trace"
        if self._state == "pending":
            return TracingError(
                "this value does not exist yet: it is computed when the trace runs, at the end of "
                "the outermost `with` block. Use it inside the trace, or .save() it and use it after",
                self._graph.location_now(),
            )
        if self._state == "ready":  # kept where rebinding does not reach, e.g. an attribute
            return TracingError(
                f"the value saved at {where} is in this proxy's .value: use that outside the trace "
                "(names in the scope of the `with` block hold it directly)",
                self._graph.location_now(),
            )
        if self._state == "not_run":
            return TracingError(
                f"the value from {where} was never computed: the trace stopped before reaching it",
                self._graph.location_now(),
            )
        return TracingError(
            f"the value from {where} was not saved: call .save() on it inside the trace "
            "(or client_sdk.save(x)) to use it after the block",
            self._graph.location_now(),
        )

    # -- things that need a concrete value -----------------------------------------------------

    def _concrete(self, what: str) -> TracingError:
        if self._state != "pending":
            return self._unavailable()
        return TracingError(
            f"{what} needs the concrete value, which does not exist while tracing: the model has "
            "not run yet. Use tensor operations instead (e.g. torch.where), or .save() the value "
            "and decide after the block",
            self._graph.location_now(),
        )

    def __bool__(self) -> NoReturn:
        raise self._concrete("using a traced value as a condition (if/while/and/or)")

    def __int__(self) -> NoReturn:
        raise self._concrete("int() of a traced value")

    def __float__(self) -> NoReturn:
        raise self._concrete("float() of a traced value")

    def __index__(self) -> NoReturn:
        raise self._concrete("using a traced value as a Python index")

    def __len__(self) -> NoReturn:
        raise self._concrete("len() of a traced value")

    def __iter__(self) -> NoReturn:
        raise self._concrete("iterating over a traced value")

    def __contains__(self, item) -> NoReturn:
        raise self._concrete("`in` on a traced value")

    def __repr__(self) -> str:
        if self._state == "ready":
            return repr(self._value)
        return f"<raysight Proxy #{self._id} ({self._state})>"

    __hash__ = object.__hash__

    # -- recorded operations -------------------------------------------------------------------

    def __getitem__(self, index: Any) -> Proxy:
        return self._graph.subscript(self, index)

    def __setitem__(self, index: Any, value: Any) -> None:
        self._graph.assign_item(self, index, value)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in ops.TENSOR_METHODS:
            return _Method(self, name)
        if name in _GRADIENTS:
            return _GRADIENTS[name](self)
        if name not in _FIELDS and callable(getattr(torch.Tensor, name, None)):
            # Say so at this line, not "not callable" now or an execution error later.
            raise TracingError(
                f"tensor method .{name}() is not supported inside a trace", self._graph.location_now()
            )
        return self._graph.record("getattr", [self, name])

    def __call__(self, *args, **kwargs):
        raise TracingError("a traced value is not callable", self._graph.location_now())

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        graph = _graph_of(args, kwargs)
        name = _FUNCTION_NAMES.get(func)
        if name is not None:
            return graph.record("function", [name, *args], kwargs)
        method = getattr(func, "__name__", "")
        if method in _DUNDER_OPS:
            op, swap = _DUNDER_OPS[method]
            return graph.record(op, list(reversed(args)) if swap else list(args))
        if method == "__getitem__":
            return graph.record("getitem", list(args))
        if method == "__setitem__":
            return graph.record("setitem", list(args))
        if method in ops.TENSOR_METHODS and getattr(torch.Tensor, method, None) is func:
            return graph.record("method", [method, *args], kwargs)
        qual = getattr(func, "__qualname__", repr(func))
        raise TracingError(f"{qual}() is not supported inside a trace", graph.location_now())


class _Method:
    """`proxy.method` before it is called: records a method node when called."""

    __slots__ = ("name", "proxy")

    def __init__(self, proxy: Proxy, name: str):
        self.proxy, self.name = proxy, name

    def __call__(self, *args, **kwargs) -> Proxy:
        return self.proxy._graph.record("method", [self.name, self.proxy, *args], kwargs)


class Backward:
    """`with loss.backward():` — backpropagate `loss` to the activations at this point of the trace;
    in the block (and after it, in the same trace) `value.grad` is the gradient of a module output
    read earlier, or of a value computed from one. Weights stay frozen: no weight gradients."""

    def __init__(self, loss: Proxy):
        self.loss = loss
        loss._graph.record("backward", [loss], result=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> bool:
        return False


def _grad(proxy: Proxy) -> Proxy:
    tracer = getattr(proxy._graph, "tracer", None)
    if tracer is None or not any(n.op == "backward" for n in tracer.ir.nodes):
        raise TracingError(
            ".grad exists once a backward has run: read it inside `with loss.backward():` in the same trace",
            proxy._graph.location_now(),
        )
    return proxy._graph.record("grad", [proxy])


def _backward(proxy: Proxy):
    tracer = getattr(proxy._graph, "tracer", None)
    if tracer is not None and getattr(tracer, "kind", "forward") == "generate":
        raise TracingError(
            "backward() works in a trace, not in a generation (HF generate runs without gradients)",
            proxy._graph.location_now(),
        )
    return lambda: Backward(proxy)


# Gradients need no flag on the client: a value whose .grad is read gets one on the server.
_GRADIENTS = {
    "grad": _grad,
    "backward": _backward,
    "requires_grad_": lambda proxy: lambda requires_grad=True: proxy,
}


def _graph_of(args, kwargs) -> Recorder:
    stack = list(args) + list(kwargs.values())
    while stack:
        a = stack.pop()
        if isinstance(a, Proxy):
            return a._graph
        if isinstance(a, (list, tuple)):
            stack.extend(a)
    raise TracingError("no traced value among the arguments")


_FUNCTION_NAMES = {fn: name for name, fn in ops.FUNCTIONS.items()}

# Attribute names that are also tensor methods but read a field: `.values`/`.indices` of
# topk/max/sort results (sparse-tensor methods on a plain tensor).
_FIELDS = ops.TENSOR_ATTRS | {"values", "indices"}

# Python operator -> (op, swap operands). Reflected forms swap so `1 - p` records sub(1, p).
_DUNDER_OPS: dict[str, tuple[str, bool]] = {}
for _op in ops.BINARY:
    if _op.startswith("i") and _op[1:] in ops.BINARY:
        _DUNDER_OPS[f"__{_op}__"] = (_op, False)
        continue
    _DUNDER_OPS[f"__{_op}__"] = (_op, False)
    if _op not in ("eq", "ne", "lt", "le", "gt", "ge"):
        _DUNDER_OPS[f"__r{_op}__"] = (_op, True)
for _op in ops.UNARY:
    _DUNDER_OPS[f"__{_op}__"] = (_op, False)


def _binary(op: str, swap: bool):
    if op in ops.IN_PLACE:  # `x[i] += v` may become one node: the graph decides
        def inplace(self: Proxy, other: Any = None) -> Proxy:
            return self._graph.record_inplace(op, self, other)

        return inplace

    def method(self: Proxy, other: Any = None) -> Proxy:
        return self._graph.record(op, [other, self] if swap else [self, other])

    return method


def _unary(op: str):
    def method(self: Proxy) -> Proxy:
        return self._graph.record(op, [self])

    return method


for _dunder, (_op, _swap) in _DUNDER_OPS.items():
    setattr(Proxy, _dunder, _unary(_op) if _op in ops.UNARY else _binary(_op, _swap))
