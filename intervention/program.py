"""A program: one trace of one request, compiled for the engine.

Compiling turns the trace's nodes into *steps* grouped into *threads*: one thread per invoke (its
nodes in program order, seeing only its rows) and one for the code outside invokes (seeing all the
program's rows). A step either waits for a module event — module M's input or output at its k-th
call — or computes a value from earlier values. The interleaver hands each event to every running
program; a program then runs each of its threads as far as it can. A thread waiting on an event
that has already passed is an out-of-order access; one still waiting when the driver is done names
a module that never ran. Both are errors at the user's line.

A program owns everything that belongs to one request: its values (node ids are per session, so
two requests' ids never meet), its rows of the batch, its cancel flag, its stop and its error. One
program's stop, error or cancel ends that program only; the others run on in the same forward.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers.utils import ModelOutput

from intervention import ops
from intervention.args import ArgError, decode, decode_list, ref_id
from intervention.errors import Cancelled, ExecutionError, InterventionError
from intervention.hints import tuple_habit
from intervention.ir import Node, TraceIR
from intervention.order import out_of_order
from intervention.values import (
    Rows,
    Shape,
    first_input,
    materialize,
    narrow,
    narrow_result,
    nbytes,
    same_device,
    to_device_of,
    write_rows,
)

Event = tuple[str, str, int]  # (module path, "input" | "output", call index)

# Fired once the driver's model call has returned, with what it returned (`tracer.result`).
RESULT_EVENT: Event = ("", "result", 0)


class Interleaver(Protocol):
    """What a program needs of the interleaver running it (intervention.interleaver)."""

    current: Any  # the value at the event being dispatched: an output, or [args, kwargs]
    inputs_replaced: bool
    shape: Shape
    fired: set[Event]

    def call_module(self, path: str, args: list, kwargs: dict, loc: Any) -> Any: ...

RUNNING, DONE, STOPPED, FAILED, CANCELLED = "running", "done", "stopped", "failed", "cancelled"


@dataclass
class ProgramResult:
    """What one program produced: saved values and values later traces need (node id -> value),
    how it ended, and its error if it failed."""

    saves: dict[int, Any] = field(default_factory=dict)
    exports: dict[int, Any] = field(default_factory=dict)
    stopped: str | None = None  # "trace" or "session" when a stop node ran
    error: InterventionError | None = None


class _Stop(Exception):
    def __init__(self, scope: str):
        self.scope = scope


class _Ref:
    """Placeholder for a node reference inside a compiled argument template."""

    __slots__ = ("id",)

    def __init__(self, id: int):
        self.id = id


# op -> the kind of module event it waits for; ops that wait for none are absent.
EVENT_KIND = {
    op: "input" if op in ops.INPUT_OPS else "output" for op in ops.MODULE_READS | ops.MODULE_WRITES
}
# A program's `events` map a module path to one of these three sets, never another (so the
# interleaver can key its cached wrappers on the set itself): see `add_event`.
KINDS: dict[str, frozenset[str]] = {"input": frozenset({"input"}), "output": frozenset({"output"})}
BOTH_KINDS = frozenset({"input", "output"})


def add_event(events: dict[str, frozenset[str]], path: str, kind: str) -> None:
    """Note that a step waits for `path`'s `kind` events."""
    kinds = events.get(path)
    if kinds is None:
        events[path] = KINDS[kind]
    elif kind not in kinds:
        events[path] = BOTH_KINDS


class Step:
    """A node compiled once: its event (if any), the values it needs, an argument template, and
    the function that computes it. One per node of every trace: slots, positional construction.

    The template is the node's decoded arguments with None where a top-level reference goes;
    `slots` says which (index, node id). References nested in containers or keyword arguments
    are `_Ref` placeholders instead, bound recursively (`nested`)."""

    __slots__ = ("after", "args", "event", "fn", "id", "kwargs", "loc", "nested", "op", "refs", "run",
                 "slots", "writes")
    saves = False  # see ReadSaveStep
    edits = False  # see ReadEditStep

    def __init__(self, id: int, op: str, loc: Any, event: Event | None, refs: tuple[int, ...],
                 args: list, kwargs: dict, slots: tuple, nested: bool):
        # One assignment each: a step is made per node of every trace, and unpacking tuples
        # into several attributes at once costs more.
        self.id = id
        self.op = op
        self.loc = loc
        self.event = event
        self.refs = refs
        self.args = args
        self.kwargs = kwargs
        self.slots = slots
        self.nested = nested
        # How it computes: `fn(*args)` for plain operators (most steps), else
        # `run(program, step, args, kwargs)`; `writes`: it edits a tensor in place.
        how = _HOW.get(op, _UNKNOWN)
        self.fn = how[0]
        self.run = how[1]
        self.writes = how[2]
        # Code outside invokes written after invoke blocks runs after them: (thread, steps it
        # must have run) for each invoke thread with earlier nodes.
        self.after: list = _NONE


# Steps made while recording (`Recording`), one per recorded operation, are made with `_new(cls)`
# and a store per slot, every slot the class's __init__ sets: calling the class costs a type call
# and an __init__ frame on top (in CPython 3.11, ~40% of making one).
_new = object.__new__
_CPU = torch.device("cpu")  # made once: a device object costs more than a program's attributes
_NONE: list = []  # shared empty `after`: never mutated, only replaced
_NO_KWARGS: dict = {}  # shared empty keyword arguments: runners never mutate theirs
_SAVE_ARGS = [None]  # a save's template: its one argument is its reference, read from `refs`


