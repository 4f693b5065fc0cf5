"""Static validation of a session before it is queued: nothing invalid reaches a model.

Checks the version, the models and module paths, that every op is whitelisted with the right
arity, that references point backwards, that tensor blobs exist, and size limits. Every error is
a ValidationError with the location of the offending node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from intervention import ops
from intervention.args import WIRE_DTYPES, ArgError, decode, no_refs, ref_id, visit, visit_args
from intervention.errors import ValidationError
from intervention.ir import IR_VERSION, Node, SessionIR, SessionStep, TraceIR
from intervention.limits import DEFAULT_MAX_NEW_TOKENS
from intervention.order import check_order

FORWARD_KWARGS = frozenset({"output_hidden_states", "output_attentions", "use_cache"})
# What `model.generate(...)` accepts besides its input: decoding choices, nothing that changes
# how many times a module is called per step (no beams) or what comes back. `seed` seeds sampling.
GENERATE_KWARGS = frozenset({
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
    "repetition_penalty", "seed", "use_cache", "eos_token_id",
})
MAX_EOS_IDS = 64  # token ids one generation may stop at (`eos_token_id` as a list)


@dataclass(frozen=True)
class Limits:
    max_traces: int = 64
    max_nodes: int = 20_000
    max_tensor_bytes: int = 256 * 2**20


@dataclass(frozen=True)
class InputBounds:
    """What a model's inputs must fit: token ids below `vocab_size`, rows of at most `context`
    tokens (None: unknown, unchecked). `count_tokens` counts a prompt's tokens, where the
    validator has the model's tokenizer."""

    vocab_size: int | None = None
    context: int | None = None
    count_tokens: Callable[[str], int] | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any], count_tokens: Callable[[str], int] | None = None) -> InputBounds:
        context = next((config[k] for k in CONTEXT_KEYS if isinstance(config.get(k), int)), None)
        vocab = config.get("vocab_size")
        return cls(vocab if isinstance(vocab, int) else None, context, count_tokens)


# A prompt of b UTF-8 bytes has at most ~b tokens (byte-level BPE; sentencepiece with byte
# fallback) plus a few special ones; the factor leaves room for normalizers that expand text.
_SURELY_FITS, _SPECIAL_TOKENS = 4, 16
# Where transformers configs keep the context length (Llama & most; GPT-2; a few older ones).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
_ACCEPTED_DTYPES = frozenset(WIRE_DTYPES.values())


def validate_session(
    session: SessionIR,
    tensors: dict[str, torch.Tensor],
    models: dict[str, set[str]],
    limits: Limits = Limits(),
    orders: dict[str, list] | None = None,
    recorded: bool = False,
    max_new_tokens: dict[str, int] | None = None,
    inputs: dict[str, InputBounds] | None = None,
    order_checked: dict[int, ValidationError | None] | None = None,
) -> None:
    """`models` maps each served model name to its module paths; `orders`, where known, to the
    order its modules run in (see order.py), so out-of-order reads fail before any forward;
    `max_new_tokens`, to its cap on generation length (DEFAULT_MAX_NEW_TOKENS if absent).

    `recorded`: the session comes from this process's own recorder, which builds every node
    well-formed and runs `check_node_alone` as it records, so the per-node checks are skipped
    (a server always validates everything: what it receives is untrusted). `inputs`, where known:
    each model's InputBounds, so bad token ids and too long inputs fail here, not in a replica.
    `order_checked`: id(trace) -> the order error found while it was recorded (None: none), for
    traces whose order the recorder checked already (intervention.program.Recording)."""
    if session.version != IR_VERSION:
        raise ValidationError(f"IR version {session.version} is not supported (this server speaks {IR_VERSION})")
    if not session.traces and not session.steps:
        raise ValidationError("the session has no traces")
    if len(session.traces) > limits.max_traces:
        raise ValidationError(f"a session may hold at most {limits.max_traces} traces", code="too_large")
    n_nodes = sum(len(t.nodes) for t in session.traces) + len(session.steps)
    if n_nodes > limits.max_nodes:
        raise ValidationError(f"a session may hold at most {limits.max_nodes} operations", code="too_large")
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if size > limits.max_tensor_bytes:
        raise ValidationError(f"tensors of {size} bytes exceed the limit of {limits.max_tensor_bytes}", code="too_large")
    for name, t in tensors.items():
        if t.dtype not in _ACCEPTED_DTYPES:
            accepted = ", ".join(WIRE_DTYPES)
            raise ValidationError(f"tensor blob {name!r} has dtype {str(t.dtype).removeprefix('torch.')}, which "
                                  f"the server does not accept (accepted: {accepted})", code="unsupported_dtype")
    seen: set[int] = set()
    for trace in session.traces:
        if trace.model not in models:
            known = ", ".join(sorted(models)) or "none"
            raise ValidationError(f"unknown model '{trace.model}' (served: {known})", trace.loc, code="unknown_model")
        if recorded:
            _check_forward_kwargs(trace)
        else:
            _check_trace(trace, tensors, models[trace.model], seen)
        if trace.kind == "generate":
            _check_generate(trace, (max_new_tokens or {}).get(trace.model, DEFAULT_MAX_NEW_TOKENS))
        if orders and trace.model in orders:
            if order_checked is not None and id(trace) in order_checked:
                if (error := order_checked[id(trace)]) is not None:
                    raise error
            else:
                check_order(trace, orders[trace.model])
        if inputs and trace.model in inputs:
            check_inputs(trace, tensors, inputs[trace.model])
    _check_steps(session.steps, len(session.traces), tensors)


