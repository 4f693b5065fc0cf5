"""The interleaver: hands each module call to the programs waiting for it.

For one driver run it wraps the `forward` of every module some program touches, counts each
module's calls, and turns them into events — (path, "input" | "output", call index) — that it
dispatches to every running program, in order. A program reads and edits the value at the event
through `current`. It also wraps every repeated block (the decoder layers) with a checkpoint: a
cancel is noticed at least once a layer however few modules the programs touch, and once every
program has ended the rest of the model's work is skipped.

Wrapping `forward` (an instance attribute, removed on exit) rather than registering hooks keeps
PyTorch's fast call path and costs nothing to undo; it also lets the wrapper decide whether the
module runs at all. Edits made at an output event are what any forward hook registered by someone
else (e.g. transformers' hidden-state capture) sees, as with a prepended hook.

When every program has ended (done, stopped, failed, cancelled), the rest of the model's work is
useless: at the next checkpoint the interleaver raises `Ended` out of the forward, which the
driver catches. (Not at the event itself: the module whose call ended the last program finishes
its call, hooks of others on it included.)
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, Self

import torch

from intervention.errors import ExecutionError, ValidationError
from intervention.program import BOTH_KINDS, RESULT_EVENT, RUNNING, Event, Program
from intervention.values import Shape, first_device, to_device_of, write_rows

_MISSING = object()
_NO_CACHE: dict = {}  # looked up, never written: a run with wrappers of its own


class Ended(Exception):
    """Every program of the run has ended: abandon the model's work."""


