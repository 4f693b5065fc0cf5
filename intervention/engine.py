"""The engine: executes one IR trace inside a model's forward pass with PyTorch hooks.

How it runs. Each invoke is a *thread*: its nodes in program order, seeing only its own rows of
the batch (code outside invokes sees the whole batch). Module reads and writes wait for their
event (module M's input or output at call k). Hooks are installed only on the modules the trace
touches; at every hook each thread runs as far as it can: compute nodes run as soon as their inputs
exist, event nodes run when their event is the one firing. A thread waiting on an event that has
already fired is an out-of-order access; one still waiting when the forward ends names a module that
never ran. Both are errors at the user's line.

Merging traces of different requests into one forward is the same mechanism: more threads, each
with its own rows, and nothing a thread sees depends on the other threads' rows.

The engine leaves nothing behind: hooks are removed and grad mode restored in `finally`, and only
saved or exported values survive the run (views are cloned so they do not pin whole activations).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.utils import ModelOutput

from intervention import ops
from intervention.args import decode, plain_slice
from intervention.errors import ExecutionError, InterventionError
from intervention.ir import TraceIR

Event = tuple[str, str, int]  # (module path, "input" | "output", call index)
Rows = tuple[int, int] | None  # a thread's batch rows; None: the whole batch


@dataclass
class TraceResult:
    saves: dict[int, Any] = field(default_factory=dict)
    exports: dict[int, Any] = field(default_factory=dict)
    stopped: str | None = None  # "trace" or "session" when a stop node ran


class Cancelled(Exception):
    """The request was cancelled (or timed out) while its forward was running."""


class _Stop(Exception):
    def __init__(self, scope: str):
        self.scope = scope


class _Ref:
    """Placeholder for a node reference inside a compiled argument template."""

    __slots__ = ("id",)

    def __init__(self, id: int):
        self.id = id


# op -> the kind of module event it waits for; ops that wait for none are absent.
_EVENT_KIND = {
    op: "input" if op in ("module.input", "module.inputs", "module.set_input") else "output"
    for op in ops.MODULE_READS | ops.MODULE_WRITES
}


@dataclass(slots=True)  # one per node of every trace: no per-instance dict, faster attributes
class _Step:
    """A node compiled once: its event (if any), the refs it needs, and argument templates."""

    id: int
    op: str
    loc: Any
    event: Event | None
    refs: tuple[int, ...]
    args: list
    kwargs: dict
    nested: bool  # refs inside containers: bind recursively
    # Code outside invokes written after invoke blocks runs after them: (thread, steps it must
    # have run) for each invoke thread with earlier nodes.
    after: list = field(default_factory=list)


@dataclass
class _Thread:
    steps: list[_Step]
    rows: Rows
    pos: int = 0


class Engine:
    """Runs one trace. Create, call `run`, discard."""

    def __init__(
        self,
        model: torch.nn.Module,
        trace: TraceIR,
        spans: list[tuple[int, int]],
        batch_size: int,
        tensors: dict[str, torch.Tensor],
        externals: dict[int, Any],
        keep: set[int],
        on_log: Callable[[str], None],
    ):
        self.model = model
        self.trace = trace
        self.batch_size = batch_size
        self.keep = keep
        self.on_log = on_log
        self.values: dict[int, Any] = dict(externals)
        self.saved: list[int] = []
        self.fired: set[Event] = set()
        self.calls: dict[str, int] = {}
        self.paused = False
        self.inputs_replaced = False
        self.current: Any = None  # the value at the firing event (inputs or output)
        self.last_write: _Step | None = None
        self.cancel: threading.Event | None = None
        self.device = _first_device(model)
        self.threads = self._compile(trace, spans, tensors)

    # -- compile -------------------------------------------------------------------------------

    def _compile(self, trace: TraceIR, spans, tensors) -> list[_Thread]:
        by_invoke: dict[int | None, list[_Step]] = {}
        all_refs: list[int] = []  # every node's refs, in order; a node's are those it appended

        def ref(i: int) -> _Ref:
            all_refs.append(i)
            return _Ref(i)

        for node in trace.nodes:
            start = len(all_refs)
            args, top_refs = _decode_args(node.args, ref, tensors)
            kwargs = decode({"$dict": node.kwargs}, ref, tensors) if node.kwargs else {}
            refs = all_refs[start:]
            # Nested: some ref is not a top-level positional argument (it sits in a container or
            # a kwarg), so binding must recurse. Counting refs says so without a second walk.
            nested = len(refs) != top_refs
            kind = _EVENT_KIND.get(node.op)
            event = None if kind is None else (args[0], kind, args[1])
            step = _Step(node.id, node.op, node.loc, event, tuple(refs), args, kwargs, nested)
            by_invoke.setdefault(node.invoke, []).append(step)
        threads = []
        for invoke in sorted(k for k in by_invoke if k is not None):
            s, e = spans[invoke]
            rows = None if (s, e) == (0, self.batch_size) else (s, e)
            threads.append(_Thread(by_invoke[invoke], rows))
        if None in by_invoke:
            body = _Thread(by_invoke[None], None)
            for step in body.steps if threads else ():  # no invoke threads: nothing to wait for
                step.after = [(t, n) for t in threads if (n := sum(1 for x in t.steps if x.id < step.id))]
            threads.append(body)
        return threads

    # -- run -----------------------------------------------------------------------------------

    def run(self, batch: dict[str, Any], forward_kwargs: dict[str, Any]) -> TraceResult:
        result = TraceResult()
        handles = []
        try:
            with torch.no_grad():
                handles = self._install_hooks()
                try:
                    self._advance(None)
                    self.model(**batch, **forward_kwargs)
                    self._advance(None)
                    self._check_finished()
                except _Stop as stop:
                    result.stopped = stop.scope
                except (InterventionError, Cancelled):
                    raise
                except Exception as exc:  # the model itself failed, probably because of an edit
                    raise self._forward_error(exc) from exc
            self._collect(result)
            return result
        finally:
            for h in handles:
                h.remove()
            self.values.clear()
            self.current = None

    def _install_hooks(self) -> list:
        first: dict[str, _Step] = {}  # path -> its first step, for errors that name a line
        for t in self.threads:
            for s in t.steps:
                if s.event and s.event[0] not in first:
                    first[s.event[0]] = s
        # With one thread, firing an event no step waits for changes nothing (the thread already
        # ran up to its next event), so modules whose inputs nobody reads get only the output
        # hook, which then counts the calls: a torch pre-hook costs ~3 us per module call.
        # Several threads can unblock each other at any event, so they keep every hook.
        inputs_read = {s.event[0] for t in self.threads for s in t.steps if s.event and s.event[1] == "input"}
        lean = len(self.threads) == 1
        handles = []
        # prepend: our edits come before any hook already there, e.g. the output-capturing hooks
        # transformers keeps once output_hidden_states was used, so `hidden_states` shows them
        # on every run, not only on the run that installed those hooks (nnsight does the same).
        for path in sorted(first):
            module = _submodule(self.model, path, first[path])
            self.calls[path] = 0
            if lean and path not in inputs_read:
                handles.append(module.register_forward_hook(self._hook(path, counts=True), prepend=True))
                continue
            handles.append(
                module.register_forward_pre_hook(self._pre_hook(path), with_kwargs=True, prepend=True)
            )
            handles.append(module.register_forward_hook(self._hook(path), prepend=True))
        return handles

    def _pre_hook(self, path: str):
        def hook(module, args, kwargs):
            if self.paused:
                return None
            call = self.calls[path]
            self.calls[path] = call + 1
            self.current = [list(args), dict(kwargs)]
            self.inputs_replaced = False
            self._fire((path, "input", call))
            (args2, kwargs2), self.current = self.current, None
            return (tuple(args2), kwargs2) if self.inputs_replaced else None

        return hook

    def _hook(self, path: str, counts: bool = False):
        """The output hook; `counts`: there is no pre-hook, so this one counts the calls."""

        def hook(module, args, output):
            if self.paused:
                return None
            if counts:
                self.calls[path] += 1
            self.current = output
            self._fire((path, "output", self.calls[path] - 1))
            new, self.current = self.current, None
            return None if new is output else new

        return hook

    def _fire(self, event: Event) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("the request was cancelled")
        self.fired.add(event)
        self._advance(event)

    def _advance(self, event: Event | None) -> None:
        for thread in self.threads:
            self._run_thread(thread, event)

    def _run_thread(self, thread: _Thread, event: Event | None) -> None:
        steps, values = thread.steps, self.values
        while thread.pos < len(steps):
            step = steps[thread.pos]
            if step.after and any(t.pos < n for t, n in step.after):
                return  # invoke code written before this line has not run yet
            if step.event is not None:
                if step.event != event:
                    if step.event in self.fired:
                        raise _out_of_order(step)
                    return
                self._run_module_step(step, thread.rows)
            else:
                for r in step.refs:
                    if r not in values:
                        return  # a value another invoke has not computed yet
                self._run_step(step)
            thread.pos += 1

    def _check_finished(self) -> None:
        for thread in self.threads:
            if thread.pos < len(thread.steps):
                step = thread.steps[thread.pos]
                if step.event and step.event in self.fired:
                    raise _out_of_order(step)
                if step.event:
                    path, kind, call = step.event
                    which = f" a {call + 1}th time" if call else ""
                    raise ExecutionError(
                        f"module '{path}' was not called{which} during this forward pass, so its "
                        f"{kind} does not exist",
                        step.loc,
                        code="module_not_called",
                    )
                raise ExecutionError("this value depends on a value that was never computed", step.loc)

    # -- steps ---------------------------------------------------------------------------------

    def _bind(self, step: _Step) -> tuple[list, dict]:
        values = self.values
        if step.nested:
            return _bind(step.args, values), _bind(step.kwargs, values)
        args = [values[a.id] if type(a) is _Ref else a for a in step.args]
        return args, step.kwargs

    def _run_module_step(self, step: _Step, rows: Rows) -> None:
        try:
            op, kind = step.op, step.event[1]
            if op in ops.MODULE_READS:  # a read's arguments are constants: nothing to bind
                self.values[step.id] = self._read(op, rows)
            else:
                args, _ = self._bind(step)
                self._write(kind, args[2], rows)
                self.last_write = step
        except InterventionError:
            raise
        except Exception as exc:
            raise ExecutionError(f"{type(exc).__name__}: {exc}", step.loc) from exc

    def _read(self, op: str, rows: Rows) -> Any:
        if op == "module.output":
            return _narrow(self.current, rows, self.batch_size)
        args, kwargs = self.current
        if op == "module.inputs":
            return _narrow((tuple(args), kwargs), rows, self.batch_size)
        return _narrow(_first_input(args, kwargs), rows, self.batch_size)

    def _write(self, kind: str, value: Any, rows: Rows) -> None:
        if kind == "output":
            value = _to_device_of(value, self.current)
            if rows is None:
                self.current = value
            else:
                _write_rows(self.current, value, rows, self.batch_size)
            return
        args, kwargs = self.current
        target = _first_input(args, kwargs)
        value = _to_device_of(value, target)
        if rows is not None:
            _write_rows(target, value, rows, self.batch_size)
        elif args:
            args[0] = value
            self.inputs_replaced = True
        else:
            kwargs[next(iter(kwargs))] = value
            self.inputs_replaced = True

    def _run_step(self, step: _Step) -> None:
        values = self.values
        try:
            if step.nested:
                args, kwargs = self._bind(step)
            else:  # _bind's common case inline: this runs for every computed value
                args = [values[a.id] if type(a) is _Ref else a for a in step.args]
                kwargs = step.kwargs
            values[step.id] = self._execute(step, args, kwargs)
        except (InterventionError, _Stop):
            raise
        except Exception as exc:
            raise ExecutionError(f"{type(exc).__name__}: {exc}", step.loc) from exc

    def _execute(self, step: _Step, args: list, kwargs: dict) -> Any:
        op = step.op
        if op == "save":  # one per saved value, the most common op: test it first
            self.saved.append(step.refs[0])
            return None
        if self.device.type != "cpu":
            args = _same_device(args, self.device)
        if op == "getitem":
            return args[0][args[1]]
        if op == "setitem":
            args[0][args[1]] = args[2]
            self.last_write = step
            return None
        fn = ops.BINARY.get(op) or ops.UNARY.get(op)
        if fn is not None:
            if op.startswith("i"):
                self.last_write = step
            return fn(*args)
        if op == "method":
            name, obj = args[0], args[1]
            if not isinstance(obj, torch.Tensor):
                raise TypeError(f".{name}() needs a tensor, got {type(obj).__name__}")
            if name.endswith("_"):
                self.last_write = step
            if name in ops.ALLOCATING_METHODS:
                ops.check_allocation(name, args[2:], kwargs, obj)
            return getattr(obj, name)(*args[2:], **kwargs)
        if op == "function":
            if args[0] in ops.ALLOCATING_FUNCTIONS:
                ops.check_allocation(args[0], args[1:], kwargs)
            return ops.FUNCTIONS[args[0]](*args[1:], **kwargs)
        if op == "getattr":
            return _getattr(args[0], args[1])
        if op == "module.call":
            return self._call_module(step, args, kwargs)
        if op == "log":
            self.on_log(" ".join(_log_text(a) for a in args))
            return None
        if op == "stop":
            raise _Stop(args[0])
        raise ExecutionError(f"unknown op {op!r}", step.loc)

    def _call_module(self, step: _Step, args: list, kwargs: dict) -> Any:
        module = _submodule(self.model, args[0], step)
        inputs = [_to_device_of(a, _first_device(module)) for a in args[1:]]
        self.paused = True  # our own hooks must not see calls the user makes explicitly
        try:
            return module(*inputs, **kwargs)
        finally:
            self.paused = False

    # -- results -------------------------------------------------------------------------------

    def _collect(self, result: TraceResult) -> None:
        for i in self.saved:
            if i in self.values:
                result.saves[i] = _materialize(self.values[i])
        for i in self.keep:
            if i in self.values:
                result.exports[i] = _materialize(self.values[i])

    def _forward_error(self, exc: Exception) -> ExecutionError:
        msg = f"{type(exc).__name__}: {exc}"
        if self.last_write is not None:
            return ExecutionError(f"the model failed after this intervention: {msg}", self.last_write.loc)
        return ExecutionError(f"the model's forward pass failed: {msg}", self.trace.loc)


def _decode_args(args: list, ref, tensors) -> tuple[list, int]:
    """`decode(args, ref, tensors)` with its most common cases inline (a top-level ref, a
    scalar, a plain slice): this runs for every node of every trace. Also returns how many refs
    sit at the top level, which tells `_compile` whether binding must recurse."""
    out = []
    top_refs = 0
    for a in args:
        if type(a) is dict and len(a) == 1 and type(a.get("$ref")) is int:
            out.append(ref(a["$ref"]))
            top_refs += 1
        elif not isinstance(a, (list, dict)):
            out.append(a)
        elif (body := plain_slice(a)) is not None:
            out.append(slice(*body))
        else:
            out.append(decode(a, ref, tensors))
    return out, top_refs


def run_trace(
    model: torch.nn.Module,
    trace: TraceIR,
    batch: dict[str, Any],
    spans: list[tuple[int, int]],
    *,
    tensors: dict[str, torch.Tensor] | None = None,
    externals: dict[int, Any] | None = None,
    keep: set[int] | None = None,
    on_log: Callable[[str], None] = print,
    cancel: threading.Event | None = None,
) -> TraceResult:
    """Execute `trace` in one forward of `model` on `batch` (rows of invoke i: `spans[i]`).

    Setting `cancel` (from another thread) aborts the forward at the next module boundary."""
    device = _first_device(model)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch_size = next(iter(batch.values())).shape[0]
    forward_kwargs = decode({"$dict": trace.kwargs}, _no_refs, tensors or {})
    engine = Engine(model, trace, spans, batch_size, tensors or {}, externals or {}, keep or set(), on_log)
    engine.cancel = cancel
    return engine.run(batch, forward_kwargs)


# -- helpers -----------------------------------------------------------------------------------


def _no_refs(i: int) -> Any:
    raise InterventionError("forward keyword arguments cannot refer to values of the trace")


def _bind(value: Any, values: dict[int, Any]) -> Any:
    if isinstance(value, _Ref):
        return values[value.id]
    if isinstance(value, list):
        return [_bind(v, values) for v in value]
    if isinstance(value, tuple):
        return tuple(_bind(v, values) for v in value)
    if isinstance(value, dict):
        return {k: _bind(v, values) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_bind(value.start, values), _bind(value.stop, values), _bind(value.step, values))
    return value


def _submodule(model: torch.nn.Module, path: str, step: _Step) -> torch.nn.Module:
    # Walks `_modules` (where every submodule is registered) rather than `get_submodule`, whose
    # getattr per path part is ~15x slower; this runs for every hooked module of every trace.
    module = model
    for name in path.split(".") if path else ():
        module = module._modules.get(name)
        if module is None:
            raise ExecutionError(f"the model has no module '{path}'", step.loc, code="unknown_module")
    return module


def _first_input(args: list, kwargs: dict) -> Any:
    if args:
        return args[0]
    if kwargs:
        return next(iter(kwargs.values()))
    raise ValueError("this module was called without inputs")


def _narrow(value: Any, rows: Rows, batch: int) -> Any:
    """The rows of `value` a thread may see. Views, so in-place edits reach the model."""
    if rows is None:
        return value
    if isinstance(value, torch.Tensor):
        return value[rows[0] : rows[1]] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, ModelOutput):
        return type(value)(**{k: _narrow(v, rows, batch) for k, v in value.items()})
    if isinstance(value, tuple):
        return tuple(_narrow(v, rows, batch) for v in value)
    if isinstance(value, list):
        return [_narrow(v, rows, batch) for v in value]
    if isinstance(value, dict):
        return {k: _narrow(v, rows, batch) for k, v in value.items()}
    return value


def _write_rows(target: Any, value: Any, rows: tuple[int, int], batch: int) -> None:
    if isinstance(target, torch.Tensor):
        target[rows[0] : rows[1]] = value
    elif isinstance(target, (tuple, list)) and isinstance(value, (tuple, list)):
        for t, v in zip(target, value, strict=True):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == batch:
                t[rows[0] : rows[1]] = v
    else:
        raise TypeError(f"cannot assign a {type(value).__name__} to part of a {type(target).__name__}")


def _getattr(obj: Any, name: str) -> Any:
    if isinstance(obj, torch.Tensor):
        if name not in ops.TENSOR_ATTRS:
            raise AttributeError(f"tensor attribute .{name} is not supported inside a trace")
        return getattr(obj, name)
    if isinstance(obj, ModelOutput) and not name.startswith("_") and name in obj.__dataclass_fields__:
        return getattr(obj, name)
    # torch's named results (topk, max(dim=...), sort...): `.values` and `.indices`.
    if type(obj).__module__ == "torch.return_types" and name in type(obj).__match_args__:
        return getattr(obj, name)
    raise AttributeError(f"{type(obj).__name__} has no readable attribute .{name}")


def _first_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _to_device_of(value: Any, like: Any) -> Any:
    if isinstance(value, torch.Tensor) and isinstance(like, torch.Tensor) and value.device != like.device:
        return value.to(like.device)
    if isinstance(value, torch.Tensor) and isinstance(like, torch.device) and value.device != like:
        return value.to(like)
    return value


def _same_device(args: list, default: torch.device) -> list:
    """Client tensors arrive on the CPU; move them next to the model's tensors they meet."""
    devices = {a.device for a in args if isinstance(a, torch.Tensor)}
    if len(devices) < 2:
        return args
    target = next((d for d in devices if d.type != "cpu"), default)
    return [a.to(target) if isinstance(a, torch.Tensor) and a.device.type == "cpu" else a for a in args]


def _materialize(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.clone() if value._base is not None else value
    if isinstance(value, ModelOutput):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_materialize(v) for v in value) if type(value) in (tuple, list) else value
    if isinstance(value, dict):
        return {k: _materialize(v) for k, v in value.items()}
    return value


def _log_text(value: Any) -> str:
    return str(value)


def _out_of_order(step: _Step) -> ExecutionError:
    path, kind, _ = step.event
    return ExecutionError(
        f"'{path}' {kind} was accessed after the model had already run past it: access modules "
        "in the order the model executes them",
        step.loc,
        code="out_of_order",
    )
