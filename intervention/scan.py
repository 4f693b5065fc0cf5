"""Shape checks before model time: a session's traces run on meta tensors (like nnsight's `scan`).

The engine itself runs each trace — the same `Program`, `Interleaver` and `run_programs` — over a
`ScanDriver` instead of a forward pass: it fires the model's module events with meta tensors
(shapes and dtypes, no data) of the trace's batch size and length. Bad indexing, shape mismatches
in edits and operators fail there, at the user's line, before any forward; values computed in one
trace reach later traces as meta tensors too.

What a module's event carries is recorded once per model (`record_events`): two forwards of a
meta-device copy of the model at two batch shapes tell, for every dimension of every tensor,
whether it is the batch size, the sequence length, their product or a constant. A trace of any
shape then costs only its own nodes on meta tensors. Anything the recording cannot describe (a KV
cache object, a value that depends on padding) makes the scan of a trace that reads it give up:
the scan only reports what is certain to fail on the real model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.utils import ModelOutput

from intervention.drivers import ForwardDriver
from intervention.engine import run_programs
from intervention.errors import ExecutionError, InterventionError
from intervention.interleaver import Ended, Interleaver
from intervention.ir import SessionIR, TraceIR
from intervention.plan import plan_session
from intervention.program import FAILED, STOPPED, Program
from intervention.values import Shape

Event = tuple[str, str, int]

# The two batch shapes the recording runs at: (batch, length). Distinct primes, so no dimension
# that is a constant of the model can be mistaken for the batch size or the length.
_PROBES = ((2, 5), (3, 7))


class _Unknown:
    """A value the recording cannot describe."""


UNKNOWN = _Unknown()


@dataclass
class ModelEvents:
    """A model's module events in firing order, each with a template of its value."""

    events: list[tuple[Event, Any]]
    tensor_kinds: dict[tuple[str, str], bool] = field(default_factory=dict)  # (path, kind) -> a tensor?
    # (path, kind) -> indices of its events: a trace touches a few modules of thousands
    positions: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, ((path, kind, _), _) in enumerate(self.events):
            self.positions.setdefault((path, kind), []).append(i)


def record_events(meta_model: torch.nn.Module) -> ModelEvents:
    """Run `meta_model` (on the meta device) at two batch shapes and describe each event's value
    as a template: tensor dims as "B", "T", "BT" or a constant."""
    runs = [_record(meta_model, b, t) for b, t in _PROBES]
    first, second = runs
    if [e for e, _ in first] != [e for e, _ in second]:
        raise ValueError("the model's module events depend on the input length")
    events = [(event, _merge(a, b)) for (event, a), (_, b) in zip(first, second, strict=True)]
    kinds = {(path, kind): isinstance(tpl, _TensorTemplate) for (path, kind, call), tpl in events if call == 0}
    return ModelEvents(events, kinds)


def _record(model: torch.nn.Module, batch: int, length: int) -> list[tuple[Event, Any]]:
    seen: list[tuple[Event, Any]] = []
    calls: dict[str, int] = {}
    handles = []

    def pre(path: str) -> Callable:
        def hook(module, args, kwargs):
            call = calls.get(path, 0)
            calls[path] = call + 1
            # None among a module's inputs is what this padding-free probe passes (e.g. no
            # attention mask); the real batch may pass a tensor there: unknown.
            seen.append(((path, "input", call), [_describe(list(args), True), _describe(dict(kwargs), True)]))

        return hook

    def post(path: str) -> Callable:
        def hook(module, args, kwargs, output):
            seen.append(((path, "output", calls[path] - 1), _describe(output, False)))

        return hook

    quiet = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre(path), with_kwargs=True))
        handles.append(module.register_forward_hook(post(path), with_kwargs=True))
        if hasattr(module, _PAD_WARNING):  # reads token ids (GPT-2): no data on the meta device
            module.__dict__[_PAD_WARNING] = _no_warning
            quiet.append(module)
    try:
        ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
        for module in quiet:
            module.__dict__.pop(_PAD_WARNING, None)
    return [(e, _with_probe(v, batch, length)) for e, v in seen]


_PAD_WARNING = "warn_if_padding_and_no_attention_mask"