def check_inputs(trace: TraceIR, tensors: dict[str, torch.Tensor], bounds: InputBounds) -> None:
    """Each invoke's input fits the model: token ids inside its vocabulary, rows no longer than
    its context. (A prompt is counted only where `bounds` can count tokens.)"""
    for invoke in trace.invokes:
        try:
            value = decode(invoke.input, no_refs, tensors)
        except ArgError as exc:
            raise ValidationError(str(exc), trace.loc) from None
        for row in value if isinstance(value, (list, tuple)) and value and not _is_ids(value) else [value]:
            _check_row(row, trace, bounds)


def _is_ids(value: list | tuple) -> bool:
    return all(type(v) is int for v in value)


def _check_row(row: Any, trace: TraceIR, bounds: InputBounds) -> None:
    def fail(message: str) -> None:
        raise ValidationError(message, trace.loc, code="invalid_input")

    if isinstance(row, str):
        if bounds.count_tokens is None or bounds.context is None:
            return
        if _SURELY_FITS * len(row.encode()) + _SPECIAL_TOKENS <= bounds.context:
            return  # far shorter than the context whatever the tokenizer: no need to count
        n = bounds.count_tokens(row)
    elif isinstance(row, torch.Tensor):
        if row.dtype.is_floating_point or row.dtype.is_complex or row.dtype == torch.bool:
            fail(f"a tensor input must hold integer token ids, not {str(row.dtype).removeprefix('torch.')}")
        if row.dim() not in (1, 2):
            fail(f"a tensor input must hold token ids with 1 or 2 dimensions, got {row.dim()}")
        n = row.shape[-1]
        if row.numel():
            _check_ids(int(row.min()), int(row.max()), trace, bounds)
    elif isinstance(row, (list, tuple)) and _is_ids(row):
        n = len(row)
        if row:
            _check_ids(min(row), max(row), trace, bounds)
    else:
        return  # not an input shape the engine takes: it says so itself
    if bounds.context is not None and n > bounds.context:
        fail(f"the input has {n:,} tokens; this model takes at most {bounds.context:,} (its context length)")


def _check_ids(low: int, high: int, trace: TraceIR, bounds: InputBounds) -> None:
    top = bounds.vocab_size
    for v in (low, high):
        if v < 0 or (top is not None and v >= top):
            valid = f"0..{top - 1}" if top is not None else ">= 0"
            raise ValidationError(f"token id {v} is outside the model's vocabulary ({valid})", trace.loc,
                                  code="invalid_input")


def _check_steps(steps: list[SessionStep], n_traces: int, tensors: dict) -> None:
    """Session steps: in program order, between existing traces, plain values only."""
    at = 0
    for step in steps:
        if not at <= step.at <= n_traces:
            where = "out of program order" if step.at < at else f"after trace {step.at} of {n_traces}"
            raise ValidationError(f"session step '{step.op}' is {where}", step.loc)
        at = step.at
        if step.op == "stop" and step.args:
            raise ValidationError("a session stop takes no arguments", step.loc)

        def check(tag: str, body, step: SessionStep = step) -> None:
            if tag == "$ref":
                raise ValidationError(
                    f"{step.op}() in a session body cannot use a value computed in a trace: "
                    "log it inside that trace", step.loc,
                )
            if tag == "$tensor" and body not in tensors:
                raise ValidationError(f"tensor blob {body!r} is missing from the request", step.loc)

        try:
            visit(step.args, check)
        except ArgError as exc:
            raise ValidationError(str(exc), step.loc) from None


_EVENT_OPS = frozenset(ops.MODULE_READS | ops.MODULE_WRITES)  # ops whose args[1] is a call index


def _check_forward_kwargs(trace: TraceIR) -> None:
    allowed, what = (GENERATE_KWARGS, "generate") if trace.kind == "generate" else (FORWARD_KWARGS, "forward")
    bad = set(trace.kwargs) - allowed
    if bad:
        raise ValidationError(
            f"{what} argument {min(bad)!r} is not supported (supported: {', '.join(sorted(allowed))})", trace.loc
        )