class ReadStep:
    """A `Step` for the commonest node, a module read (or `tracer.result`): the same attributes,
    but only those that differ per node are stored, the rest are constants of the class (a read
    has no references, nothing to bind, and writes nothing). Reads are most of the steps made,
    so each one costs five stores instead of thirteen."""

    __slots__ = ("after", "args", "edit", "event", "id", "loc", "op")  # edit: see ReadEditStep
    refs: tuple = ()
    kwargs: dict = {}  # noqa: RUF012 - never mutated
    slots: tuple = ()
    nested = False
    fn = None
    writes = False
    saves = False  # see ReadSaveStep
    edits = False  # see ReadEditStep

    def __init__(self, id: int, op: str, loc: Any, event: Event, args: list):
        self.id = id
        self.op = op
        self.loc = loc
        self.event = event
        self.args = args
        self.after: list = _NONE


class ReadSaveStep(ReadStep):
    """A read whose very next node (same invoke) is `.save()` of it — `module.output.save()`,
    the commonest pair. The program appends the save when it runs the read, so the pair costs one
    step instead of two. Only where a save cannot fail (no cap on saved bytes: local runs), as
    a failing save must name its own line. A ReadStep becomes one by `__class__` assignment
    (same slots), when `_compile` meets the save."""

    __slots__ = ()
    saves = True


class ReadEditStep(ReadStep):
    """A read whose very next node (same invoke) is an augassign of the value read with a
    scalar — `module.output[:] += 0.5`, the commonest edit: the program runs the edit (`edit`,
    an `Edit`, which keeps its own line for errors) on the value as soon as it is read, one
    step instead of two. A ReadStep becomes one (`__class__` assignment, same slots) in
    `Recording.augassign` (local runs)."""

    __slots__ = ()
    edits = True


class Edit:
    """The augassign `target[index] op= value` of a ReadEditStep, its target the value read:
    `fn(target, index, op, value)`; `binary`: the operator itself when `fn` is
    `_augassign_whole` (which the program runs inline), else None. Also what `last_write`
    names (its line) if the model fails after it."""

    __slots__ = ("binary", "fn", "id", "index", "loc", "op", "value")

    def __init__(self, id: int, loc: Any, fn: Callable, index: Any, op: str, value: Any):
        self.id = id
        self.loc = loc
        self.fn = fn
        self.index = index
        self.op = op
        self.value = value
        self.binary = ops.BINARY[op] if fn is _augassign_whole else None


class SaveStep:
    """A `Step` for `x.save()` of a node reference, the next commonest node, stored likewise."""

    __slots__ = ("after", "id", "loc", "refs")
    op = "save"
    event = None
    args = _SAVE_ARGS
    kwargs: dict = {}  # noqa: RUF012 - never mutated
    slots: tuple = ()
    nested = False
    fn = None
    writes = False

    def __init__(self, id: int, loc: Any, refs: tuple[int]):
        self.id = id
        self.loc = loc
        self.refs = refs
        self.after: list = _NONE


class Thread:
    __slots__ = ("invoke", "pos", "rows", "steps")

    def __init__(self, steps: list[Step], invoke: int | None = None):
        self.steps = steps
        self.invoke = invoke  # which invoke's rows it sees (None: code outside invokes)
        self.rows: Rows = None
        self.pos = 0