def _no_warning(*args: Any, **kwargs: Any) -> None:
    pass


@dataclass(frozen=True)
class _TensorTemplate:
    dims: tuple  # ints, or per probe shape the raw size (merged into "B", "T", "BT" or an int)
    dtype: torch.dtype


def _describe(value: Any, inputs: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return _TensorTemplate(tuple(value.shape), value.dtype)
    if value is None:
        return UNKNOWN if inputs else None
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, ModelOutput):
        return (type(value), {k: _describe(v, inputs) for k, v in value.items()})
    if type(value) in (tuple, list):
        return type(value)(_describe(v, inputs) for v in value)
    if type(value) is dict:
        return {k: _describe(v, inputs) for k, v in value.items()}
    return UNKNOWN


def _with_probe(template: Any, batch: int, length: int) -> Any:
    return ("probe", batch, length, template)


def _merge(a: Any, b: Any) -> Any:
    """Two probes' descriptions of one event -> one template (UNKNOWN where they disagree)."""
    _, b1, t1, x = a
    _, b2, t2, y = b

    def merge(x: Any, y: Any) -> Any:
        if isinstance(x, _TensorTemplate) and isinstance(y, _TensorTemplate):
            if len(x.dims) != len(y.dims) or x.dtype != y.dtype:
                return UNKNOWN
            dims = []
            for d1, d2 in zip(x.dims, y.dims, strict=True):
                if d1 == d2:
                    dims.append(d1)
                elif (d1, d2) == (b1, b2):
                    dims.append("B")
                elif (d1, d2) == (t1, t2):
                    dims.append("T")
                elif (d1, d2) == (b1 * t1, b2 * t2):
                    dims.append("BT")
                else:
                    return UNKNOWN
            return _TensorTemplate(tuple(dims), x.dtype)
        if type(x) is not type(y):
            return UNKNOWN
        if type(x) in (tuple, list):
            if len(x) != len(y):
                return UNKNOWN
            return type(x)(merge(p, q) for p, q in zip(x, y, strict=True))
        if type(x) is dict:
            if x.keys() != y.keys():
                return UNKNOWN
            return {k: merge(x[k], y[k]) for k in x}
        return x if x == y else UNKNOWN

    return merge(x, y)


def _build(template: Any, batch: int, length: int) -> Any:
    """The meta value of a template at this batch shape; raises _GiveUp where it is unknown."""
    if isinstance(template, _TensorTemplate):
        sizes = {"B": batch, "T": length, "BT": batch * length}
        shape = tuple(sizes.get(d, d) if isinstance(d, str) else d for d in template.dims)
        return torch.empty(shape, dtype=template.dtype, device="meta")
    if template is UNKNOWN:
        raise _GiveUp
    if type(template) is tuple and len(template) == 2 and isinstance(template[0], type) \
            and issubclass(template[0], ModelOutput):
        cls, fields = template
        return cls(**{k: _build(v, batch, length) for k, v in fields.items()})
    if type(template) in (tuple, list):
        return type(template)(_build(v, batch, length) for v in template)
    if type(template) is dict:
        return {k: _build(v, batch, length) for k, v in template.items()}
    return template


class _GiveUp(Exception):
    """The scan cannot describe what a trace reads: the real run decides."""


class ScanDriver:
    """Fires the recorded module events with meta values of one batch shape, in order."""

    grad = False

    def __init__(self, events: ModelEvents, shape: Shape, length: int):
        self.events = events
        self.shape = shape
        self.length = length
        self.gave_up = False

    def run(self, model: torch.nn.Module, il: Interleaver) -> None:
        wanted: dict[str, set[str]] = {}
        for program in il.programs:
            for path, kinds in program.events.items():
                wanted.setdefault(path, set()).update(kinds)
        batch, positions, events = self.shape.batch, self.events.positions, self.events.events
        picked = sorted(i for path, kinds in wanted.items() for kind in kinds for i in positions.get((path, kind), ()))
        for i in picked:
            event, template = events[i]
            try:
                il.current = _build(template, batch, self.length)
            except _GiveUp:
                self.gave_up = True
                raise Ended from None
            il.fire(event)
            il.current = None
            if not any(p.running for p in il.programs):
                raise Ended


