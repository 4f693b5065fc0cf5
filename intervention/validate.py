"""Static validation of a session before it is queued: nothing invalid reaches a model.

Checks the version, the models and module paths, that every op is whitelisted with the right
arity, that references point backwards, that tensor blobs exist, and size limits. Every error is
a ValidationError with the location of the offending node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from intervention import ops
from intervention.args import ArgError, visit, visit_args
from intervention.errors import ValidationError
from intervention.ir import IR_VERSION, Node, SessionIR, TraceIR
from intervention.order import check_order

FORWARD_KWARGS = frozenset({"output_hidden_states", "output_attentions", "use_cache"})


@dataclass(frozen=True)
class Limits:
    max_traces: int = 64
    max_nodes: int = 20_000
    max_tensor_bytes: int = 256 * 2**20


def validate_session(
    session: SessionIR,
    tensors: dict[str, torch.Tensor],
    models: dict[str, set[str]],
    limits: Limits = Limits(),
    orders: dict[str, list] | None = None,
) -> None:
    """`models` maps each served model name to its module paths; `orders`, where known, to the
    order its modules run in (see order.py), so out-of-order reads fail before any forward."""
    if session.version != IR_VERSION:
        raise ValidationError(f"IR version {session.version} is not supported (this server speaks {IR_VERSION})")
    if not session.traces:
        raise ValidationError("the session has no traces")
    if len(session.traces) > limits.max_traces:
        raise ValidationError(f"a session may hold at most {limits.max_traces} traces", code="too_large")
    n_nodes = sum(len(t.nodes) for t in session.traces)
    if n_nodes > limits.max_nodes:
        raise ValidationError(f"a session may hold at most {limits.max_nodes} operations", code="too_large")
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if size > limits.max_tensor_bytes:
        raise ValidationError(f"tensors of {size} bytes exceed the limit of {limits.max_tensor_bytes}", code="too_large")
    seen: set[int] = set()
    for trace in session.traces:
        if trace.model not in models:
            known = ", ".join(sorted(models)) or "none"
            raise ValidationError(f"unknown model '{trace.model}' (served: {known})", trace.loc, code="unknown_model")
        _check_trace(trace, tensors, models[trace.model], seen)
        if orders and trace.model in orders:
            check_order(trace, orders[trace.model])


def _check_trace(trace: TraceIR, tensors: dict, paths: set[str], seen: set[int]) -> None:
    bad = set(trace.kwargs) - FORWARD_KWARGS
    if bad:
        raise ValidationError(f"forward argument {min(bad)!r} is not supported", trace.loc)
    for invoke in trace.invokes:
        _check_input(invoke.input, tensors, trace.loc)
    _check_input(list(trace.kwargs.values()), tensors, trace.loc)
    for node in trace.nodes:
        _check_node(node, trace, tensors, paths, seen)
        if node.id in seen:
            raise ValidationError(f"node id {node.id} is used twice", node.loc)
        seen.add(node.id)


def _check_node(node: Node, trace: TraceIR, tensors: dict, paths: set[str], seen: set[int]) -> None:
    def fail(message: str, code: str = "invalid_request") -> None:
        raise ValidationError(message, node.loc, code=code)

    if node.op not in ops.ARITY:
        fail(f"operation {node.op!r} is not supported", "unknown_op")
    lo, hi = ops.ARITY[node.op]
    if len(node.args) < lo or (hi is not None and len(node.args) > hi):
        fail(f"operation {node.op!r} takes {lo}{'' if hi == lo else '+' if hi is None else f'-{hi}'} arguments, got {len(node.args)}")
    if node.invoke is not None and not 0 <= node.invoke < len(trace.invokes):
        fail(f"invoke {node.invoke} does not exist in this trace")
    _check_tags(node, tensors, seen)
    a = node.args
    if node.op.startswith("module."):
        if not isinstance(a[0], str) or a[0] not in paths:
            fail(f"the model '{trace.model}' has no module '{a[0]}'", "unknown_module")
        if node.op != "module.call" and (not isinstance(a[1], int) or a[1] < 0):
            fail("a module call index must be an integer >= 0")
    elif node.op in ("method", "function"):
        if not isinstance(a[0], str):
            fail(f"{node.op} name must be a string")
        why = ops.check_call(node.op, a[0], a, node.kwargs)
        if why is None and node.op == "method" and a[0] == "to":
            why = ops.check_to_args(a) or (
                ".to() accepts a dtype only" if set(node.kwargs) - {"dtype"} else None
            )
        if why:
            fail(why, "unsupported_call")
    elif node.op == "getattr" and (not isinstance(a[1], str) or a[1].startswith("_")):
        fail("attribute names must be public strings")
    elif node.op == "stop" and a[0] not in ("trace", "session"):
        fail("stop scope must be 'trace' or 'session'")
    elif node.op == "save" and not (isinstance(a[0], dict) and "$ref" in a[0]):
        fail("save() takes a traced value")


def _check_tags(node: Node, tensors: dict, seen: set[int]) -> None:
    def check(tag: str, body) -> None:
        if tag == "$ref" and body not in seen:
            raise ValidationError(f"reference to value {body}, which is not defined before this point", node.loc)
        if tag == "$tensor" and body not in tensors:
            raise ValidationError(f"tensor blob {body!r} is missing from the request", node.loc)

    try:
        visit_args(node.args, node.kwargs, check)
    except ArgError as exc:
        raise ValidationError(str(exc), node.loc) from None


def _check_input(value, tensors: dict, loc) -> None:
    def check(tag: str, body) -> None:
        if tag == "$ref":
            raise ValidationError(f"reference to value {body}, which is not defined before this point", loc)
        if tag == "$tensor" and body not in tensors:
            raise ValidationError(f"tensor blob {body!r} is missing from the request", loc)

    try:
        visit(value, check)
    except ArgError as exc:
        raise ValidationError(str(exc), loc) from None