class Program:
    """One trace compiled; `Interleaver` runs it, alone or beside others, in one driver run."""

    def __init__(
        self,
        trace: TraceIR,
        *,
        tensors: dict[str, torch.Tensor] | None = None,
        externals: dict[int, Any] | None = None,
        keep: set[int] | frozenset[int] = frozenset(),
        on_log: Callable[[str], None] = print,
        cancel: threading.Event | None = None,
        max_bytes: int | None = None,
        max_saved_bytes: int | None = None,
        recorded: dict[int, Recording] | None = None,
    ):
        """`recorded`: id(trace) -> its `Recording`, the steps compiled while the recorder in
        this process recorded its nodes (local runs: client_sdk's Graph.recordings); a trace
        found there is not compiled from its IR again. Taken out (used once)."""
        self.trace = trace
        self.tensors = tensors or {}
        self.keep = keep
        self.on_log = on_log
        self.cancel = cancel
        # What the tensors its steps allocate may hold (None: unbounded, as locally; servers set
        # limits.max_trace_bytes, default intervention.limits.MAX_TRACE_BYTES).
        self.max_bytes = max_bytes
        self.held = 0  # bytes of the tensors its steps allocated (see _hold)
        # What its saved values may hold in all (on servers: what is left of the request's
        # limits.max_saved_bytes); None: no cap, as in local runs. `saved_bytes`: counted so far.
        self.max_saved_bytes = max_saved_bytes
        self.saved_bytes = 0
        self.storages: set[int] = set()
        self.values: dict[int, Any] = dict(externals) if externals else {}
        self.saved: list[int] = []
        self.state = RUNNING
        self.error: InterventionError | None = None
        self.stopped: str | None = None
        self.last_write: Step | None = None
        self.device = _CPU  # the model's; set by the interleaver that runs it
        self.plain = True  # the model is on the CPU: client tensors need no moving
        self.interleaver: Interleaver | None = None
        # module path -> the event kinds some step waits for ("input", "output"): see KINDS
        self.events: dict[str, frozenset[str]] = {}
        # Gradients: node id -> (the tensor whose .grad holds its gradient, rows), for the values
        # some `grad` node asks for; the driver runs with grad mode on when any backward is there.
        self.grad_sources: dict[int, tuple[torch.Tensor, Rows]] = {}
        rec = recorded.pop(id(trace), None) if recorded else None
        if rec is not None and not rec.broken and max_saved_bytes is None:  # (it fused saves)
            self.events = rec.events
            self.invoke_threads, self.body, self.needs_grad = _threads(trace, rec.by_invoke, rec.gradients)
        else:
            self.invoke_threads, self.body, self.needs_grad = _compile(
                trace, self.tensors, self.events, fuse_saves=max_saved_bytes is None
            )
        invokes = trace.invokes
        if not self.invoke_threads and self.body is not None:
            self.threads = [self.body]  # no invoke blocks (`trace(prompt)`): the common case
        elif self.body is None and not (len(invokes) > 1 or (invokes and invokes[0].cache)):
            self.threads = self.invoke_threads  # one invoke
        else:
            caches = [t for t in self.invoke_threads if invokes[t.invoke].cache] if invokes else []
            self.threads = [*(t for t in self.invoke_threads if t not in caches), *([self.body] if self.body else []), *caches]
        # Whether anything can run before the model does (else `advance(None)` would find
        # every thread waiting for a module): a thread whose first step waits for no event.
        self.runs_first = not self.threads or any(t.steps[0].event is None for t in self.threads)


    # -- placement in the batch ----------------------------------------------------------------

    def place(self, start: int, spans: list[tuple[int, int]], batch: int, pos: int = 0) -> None:
        """This program's invokes own rows `start + span` of a batch of `batch` rows; code outside
        invokes owns them all. `pos`: leading positions the program must not see (padding that
        only exists because it shares the batch with longer prompts)."""
        total = spans[-1][1] if spans else 0

        def rows(s: int, e: int) -> Rows:
            return None if (s, e, pos) == (0, batch, 0) else (start + s, start + e, pos)

        for thread in self.invoke_threads:  # invokes without code have no thread
            thread.rows = rows(*spans[thread.invoke])
        if self.body is not None:
            self.body.rows = rows(0, total)

    # -- running -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.state is RUNNING

    def advance(self, event: Event | None, il: Interleaver, thread: Thread | None = None) -> None:
        """Run every thread as far as it can at `event` (None: before or after the model), or
        only `thread`. Errors, stops and cancels end this program, never the caller.

        One thread (a trace without invoke blocks, or with one): this call runs its steps itself
        (no call per thread: this runs at every event a program waits for)."""
        alone = thread is None
        if alone:
            if len(self.threads) != 1:
                self._advance_threads(event, il)
                return
            thread = self.threads[0]
        if self.cancel is not None and self.cancel.is_set():
            self._end(CANCELLED, Cancelled())
            return
        steps, values, max_bytes = thread.steps, self.values, self.max_bytes
        pos, n = thread.pos, len(steps)
        try:
            while pos < n:
                step = steps[pos]
                if step.after and any(t.pos < k for t, k in step.after):
                    return  # invoke code written before this line has not run yet
                if step.event is not None:
                    if step.event != event:
                        if step.event in il.fired:
                            raise _out_of_order(step)
                        return
                    if step.op == "module.output" and thread.rows is None:  # the commonest: inline
                        values[step.id] = il.current
                    else:
                        self._module_step(step, thread.rows, il)
                    if step.saves:  # a ReadSaveStep: its save, too
                        self.saved.append(step.id)
                    elif step.edits:  # a ReadEditStep: its edit, too (`_compute`, shortened)
                        edit = step.edit
                        if self.cancel is not None and self.cancel.is_set():
                            raise Cancelled()
                        self.last_write = edit
                        target = values[step.id]
                        try:
                            if edit.binary is not None and type(target) is torch.Tensor and target.dim():
                                # `x[:] op= v` (`_augassign_whole`, inline): the commonest edit
                                if (result := edit.binary(target, edit.value)) is not target:
                                    target[edit.index] = result
                                values[edit.id] = None
                            else:
                                values[edit.id] = edit.fn(target, edit.index, edit.op, edit.value)
                        except Exception as exc:
                            raise _failed(edit, exc) from exc
                else:
                    for r in step.refs:
                        if r not in values:
                            return  # a value another invoke has not computed yet
                    if step.run is _save:  # the next commonest: inline
                        self.saved.append(step.refs[0])
                        if self.max_saved_bytes is not None:
                            self._count_save(step)
                    elif step.fn is not None and not step.nested and self.plain:
                        # _compute for a plain operator, inline: most computed values are these
                        if self.cancel is not None and self.cancel.is_set():
                            raise Cancelled()
                        args = step.args
                        if step.slots:
                            args = args.copy()
                            for i, ref in step.slots:
                                args[i] = values[ref]
                        if step.writes:
                            self.last_write = step
                        try:
                            value = values[step.id] = step.fn(*args)
                        except Exception as exc:
                            raise _failed(step, exc) from exc
                        if max_bytes is not None and type(value) is torch.Tensor and not step.writes:
                            self._hold(step, value)
                    else:
                        self._compute(step)
                pos += 1
        except _Stop as stop:
            self.stopped = stop.scope
            self._end(STOPPED)
        except Cancelled as exc:
            self._end(CANCELLED, exc)
        except InterventionError as exc:
            self._end(FAILED, self._hinted(exc))
        finally:
            thread.pos = pos
            if alone and pos == n and self.state is RUNNING:
                self._end(DONE)  # nothing left to wait for: the model may stop early

    def _advance_threads(self, event: Event | None, il: Interleaver) -> None:
        """`advance` for several threads (invoke blocks, code outside them), which may unblock
        each other (a value another invoke computes)."""
        threads = self.threads
        moved = True
        while moved:
            moved = False
            for thread in threads:
                pos = thread.pos
                self.advance(event, il, thread)
                if self.state is not RUNNING:
                    return
                moved = moved or thread.pos != pos
        if all(t.pos == len(t.steps) for t in threads):
            self._end(DONE)

    def _hinted(self, error: InterventionError) -> InterventionError:
        """An IndexError from the tuple-output habit gets a hint saying what to write instead."""
        if not error.message.startswith("IndexError") or error.location is None:
            return error
        values = self.values
        hint = tuple_habit(self.trace, error.location, lambda read: isinstance(values.get(read.id), torch.Tensor))
        if hint is None:
            return error
        hinted = ExecutionError(f"{error.message}\n{hint}", error.location, code=error.code)
        hinted.__cause__ = error.__cause__  # the original exception: the shape check reads it
        return hinted

    def finish(self, il: Interleaver) -> None:
        """After the driver: a thread still waiting is an error (or the forward was cut short
        because every program had ended, which leaves nothing waiting)."""
        if not self.running:
            return
        self.advance(None, il)
        if not self.running:
            return
        for thread in self.threads:
            if thread.pos < len(thread.steps):
                step = thread.steps[thread.pos]
                if self._past_last_step(step, il):
                    continue
                self._end(FAILED, _dangling(step, il))
                return
        self._end(DONE)

    def _past_last_step(self, step: Step, il: Interleaver) -> bool:
        """A generation that ended (EOS) before the step this thread waits for: as in nnsight,
        the thread ends there quietly, keeping what earlier steps saved; the rest of it (code
        after the step loop included) does not run."""
        if self.trace.kind != "generate" or step.event is None or step.event[2] == 0:
            return False
        return step.event not in il.fired and step.event[1] != "result"

    def fail(self, error: InterventionError) -> None:
        if self.running:
            self._end(FAILED, error)

    def _end(self, state: str, error: InterventionError | None = None) -> None:
        self.state = state
        self.error = error

    def result(self) -> ProgramResult:
        """Saved and exported values (only if the program did not fail), then drop the rest."""
        out = ProgramResult(stopped=self.stopped, error=self.error)
        if self.error is None:
            values, saves = self.values, out.saves
            for i in self.saved:
                if i in values:
                    saves[i] = materialize(values[i])
            out.exports = {i: materialize(values[i]) for i in self.keep if i in values}
        self.values = {}
        return out

    # -- steps ---------------------------------------------------------------------------------

    def _bind(self, step: Step) -> tuple[list, dict]:
        values = self.values
        args = step.args.copy()
        for i, ref in step.slots:
            args[i] = values[ref]
        if step.nested:
            return _bind(args, values), _bind(step.kwargs, values)
        return args, step.kwargs

    def _compute(self, step: Step) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled()
        try:
            args, kwargs = self._bind(step)
            if not self.plain:
                args = same_device(args, self.device)
            if step.writes:
                self.last_write = step
            if step.fn is not None:
                value = self.values[step.id] = step.fn(*args)
            else:
                value = self.values[step.id] = step.run(self, step, args, kwargs)
        except (InterventionError, _Stop):
            raise
        except Exception as exc:
            raise _failed(step, exc) from exc
        if self.max_bytes is not None and not step.writes and self.last_write is not step:  # in place: nothing new
            self._hold(step, value)

    def _hold(self, step: Step, value: Any) -> None:
        """Count what `value` newly holds against the program's memory budget: every tensor a
        step allocated (views and tensors already counted hold nothing new), for as long as the
        program runs (it keeps all its values until it ends). The per-op cap (ops.check_output)
        stops most huge allocations before they happen; this bounds what many small ones add up to."""
        if type(value) is not torch.Tensor:
            if isinstance(value, (tuple, list)):  # topk, split, unbind...: one level deep
                for v in value:
                    if isinstance(v, torch.Tensor):
                        self._hold(step, v)
            return
        if value._base is not None:
            return
        # A tensor that is no view owns its memory from its data pointer on (no storage objects
        # made: they cost a Python object per step); one already counted (an in-place result,
        # `detach()`) adds nothing.
        ptr = value.data_ptr()
        if ptr in self.storages:
            return
        self.storages.add(ptr)
        self.held += value.nbytes
        if self.held > self.max_bytes:
            raise ExecutionError(
                f"this trace holds {self.held:,} bytes of tensors it computed, over its limit of "
                f"{self.max_bytes:,} bytes: compute smaller values (or save fewer of them)",
                step.loc, code="memory_limit",
            )

    def _count_save(self, step: Step) -> None:
        """Count a saved value against the request's cap: its result must fit, and it is known
        here, at the save's line, before the value is kept."""
        self.saved_bytes += nbytes(self.values.get(step.refs[0]))
        if self.saved_bytes > self.max_saved_bytes:
            raise ExecutionError(
                f"the values this request saves would hold {self.saved_bytes:,} bytes here, over the "
                f"limit of {self.max_saved_bytes:,} bytes left for it (limits.max_saved_bytes): save "
                "smaller values (e.g. one position or a slice) or fewer of them",
                step.loc, code="too_large",
            )

    def _module_step(self, step: Step, rows: Rows, il: Interleaver) -> None:
        try:
            if step.op in ops.MODULE_READS or step.op == "result":  # constant arguments: nothing to bind
                self.values[step.id] = self._read(step.op, rows, il)
            elif step.op == GRAD_READ:
                self.values[step.id] = self._grad_read(step, rows, il)
            elif step.op == "module.skip":
                args, _ = self._bind(step)
                il.skip(args[2], rows)
                self.last_write = step
            else:
                args, _ = self._bind(step)
                self._write(step.event[1], args[2], rows, il)
                self.last_write = step
        except InterventionError:
            raise
        except Exception as exc:
            raise _failed(step, exc) from exc

    def _read(self, op: str, rows: Rows, il: Interleaver) -> Any:
        if op == "module.output":
            return narrow(il.current, rows, il.shape)
        if op == "result":
            return narrow_result(il.current, rows, il.shape)
        args, kwargs = il.current
        if op == "module.inputs":
            return narrow((tuple(args), kwargs), rows, il.shape)
        return narrow(first_input(args, kwargs), rows, il.shape)

    def _grad_read(self, step: Step, rows: Rows, il: Interleaver) -> Any:
        """A module output whose `.grad` is read later: make the gradient reach it. Weights are
        frozen, so an output upstream of every other tracked value does not require grad: it is
        replaced by a copy of a fresh leaf (a copy, so later in-place edits stay legal)."""
        current = il.current
        if not isinstance(current, torch.Tensor) or not current.is_floating_point():
            raise ExecutionError(
                f"'{step.event[0]}' output is not a floating-point tensor, so it has no gradient", step.loc
            )
        if current.requires_grad:
            current.retain_grad()
            source = current
        else:
            source = current.detach().requires_grad_()
            il.current = current = source.clone()
        self.grad_sources[step.id] = (source, rows)
        return narrow(current, rows, il.shape)

    def _write(self, kind: str, value: Any, rows: Rows, il: Interleaver) -> None:
        if kind == "output":
            value = to_device_of(value, il.current)
            if rows is None:
                il.current = value
            else:
                write_rows(il.current, value, rows, il.shape)
            return
        args, kwargs = il.current
        target = first_input(args, kwargs)
        value = to_device_of(value, target)
        if rows is not None:
            write_rows(target, value, rows, il.shape)
        elif args:
            args[0] = value
            il.inputs_replaced = True
        else:
            kwargs[next(iter(kwargs))] = value
            il.inputs_replaced = True


