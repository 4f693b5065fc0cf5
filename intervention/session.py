"""The session loop: traces strictly in order, values flowing between them, a stop or an error
ending the session. One loop, driven by every executor:

- `SessionLoop` walks a plan's segments (runs of traces on one model) and runs the session steps
  between them (a log or a stop in the session body). Local execution drives it in-process; the
  cluster's session runner drives it with one replica call per segment.
- `SegmentLoop` walks the traces of one segment. Local execution and the model deployment drive
  it, running each trace as an engine program (the deployment, with traces of other requests).

Both are plain state machines — `next_…()` hands out the next unit of work with the values it
needs, `record_…()` takes its outcome — so synchronous and asyncio drivers share them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from intervention.args import decode, no_refs
from intervention.engine import run_forward
from intervention.errors import InterventionError
from intervention.plan import Segment, SessionPlan
from intervention.program import Program, ProgramResult, Recording, log_message


@dataclass
class Outcome:
    """What a segment or a whole session produced. `error_trace` is the 0-based index of the
    trace that failed; `exports`: values later segments need (segment outcomes only)."""

    saves: dict[int, Any] = field(default_factory=dict)
    exports: dict[int, Any] = field(default_factory=dict)
    stopped: str | None = None
    traces_run: int = 0
    error: InterventionError | None = None
    error_trace: int | None = None

    @property
    def ended(self) -> bool:
        """Nothing after this may run: a session stop or an error."""
        return self.stopped == "session" or self.error is not None


@dataclass
class TraceWork:
    index: int  # in the session
    trace: Any
    values: dict[int, Any]  # values of earlier traces this one may use
    keep: set[int]  # its values later traces use

    def program(
        self,
        tensors: dict[str, torch.Tensor],
        *,
        on_log: Callable[[str], None] = print,
        cancel: Any = None,
        max_trace_bytes: int | None = None,
        max_saved_bytes: int | None = None,
        recorded: dict[int, Recording] | None = None,
    ) -> Program:
        """This trace compiled as an engine program (raises its InterventionError). Alone here
        (run_segment) or beside other requests' programs (the model deployment's batches)."""
        return Program(self.trace, tensors=tensors, externals=self.values, keep=self.keep, on_log=on_log,
                       cancel=cancel, max_bytes=max_trace_bytes, max_saved_bytes=max_saved_bytes,
                       recorded=recorded)


class SegmentLoop:
    def __init__(self, segment: Segment, imports: dict[int, Any]):
        self.segment = segment
        self.values = dict(imports)
        self.outcome = Outcome()
        self._next = 0

    def next_trace(self) -> TraceWork | None:
        seg, k = self.segment, self._next
        if self.outcome.ended or k >= len(seg.traces):
            return None
        return TraceWork(seg.first + k, seg.traces[k], self.values, seg.keeps[k])

    def record_trace(self, result: ProgramResult) -> None:
        out = self.outcome
        index = self.segment.first + self._next
        self._next += 1
        out.traces_run += 1
        if result.error is not None:
            out.error, out.error_trace = result.error, index
            return
        out.saves.update(result.saves)
        self.values.update(result.exports)
        if result.stopped == "session":
            out.stopped = "session"
        if self.outcome.ended or self._next == len(self.segment.traces):
            out.exports = {i: v for i, v in self.values.items() if i in self.segment.exports}


class SessionLoop:
    """`on_log` receives the session steps' log lines, each when the traces before it have run
    (a driver that streams logs sends them before it starts the next segment)."""

    def __init__(
        self,
        plan: SessionPlan,
        on_log: Callable[[str], None] = print,
        tensors: dict[str, torch.Tensor] | None = None,
    ):
        self.plan = plan
        self.values: dict[int, Any] = {}  # exports of finished segments (values, or handles)
        self.outcome = Outcome()
        self.on_log = on_log
        self.tensors = tensors or {}
        self._next = 0
        self._step = 0  # session steps run so far

    def next_segment(self) -> tuple[Segment, dict[int, Any]] | None:
        segments = self.plan.segments
        if self.outcome.ended:
            return None
        self._run_steps(segments[self._next].first if self._next < len(segments) else self.plan.n_traces)
        if self.outcome.ended or self._next >= len(segments):
            return None
        seg = segments[self._next]
        return seg, {i: self.values[i] for i in seg.imports if i in self.values}

    def _run_steps(self, before: int) -> None:
        """Run the session steps that come before trace `before` (the validator checked them)."""
        steps = self.plan.steps
        while self._step < len(steps) and steps[self._step].at <= before:
            step = steps[self._step]
            self._step += 1
            if step.op == "stop":
                self.outcome.stopped = "session"
                return
            self.on_log(log_message(decode(step.args, no_refs, self.tensors)))

    def record_segment(self, part: Outcome) -> None:
        self._next += 1
        out = self.outcome
        out.traces_run += part.traces_run
        out.saves.update(part.saves)
        self.values.update(part.exports)
        out.stopped = part.stopped or out.stopped
        out.error, out.error_trace = part.error, part.error_trace


def run_segment(
    model: torch.nn.Module,
    tokenizer: Any,
    segment: Segment,
    imports: dict[int, Any],
    tensors: dict[str, torch.Tensor],
    *,
    on_log: Callable[[str], None] = print,
    on_trace: Callable[[int], None] | None = None,
    cancel: Any = None,
    max_trace_bytes: int | None = None,
    max_saved_bytes: int | None = None,
    recorded: dict[int, Recording] | None = None,
) -> Outcome:
    """Run a segment's traces in this process, one forward each; each trace's computed tensors
    may hold at most `max_trace_bytes`, and all the values its traces save `max_saved_bytes`
    (see Program; None: unbounded, as in local runs). `recorded`: see Program."""
    loop = SegmentLoop(segment, imports)
    saved = 0
    while (work := loop.next_trace()) is not None:
        if on_trace is not None:
            on_trace(work.index)
        try:
            program = work.program(tensors, on_log=on_log, cancel=cancel, max_trace_bytes=max_trace_bytes,
                                   max_saved_bytes=None if max_saved_bytes is None else max_saved_bytes - saved,
                                   recorded=recorded)
        except InterventionError as err:
            loop.record_trace(ProgramResult(error=err))
            continue
        run_forward(model, tokenizer, [program])
        saved += program.saved_bytes
        loop.record_trace(program.result())
    return loop.outcome


def run_session(
    plan: SessionPlan,
    tensors: dict[str, torch.Tensor],
    load: Callable[[str], tuple[torch.nn.Module, Any]],
    on_log: Callable[[str], None] = print,
    recorded: dict[int, Recording] | None = None,
) -> Outcome:
    """Run a whole session in this process (`load(name)` -> (module, tokenizer)); `recorded`:
    see Program."""
    loop = SessionLoop(plan, on_log, tensors)
    while (item := loop.next_segment()) is not None:
        segment, imports = item
        model, tokenizer = load(segment.model)
        loop.record_segment(run_segment(model, tokenizer, segment, imports, tensors, on_log=on_log,
                                        recorded=recorded))
    return loop.outcome