class Interleaver:
    def __init__(self, model: torch.nn.Module, programs: list[Program], shape: Shape):
        self.model = model
        self.programs = programs
        self.shape = shape
        self.calls: dict[str, int] = {}
        self.fired: set[Event] = set()
        self.current: Any = None  # the value at the firing event: output, or [args, kwargs]
        self.inputs_replaced = False
        self.paused = False  # a module the user calls explicitly is not a model event
        self.skips: list | None = None  # (value, rows) given by module.skip for the call firing now
        self._restore: list[tuple] = []  # (module, its saved forward, ...): see _wrap
        self._port: _Port | None = None

    # -- lifetime ------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        device = first_device(self.model)
        wanted: dict[str, frozenset[str]] = {}
        shared = False  # `wanted` is a program's own `events` (only read, never written)
        for program in self.programs:
            program.interleaver, program.device, program.plain = self, device, device.type == "cpu"
            events = program.events
            if not wanted:
                wanted, shared = events, True  # one program (the common case): its own
                continue
            if shared:
                wanted, shared = dict(wanted), False
            for path, kinds in events.items():  # (two kinds only: see program.KINDS)
                old = wanted.get(path)
                wanted[path] = kinds if old is None or old is kinds else BOTH_KINDS
        with _PORTS_LOCK:  # two threads running the same model must not both claim its port
            port = _PORTS.get(self.model)
            if port is None:
                port = _PORTS[self.model] = _Port()
            if port.il is None:  # this model's cached wrappers are free: this run uses them
                port.il, self._port, cache = self, port, port.wrappers
            else:  # another run on this model right now (threads): wrappers of its own, uncached
                port, cache = _Port(), None
                port.il = self
        try:
            self.calls = dict.fromkeys(wanted, 0)
            restore = self._restore
            found = cache if cache is not None else _NO_CACHE
            for path, kinds in wanted.items():
                key = (path, kinds)
                entry = found.get(key)
                if entry is not None:  # `_rewrap`, inline: this runs for every module read
                    d, saved, forward, registry, name, module = entry
                    if d.get("forward", _MISSING) is saved and registry.get(name) is module:
                        restore.append(entry)  # (its __dict__, saved, ...): what __exit__ puts back
                        d["forward"] = forward
                        continue
                module = self._module_for(path)
                if module is not None:
                    wrapped = self._event_forward(path, module.forward, kinds, port)
                    self._wrap(module, wrapped, module.forward, cache, key, path)
            for module in repeated_blocks(self.model):
                key = id(module)
                if cache is not None and self._rewrap(cache.get(key)):
                    continue
                self._wrap(module, self._checkpoint_forward(module.forward, port), module.forward, cache, key)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for d, saved, _, _, _, _ in reversed(self._restore):  # (cache entries: see _wrap)
            if saved is _MISSING:
                d.pop("forward", None)
            else:
                d["forward"] = saved
        self._restore.clear()
        if self._port is not None:
            self._port.il = None
            self._port = None
        self.current = None
        for program in self.programs:
            program.interleaver = None

    def _wrap(
        self, module: torch.nn.Module, forward: Callable, original: Callable, cache: dict | None, key: Any,
        path: str | None = None,
    ) -> None:
        # `generate` inspects the signature of `forward` to choose the arguments it passes
        forward.__wrapped__ = original
        d = module.__dict__
        saved = d.get("forward", _MISSING)
        # Where the module is registered (its parent's `_modules`), so a later run sees if it was
        # replaced there. The dicts themselves are kept: a module's attributes cost a __getattr__
        # hook each (nn.Module defines one), and a run looks them up for every module it wraps.
        parent, name = self.model, ""
        if path:
            parent_path, _, name = path.rpartition(".")
            parent = submodule(self.model, parent_path)
        entry = (d, saved, forward, parent._modules, name, module)
        self._restore.append(entry)  # what __exit__ puts back: `saved` as the `forward` in `d`
        d["forward"] = forward
        if cache is not None:
            if len(cache) > 4096:  # bounded, whatever the traces touch
                cache.clear()
            cache[key] = entry

    def _rewrap(self, entry: tuple | None) -> bool:
        """Install a wrapper made by an earlier run, if it still wraps what the module has now
        (the same instance `forward`, or none) and the module is still registered where it was.
        Making the wrappers and finding the modules cost more than a small trace's reads."""
        if entry is None:
            return False
        d, saved, forward, registry, name, module = entry
        if d.get("forward", _MISSING) is not saved or (name and registry.get(name) is not module):
            return False
        self._restore.append(entry)
        d["forward"] = forward
        return True

    def _module_for(self, path: str) -> torch.nn.Module | None:
        module = submodule(self.model, path)
        if module is None:  # refused before the model runs (servers validate paths up front)
            for program in self.programs:
                if path in program.events:
                    step = next(s for t in program.threads for s in t.steps if s.event and s.event[0] == path)
                    message = f"the model has no module '{path}'"
                    program.fail(ValidationError(message, step.loc, code="unknown_module"))
        return module

    # -- events --------------------------------------------------------------------------------

    def _event_forward(self, path: str, forward: Callable, kinds: set[str], port: _Port) -> Callable:
        """The wrapper of one module's forward. It dispatches to the interleaver of the run in
        progress (`port.il`), so later runs on the same model reuse it."""
        inputs, outputs = "input" in kinds, "output" in kinds

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            il = port.il
            if il is None or il.paused:
                return forward(*args, **kwargs)
            calls = il.calls
            call = calls[path]
            calls[path] = call + 1
            if inputs:
                args, kwargs = il._fire_input((path, "input", call), args, kwargs)
                if il.skips is not None:  # module.skip at this input event
                    output = il._skipped(forward, args, kwargs)
                else:
                    output = forward(*args, **kwargs)
            else:
                output = forward(*args, **kwargs)
            if outputs:  # `il.fire`, inline: this runs at every output a program waits for
                il.current = output
                event = (path, "output", call)
                il.fired.add(event)
                for program in il.programs:
                    if program.state is RUNNING:
                        program.advance(event, il)
                output, il.current = il.current, None
            return output

        return wrapped

    def _fire_input(self, event: Event, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.current = [list(args), dict(kwargs)]
        self.inputs_replaced = False
        self.fire(event)
        (new_args, new_kwargs), self.current = self.current, None
        return (tuple(new_args), new_kwargs) if self.inputs_replaced else (args, kwargs)

    def skip(self, value: Any, rows: Any) -> None:
        """`module.skip(value)` for the call whose input event is firing."""
        if self.skips is None:
            self.skips = []
        self.skips.append((value, rows))

    def _skipped(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        """The output of a skipped call: the value given for the whole batch (the module does not
        run), or, when invokes skipped only their rows, the module's output with those rows
        replaced."""
        skips, self.skips = self.skips, None
        whole = [value for value, rows in skips if rows is None]
        output = whole[-1] if whole else forward(*args, **kwargs)
        for value, rows in skips:
            if rows is not None:
                write_rows(output, to_device_of(value, output) if isinstance(output, torch.Tensor) else value,
                           rows, self.shape)
        return output

    def fire(self, event: Event) -> None:
        """Dispatch `event` to every running program, in order."""
        self.fired.add(event)
        for program in self.programs:
            if program.state is RUNNING:
                program.advance(event, self)

    def end_program(self, program: Program, output: Any) -> None:
        """End one program before the driver's run ends (its generation is over, the others' is
        not): it gets `output` as its result event, then ends as it would after the driver."""
        self.current = output
        try:
            program.advance(RESULT_EVENT, self)
        finally:
            self.current = None
        program.finish(self)

    @staticmethod
    def _checkpoint_forward(forward: Callable, port: _Port) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            il = port.il
            if il is not None and not il.paused:
                il.checkpoint()
            return forward(*args, **kwargs)

        return wrapped

    def checkpoint(self) -> None:
        """End the cancelled programs; raise Ended once none runs."""
        alive = False
        for program in self.programs:
            if program.state is RUNNING:
                if program.cancel is not None and program.cancel.is_set():
                    program.advance(None, self)  # notices the flag and ends as cancelled
                alive = alive or program.state is RUNNING
        if not alive:
            raise Ended

    # -- explicit module calls -----------------------------------------------------------------

    def call_module(self, path: str, args: list, kwargs: dict, loc: Any) -> Any:
        """`model.lm_head(h)` inside a trace: run a module on traced values, outside the model's
        own forward (so it is no event, and no call of it is counted)."""
        module = submodule(self.model, path)
        if module is None:
            raise ExecutionError(f"the model has no module '{path}'", loc, code="unknown_module")
        device = first_device(module)
        self.paused = True
        try:
            return module(*[to_device_of(a, device) for a in args], **kwargs)
        finally:
            self.paused = False


def submodule(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    # Walks `_modules` (where every submodule is registered) rather than `get_submodule`, whose
    # getattr per path part is ~15x slower; this runs for every touched module of every run.
    module = model
    for name in path.split(".") if path else ():
        module = module._modules.get(name)
        if module is None:
            return None
    return module


class _Port:
    """Per model: the run its cached wrappers dispatch to (None between runs), and the wrappers
    themselves — (path, its event kinds) or a block's id -> (the module's __dict__, the instance
    `forward` it had, the wrapper, its parent's `_modules`, its name there, the module). One run
    at a time uses them; a concurrent one makes its own."""

    __slots__ = ("il", "wrappers")

    def __init__(self) -> None:
        self.il: Interleaver | None = None
        self.wrappers: dict[Any, tuple] = {}


_PORTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PORTS_LOCK = threading.Lock()


_BLOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The members of the model's ModuleLists (its decoder layers): where a cancel is checked.
    Found once per model: walking every module costs more than a small trace."""
    blocks = _BLOCKS.get(model)
    if blocks is None:
        blocks = _BLOCKS[model] = [
            child for m in model.modules() if isinstance(m, torch.nn.ModuleList) for child in m
        ]
    return blocks