# -- compiling -------------------------------------------------------------------------------------

GRAD_READ = "module.output+grad"  # internal: a module.output read whose gradient is asked for


def _compile(
    trace: TraceIR, tensors: dict[str, torch.Tensor], events: dict[str, frozenset[str]], fuse_saves: bool = False,
) -> tuple[list[Thread], Thread | None, bool]:
    """Threads (one per invoke with code), the body (code outside invokes), and whether a
    backward is among the steps (the driver then runs with grad mode on). `fuse_saves`: saves
    cannot fail (no cap on saved bytes), so a read and its save right after become one step.
    (`Recording` makes the same steps while a trace is recorded, node by node.)"""
    by_invoke: dict[int | None, list[Step]] = {}
    gradients: list[Step] = []  # its backward and grad steps, if any
    nested, ref = _nested_refs()
    reads, event_kind = ops.MODULE_READS, EVENT_KIND  # locals: this loop runs for every node
    for node in trace.nodes:
        op = node.op
        if op == "result":  # no module to wrap: the engine fires it after the driver's call
            step = ReadStep(node.id, op, node.loc, RESULT_EVENT, [])
        elif op in reads:  # the most common nodes: constant arguments, nothing to decode
            a = node.args
            kind = event_kind[op]
            step = ReadStep(node.id, op, node.loc, (a[0], kind, a[1]), a)
            kinds = events.get(a[0])  # `add_event`, inline
            if kinds is None:
                events[a[0]] = KINDS[kind]
            elif kind not in kinds:
                events[a[0]] = BOTH_KINDS
        elif op == "save" and (r := ref_id(node.args[0])) is not None:  # the next commonest
            if fuse_saves and r == node.id - 1:
                # `x.save()` right after the read of x, in the same thread (no node between, so
                # the `after` counts of body steps see the pair as the one step it is now): the
                # read step saves it (ReadSaveStep).
                steps = by_invoke.get(node.invoke)
                if steps and type(last := steps[-1]) is ReadStep and last.id == r:
                    last.__class__ = ReadSaveStep
                    continue
            step = SaveStep(node.id, node.loc, (r,))
        else:
            step = _compile_node(node, tensors, events, nested, ref)
            if op in _GRADIENT_OPS:  # rare: noted here so other traces pay no extra pass
                gradients.append(step)
        steps = by_invoke.get(node.invoke)
        if steps is None:
            steps = by_invoke[node.invoke] = []
        steps.append(step)
    return _threads(trace, by_invoke, gradients)