# Errors of a step on meta tensors that the real tensors would raise too (shapes, indexing).
# Anything else — an op meta tensors do not support, a value that depends on data — is left to
# the real run.
def _certain(error: InterventionError) -> bool:
    cause = error.__cause__
    if not isinstance(cause, (IndexError, RuntimeError)) or isinstance(cause, NotImplementedError):
        return False
    text = str(cause).lower()
    # dtypes: the scan's model dtype is a guess where the server does not say it
    return not any(w in text for w in ("meta", "data-dependent", "item()", "symbolic", "dtype", "scalar type"))


def scan_session(
    session: SessionIR,
    tensors: dict[str, torch.Tensor],
    models: Callable[[TraceIR], tuple[torch.nn.Module, Any, ModelEvents] | None],
) -> None:
    """Run the session's traces on meta tensors, in order; raise the first certain error.
    `models(trace)` -> (meta module, tokenizer, recorded events) of its model, or None: not
    checked (and, as later traces may use its values, neither are they)."""
    plan = plan_session(session)
    values: dict[int, Any] = {}
    for segment in plan.segments:
        for trace, keep in zip(segment.traces, segment.keeps, strict=True):
            # Forward kwargs (output_attentions, ...) change what modules return: not recorded.
            found = models(trace) if trace.kind == "forward" and not trace.kwargs else None
            if found is None:
                return  # later traces may use its values: nothing more can be checked
            meta, tokenizer, events = found
            try:
                program = Program(trace, tensors=tensors, externals=values, keep=keep, on_log=_quiet)
            except InterventionError:
                return  # malformed: validation says so
            driver = ForwardDriver.for_programs(tokenizer, [program])
            if driver is None:
                return  # a bad input: the validator or the real run says so
            scan = ScanDriver(events, driver.shape, driver.batch.kwargs["input_ids"].shape[1])
            run_programs(meta, [program], scan)
            if scan.gave_up:
                return
            if program.state is FAILED:
                if isinstance(program.error, ExecutionError) and _certain(program.error):
                    raise _from_scan(program.error)
                return
            if program.state is STOPPED and program.stopped == "session":
                return
            values.update(program.result().exports)


def _quiet(message: str) -> None:
    """Logs of a scan print nothing: the real run prints them."""


def _from_scan(error: ExecutionError) -> ExecutionError:
    """The program's error (with its hint, if the engine gave one: intervention/hints.py), said to
    come from the shape check."""
    first, sep, hint = error.message.partition("\nhint: ")
    message = f"{first} (found by the shape check, before running the model){sep}{hint}"
    return ExecutionError(message, error.location, code="shape_error")


def expand_layers(short: ModelEvents, blocks: str, n_layers: int) -> ModelEvents:
    """The events of a model with `n_layers` identical decoder layers under `blocks` (e.g.
    "model.layers"), from a recording of the same model built with two: layer 1's events, renamed,
    stand for every layer after it. Recording a 70B-sized model's 80 layers on the meta device
    takes seconds; two take a fraction. Raises ValueError if layer 1's events are not one
    contiguous run (the caller then records the whole model)."""
    prefix = f"{blocks}.1"
    inside = [i for i, ((path, _, _), _) in enumerate(short.events) if path == prefix or path.startswith(prefix + ".")]
    if not inside or inside != list(range(inside[0], inside[-1] + 1)):
        raise ValueError(f"the events of '{prefix}' are not contiguous")
    first, last = inside[0], inside[-1] + 1
    layer = short.events[first:last]
    events = list(short.events[:last])
    for k in range(2, n_layers):
        name = f"{blocks}.{k}"
        events += [((name + path[len(prefix):], kind, call), tpl) for (path, kind, call), tpl in layer]
    events += short.events[last:]
    return ModelEvents(events, {
        **short.tensor_kinds,
        **{(f"{blocks}.{k}" + p[len(prefix):], kind): v
           for (p, kind), v in short.tensor_kinds.items() if p == prefix or p.startswith(prefix + ".")
           for k in range(2, n_layers)},
    })