def _check_generate(trace: TraceIR, cap: int) -> None:
    """Generation length within the model's cap, and no step read past the last one: before any
    model time is spent."""
    n = trace.kwargs.get("max_new_tokens")
    if type(n) is not int or n < 1:
        raise ValidationError("generate needs max_new_tokens, an integer >= 1", trace.loc)
    if n > cap:
        raise ValidationError(
            f"max_new_tokens={n} exceeds this model's limit of {cap}", trace.loc, code="too_large"
        )
    for name in ("seed", "top_k", "min_new_tokens"):
        value = trace.kwargs.get(name)
        if value is not None and type(value) is not int:
            raise ValidationError(f"generate's {name} must be an integer", trace.loc)
    eos = trace.kwargs.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    if eos is not None and not (0 < len(ids) <= MAX_EOS_IDS and all(type(i) is int and i >= 0 for i in ids)):
        raise ValidationError(f"generate's eos_token_id must be a token id or a list of at most {MAX_EOS_IDS} "
                              "token ids (integers >= 0)", trace.loc)
    events = _EVENT_OPS
    last: dict[int | None, int] = {}  # per invoke: the latest step read so far
    for node in trace.nodes:
        if node.op not in events or type(node.args[1]) is not int:
            continue
        step = node.args[1]
        if step >= n:
            raise ValidationError(
                f"step {step} does not exist: this generation has max_new_tokens={n} (steps 0-{n - 1})",
                node.loc,
                code="out_of_range",
            )
        if step < last.get(node.invoke, 0):
            raise ValidationError(
                f"step {step} is accessed after step {last[node.invoke]}: generation steps run in order "
                "(a step loop after another one starts where the first ended; use one loop)",
                node.loc,
                code="out_of_order",
            )
        last[node.invoke] = step


def _check_trace(trace: TraceIR, tensors: dict, paths: set[str], seen: set[int]) -> None:
    _check_forward_kwargs(trace)
    for invoke in trace.invokes:
        _check_input(invoke.input, tensors, trace.loc)
    _check_input(list(trace.kwargs.values()), tensors, trace.loc)
    for node in trace.nodes:
        _check_node(node, trace, tensors, paths, seen)
        if node.id in seen:
            raise ValidationError(f"node id {node.id} is used twice", node.loc)
        seen.add(node.id)


def _check_node(node: Node, trace: TraceIR, tensors: dict, paths: set[str], seen: set[int]) -> None:
    op, a = node.op, node.args
    arity = ops.ARITY.get(op)
    if arity is not None and node.invoke is None and not node.kwargs:
        # The two most common nodes, whose arguments hold no tags to walk: a module read, a save.
        if op in ops.MODULE_READS and len(a) == 2 and type(a[0]) is str and type(a[1]) is int:
            if a[0] in paths and a[1] >= 0:
                return
        elif op == "save" and len(a) == 1 and ref_id(a[0]) in seen:
            return
    _check_any_node(node, trace, tensors, paths, seen)


def _check_any_node(node: Node, trace: TraceIR, tensors: dict, paths: set[str], seen: set[int]) -> None:
    def fail(message: str, code: str = "invalid_request") -> None:
        raise ValidationError(message, node.loc, code=code)

    op, a = node.op, node.args
    arity = ops.ARITY.get(op)
    if arity is None:
        fail(f"operation {op!r} is not supported", "unknown_op")
    lo, hi = arity
    if len(a) < lo or (hi is not None and len(a) > hi):
        fail(f"operation {op!r} takes {lo}{'' if hi == lo else '+' if hi is None else f'-{hi}'} arguments, got {len(a)}")
    if node.invoke is not None and not 0 <= node.invoke < len(trace.invokes):
        fail(f"invoke {node.invoke} does not exist in this trace")
    _check_tags(node, tensors, seen)
    if op.startswith("module."):
        if not isinstance(a[0], str) or a[0] not in paths:
            fail(f"the model '{trace.model}' has no module '{a[0]}'", "unknown_module")
        if node.op != "module.call" and (not isinstance(a[1], int) or a[1] < 0):
            fail("a module call index must be an integer >= 0")
    elif node.op == "save" and not (isinstance(a[0], dict) and "$ref" in a[0]):
        fail("save() takes a traced value")
    elif node.op == "augassign" and a[2] not in ops.IN_PLACE:
        fail(f"augassign takes an in-place operator ({', '.join(sorted(ops.IN_PLACE))}), got {a[2]!r}")
    else:
        check_node_alone(node)


# Ops with constraints that can be checked on the node alone, as soon as it is recorded.
CALL_OPS = frozenset({"method", "function", "getattr", "stop"})


def check_node_alone(node: Node) -> None:
    """The checks of a node that need nothing but the node: which methods and functions may be
    called with which keyword arguments, public attributes, stop scopes. The client's recorder
    runs them as each node is recorded, so the error comes at the user's line while tracing."""
    op, a = node.op, node.args
    if op in ("method", "function"):
        if not isinstance(a[0], str):
            raise ValidationError(f"{op} name must be a string", node.loc)
        why = ops.check_call(op, a[0], a, node.kwargs)
        if why is None and op == "method" and a[0] == "to":
            why = ops.check_to_args(a) or (
                ".to() accepts a dtype only" if set(node.kwargs) - {"dtype"} else None
            )
        if why:
            raise ValidationError(why, node.loc, code="unsupported_call")
    elif op == "getattr" and (not isinstance(a[1], str) or a[1].startswith("_")):
        raise ValidationError("attribute names must be public strings", node.loc)
    elif op == "stop" and a[0] not in ("trace", "session"):
        raise ValidationError("stop scope must be 'trace' or 'session'", node.loc)


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