def _nested_refs() -> tuple[list[int], Callable[[int], _Ref]]:
    """For `_compile_node`: a list, and the decoder's callback for references inside containers
    or keyword arguments, which notes them there. Made once per trace, not per node."""
    nested: list[int] = []

    def ref(i: int) -> _Ref:
        nested.append(i)
        return _Ref(i)

    return nested, ref


def _compile_node(
    node: Node, tensors: dict[str, torch.Tensor], events: dict[str, frozenset[str]], nested: list[int],
    ref: Callable[[int], _Ref],
) -> Step:
    """The step of any node but a read or a plain save: its arguments decoded into a template.
    `nested`, `ref`: see `_nested_refs`."""
    if nested:
        nested.clear()
    op = node.op
    try:
        slots: list = []
        args = decode_list(node.args, ref, tensors, slots)
        kwargs = decode({"$dict": node.kwargs}, ref, tensors) if node.kwargs else {}
    except ArgError as exc:
        raise ExecutionError(str(exc), node.loc) from None
    event = None
    kind = EVENT_KIND.get(op)
    if kind is not None:
        event = (args[0], kind, args[1])
        add_event(events, args[0], kind)
    refs = []
    for slot in slots:
        refs.append(slot[1])
    refs.extend(nested)
    step = Step(node.id, op, node.loc, event, refs, args, kwargs, slots, bool(nested))
    if op == "augassign" and len(args) == 4 and len(slots) == 1 and slots[0][0] == 0 and _is_view_index(args[1]):
        # a constant basic index: known now to give a view
        step.fn = _augassign_whole if args[1] == _WHOLE else _augassign_view
    return step


def _threads(
    trace: TraceIR, by_invoke: dict[int | None, list[Step]], gradients: list[Step]
) -> tuple[list[Thread], Thread | None, bool]:
    """The threads of compiled steps (see `_compile`)."""
    backward = False
    if gradients:
        _track_grads(gradients, by_invoke)
        backward = any(s.op == "backward" for s in gradients)
    if len(by_invoke) == 1 and None in by_invoke:  # `trace(prompt)`'s code: the common case
        return [], Thread(by_invoke[None]), backward
    threads = [Thread(by_invoke[i], i) for i in sorted(k for k in by_invoke if k is not None)]
    body = None
    if None in by_invoke:
        body = Thread(by_invoke[None])
        # caches only read: code after them need not wait (they run last, at every event)
        waits = [t for t in threads if t.invoke >= len(trace.invokes) or not trace.invokes[t.invoke].cache]
        for step in body.steps if waits else ():  # no invoke threads: nothing to wait for
            step.after = [(t, n) for t in waits if (n := sum(1 for x in t.steps if x.id < step.id))]
    return threads, body, backward


class Recording:
    """One trace compiled while it is recorded, in this process (local runs: client_sdk's
    Graph): the steps `_compile` would make from its IR afterwards, made with each node instead.
    The recorder knows the arguments of its commonest nodes as Python values already (a read's
    path and call, a save's reference, an augassign's operands), so those are neither encoded
    for the engine nor decoded again, and no second pass over the nodes is made. Saves are
    fused into their reads (`ReadSaveStep`), so only a program whose saves cannot fail (no
    saved-bytes cap) uses it. Any other node is compiled by `_compile_node` as it is recorded;
    one that fails to compile leaves the recording `broken` (the program then compiles the
    IR, raising the error at the node's line as ever).

    Given the rank of each module event in the model's order (`order.ranks_by_kind`), it checks
    the order of module accesses as `order.check_order` would (`disorder`: its error, if any),
    so validation need not walk the nodes again."""

    __slots__ = ("broken", "by_invoke", "disorder", "events", "gradients", "last", "rank", "refs", "tensors")

    def __init__(self, tensors: dict[str, torch.Tensor], rank: dict[str, dict[str, int]] | None = None):
        """`tensors`: the recorder's client tensors (the program's), by blob name; `rank`: see
        above (None: the order is not checked here)."""
        self.by_invoke: dict[int | None, list] = {}
        self.events: dict[str, frozenset[str]] = {}
        self.gradients: list[Step] = []
        self.tensors = tensors
        self.broken = False
        self.refs: tuple | None = None  # see _nested_refs, made when first needed
        self.rank = rank
        self.last: dict[int | None, int] = {}  # invoke -> rank of its latest first-call access
        self.disorder: InterventionError | None = None

    @property
    def order_checked(self) -> bool:
        """Whether `disorder` is `check_order`'s verdict on the trace (a broken recording stops
        checking)."""
        return self.rank is not None and not self.broken

    def _order(self, path: str, kind: str, loc: Any, invoke: int | None) -> None:
        """`check_order`'s step for an access of a module's first call."""
        r = self.rank[kind].get(path)
        if r is not None:
            if r < self.last.get(invoke, -1) and self.disorder is None:
                self.disorder = out_of_order(path, kind, loc)
            self.last[invoke] = r

    def read(self, id: int, op: str, loc: Any, args: list, invoke: int | None) -> None:
        """A module read (`module.output`, `.input`, `.inputs`): args [path, call index]."""
        kind = EVENT_KIND[op]
        path = args[0]
        kinds = self.events.get(path)  # `add_event`, inline
        if kinds is None:
            self.events[path] = KINDS[kind]
        elif kind not in kinds:
            self.events[path] = BOTH_KINDS
        steps = self.by_invoke.get(invoke)
        if steps is None:
            steps = self.by_invoke[invoke] = []
        step = _new(ReadStep)  # `ReadStep(id, op, loc, (path, kind, args[1]), args)`: see _new
        step.id = id
        step.op = op
        step.loc = loc
        step.event = (path, kind, args[1])
        step.args = args
        step.after = _NONE
        steps.append(step)
        rank = self.rank
        if rank is not None and args[1] == 0 and (r := rank[kind].get(path)) is not None:  # `_order`, inline
            if r < self.last.get(invoke, -1) and self.disorder is None:
                self.disorder = out_of_order(path, kind, loc)
            self.last[invoke] = r

    def save(self, id: int, ref: int, loc: Any, invoke: int | None) -> None:
        """`x.save()` of node `ref`: fused into the read of x when that is the step before."""
        steps = self.by_invoke.get(invoke)
        if steps is None:
            steps = self.by_invoke[invoke] = []
        elif ref == id - 1 and type(last := steps[-1]) is ReadStep and last.id == ref:
            last.__class__ = ReadSaveStep
            return
        steps.append(SaveStep(id, loc, (ref,)))

    def augassign(
        self, id: int, loc: Any, target: int, index: Any, op: str, other: Any, other_id: int | None, view: bool,
        invoke: int | None,
    ) -> None:
        """`target[index] op= other`: node `target`'s value, `other` a scalar or (`other_id`) a
        node's value; `view`: the index surely gives a view of a tensor."""
        fn = (_augassign_whole if index == _WHOLE else _augassign_view) if view else _augassign
        steps = self.by_invoke.get(invoke)
        if steps is None:
            steps = self.by_invoke[invoke] = []
        elif other_id is None and target == id - 1 and type(last := steps[-1]) is ReadStep and last.id == target:
            # the edit of the value just read, by a scalar: one step
            last.edit = edit = _new(Edit)  # `Edit(id, loc, fn, index, op, other)`: see _new
            edit.id = id
            edit.loc = loc
            edit.fn = fn
            edit.index = index
            edit.op = op
            edit.value = other
            edit.binary = ops.BINARY.get(op) if fn is _augassign_whole else None
            last.__class__ = ReadEditStep
            return
        if other_id is None:
            step = Step(id, "augassign", loc, None, [target], [None, index, op, other], _NO_KWARGS, [(0, target)], False)
        else:
            step = Step(id, "augassign", loc, None, [target, other_id], [None, index, op, None], _NO_KWARGS,
                        [(0, target), (3, other_id)], False)
        step.fn = fn
        steps.append(step)

    def add(self, node: Node) -> None:
        """Any other node, compiled as `_compile` would."""
        if self.broken:
            return
        op = node.op
        if op == "result":
            step = ReadStep(node.id, op, node.loc, RESULT_EVENT, [])
        elif op == "save" and (r := ref_id(node.args[0])) is not None:
            self.save(node.id, r, node.loc, node.invoke)
            return
        elif op in ops.MODULE_READS:
            self.read(node.id, op, node.loc, node.args, node.invoke)
            return
        else:
            if self.refs is None:
                self.refs = _nested_refs()
            try:
                step = _compile_node(node, self.tensors, self.events, *self.refs)
            except Exception:  # noqa: BLE001 - the program compiles the IR and says why
                self.broken = True
                return
            if op in _GRADIENT_OPS:
                self.gradients.append(step)
            elif step.event is not None and self.rank is not None and step.event[2] == 0:  # a write
                self._order(step.event[0], step.event[1], node.loc, node.invoke)
        steps = self.by_invoke.get(node.invoke)
        if steps is None:
            steps = self.by_invoke[node.invoke] = []
        steps.append(step)


_GRADIENT_OPS = frozenset({"grad", "backward"})


def _track_grads(gradients: list[Step], by_invoke: dict[int | None, list[Step]]) -> None:
    """Steps whose value some `grad` node asks for keep their gradient: module output reads
    become GRAD_READ steps, computed values retain theirs."""
    wanted = {s.refs[0] for s in gradients if s.op == "grad" and s.refs}
    if not wanted:
        return
    for steps in by_invoke.values():
        for step in steps:
            if step.id not in wanted:
                continue
            if step.op == "module.output":
                step.op = GRAD_READ
            elif step.event is None:
                step.run, step.fn = _retaining(step.fn, step.run), None


def _retaining(fn: Callable | None, run: Callable) -> Callable:
    def retaining(p: Program, s: Step, a: list, k: dict) -> Any:
        value = fn(*a) if fn is not None else run(p, s, a, k)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            value.retain_grad()
            p.grad_sources[s.id] = (value, None)
        return value

    return retaining


def _backward(p: Program, s: Step, a: list, k: dict) -> None:
    loss = a[0]
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        raise ExecutionError(
            "nothing to backpropagate: the loss depends on no value whose .grad this trace reads", s.loc
        )
    if loss.numel() != 1:
        raise ExecutionError(f"backward() needs a single-number loss (e.g. .sum()), got shape {tuple(loss.shape)}", s.loc)
    loss.backward()  # weights are frozen (requires_grad False): only activations get gradients


def _grad(p: Program, s: Step, a: list, k: dict) -> Any:
    source = p.grad_sources.get(s.refs[0]) if s.refs else None
    grad = source[0].grad if source is not None else None
    if grad is None:
        raise ExecutionError(
            "this value has no gradient: read .grad of a module output (or a value computed from one) "
            "that the loss depends on, inside `with loss.backward():`",
            s.loc,
            code="no_gradient",
        )
    il = p.interleaver
    return narrow(grad, source[1], il.shape) if il is not None else grad


def _save(p: Program, s: Step, a: list, k: dict) -> None:
    p.saved.append(s.refs[0])
    if p.max_saved_bytes is not None:
        p._count_save(s)


def _augassign(target: Any, index: Any, op: str, value: Any) -> None:
    """`target[index] op= value`, as Python runs it: getitem, the in-place op, setitem. The
    setitem is skipped only where it provably copies a view onto itself."""
    item = target[index]
    result = ops.BINARY[op](item, value)
    if result is not item or type(target) is not torch.Tensor or not _is_view_index(index):
        target[index] = result


def _augassign_view(target: Any, index: Any, op: str, value: Any) -> None:
    """`_augassign` for an index known at compile time to be basic (a view of a tensor)."""
    item = target[index]
    result = ops.BINARY[op](item, value)
    if result is not item or type(target) is not torch.Tensor:
        target[index] = result


_WHOLE = slice(None, None, None)


def _augassign_whole(target: Any, index: Any, op: str, value: Any) -> None:
    """`x[:] op= v` on a tensor: `x[:]` is x itself (same memory, shape and strides), so the op
    runs on x without making the view — the commonest edit (`output[:] += v`)."""
    if type(target) is not torch.Tensor or not target.dim():  # (x[:] of a 0-d tensor raises)
        _augassign_view(target, index, op, value)
        return
    result = ops.BINARY[op](target, value)
    if result is not target:
        target[index] = result


def _is_view_index(index: Any) -> bool:
    """Whether indexing a tensor with `index` gives a view (basic indexing: no tensors, lists)."""
    if type(index) is tuple:
        for i in index:
            if type(i) not in _VIEW_INDEX:
                return False
        return True
    return type(index) in _VIEW_INDEX


_VIEW_INDEX = (int, slice, type(None), type(Ellipsis))


def _method(p: Program, s: Step, a: list, k: dict) -> Any:
    name, obj = a[0], a[1]
    if not isinstance(obj, torch.Tensor):
        raise TypeError(f".{name}() needs a tensor, got {type(obj).__name__}")
    if name.endswith("_"):
        p.last_write = s
    ops.check_output(name, None, a[2:], k, obj)
    return getattr(obj, name)(*a[2:], **k)


def _function(p: Program, s: Step, a: list, k: dict) -> Any:
    fn = ops.FUNCTIONS[a[0]]
    ops.check_output(a[0], fn, a[1:], k)
    return fn(*a[1:], **k)


def _getattr(p: Program, s: Step, a: list, k: dict) -> Any:
    obj, name = a[0], a[1]
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


def log_message(values: list) -> str:
    """The line `client_sdk.log(*values)` prints (in a trace or in a session body)."""
    return " ".join(str(v) for v in values)


def _log(p: Program, s: Step, a: list, k: dict) -> None:
    p.on_log(log_message(a))


def _stop(p: Program, s: Step, a: list, k: dict) -> None:
    raise _Stop(a[0])


def _module_call(p: Program, s: Step, a: list, k: dict) -> Any:
    return p.interleaver.call_module(a[0], a[1:], k, s.loc)


def _unknown(p: Program, s: Step, a: list, k: dict) -> None:
    raise ExecutionError(f"unknown op {s.op!r}", s.loc)


def _checked(fn: Callable) -> Callable:
    """A binary operator that first refuses outputs over the allocation cap (broadcasting two
    large tensors, matmul): one type check per call unless both operands are large."""

    def run(a: Any, b: Any) -> Any:
        if type(a) is torch.Tensor and type(b) is torch.Tensor:
            ops.check_binary(fn, a, b)
        return fn(a, b)

    return run


# op -> its plain operator, called as fn(*args); op -> its runner, for everything else.
_PLAIN: dict[str, Callable] = {
    **{op: _checked(fn) for op, fn in ops.BINARY.items()}, **ops.UNARY, "getitem": operator.getitem, "setitem": operator.setitem,
    "augassign": _augassign,
}
_RUNNERS: dict[str, Callable] = {
    "save": _save,
    "method": _method,
    "function": _function,
    "getattr": _getattr,
    "log": _log,
    "stop": _stop,
    "module.call": _module_call,
    "backward": _backward,
    "grad": _grad,
}
_WRITES = ops.IN_PLACE | {"setitem", "augassign"}
# op -> (fn, run, writes) for Step: one lookup per node
_HOW: dict[str, tuple] = {op: (_PLAIN.get(op), _RUNNERS.get(op, _unknown), op in _WRITES) for op in ops.ARITY}
_UNKNOWN = (None, _unknown, False)
# Set here, where the runners exist (staticmethod: read from an instance, the function itself).
ReadStep.run = staticmethod(_unknown)  # reads are run by the program itself (`_module_step`)
SaveStep.run = staticmethod(_save)


# -- helpers -----------------------------------------------------------------------------------


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


def _failed(step: Step, exc: Exception) -> ExecutionError:
    return ExecutionError(f"{type(exc).__name__}: {exc}", step.loc)


def _out_of_order(step: Step) -> ExecutionError:
    path, kind, _ = step.event
    return ExecutionError(
        f"'{path}' {kind} was accessed after the model had already run past it: access modules "
        "in the order the model executes them",
        step.loc,
        code="out_of_order",
    )


def _dangling(step: Step, il: Interleaver) -> ExecutionError:
    if step.event and step.event in il.fired:
        return _out_of_order(step)
    if step.event:
        path, kind, call = step.event
        which = f" a {call + 1}th time" if call else ""
        return ExecutionError(
            f"module '{path}' was not called{which} during this forward pass, so its "
            f"{kind} does not exist",
            step.loc,
            code="module_not_called",
        )
    return ExecutionError("this value depends on a value that was never computed", step.loc)
