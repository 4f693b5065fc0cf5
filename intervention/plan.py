"""Planning a session: which traces run together on which model, and which values cross.

Consecutive traces on the same model form a *segment*: the cluster runs a segment in one call to
one replica, where values flow between its traces in memory; values a later segment needs leave
it (into Ray's object store on the cluster). For every trace the plan also knows which of its
values any later trace uses (`keeps`): only those outlive their trace.

Session steps (a log or a stop in the session body, between traces) run in the session loop, between
segments: a segment never spans a step, so a step runs after the traces before it have ended.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from intervention.args import blobs_in, refs_in
from intervention.ir import SessionIR, SessionStep, TraceIR


@dataclass
class Segment:
    first: int  # index of its first trace in the session
    traces: list[TraceIR]
    keeps: list[set[int]]  # per trace: ids of its values that later traces (anywhere) use
    imports: set[int] = field(default_factory=set)  # ids made by earlier segments, used here
    exports: set[int] = field(default_factory=set)  # ids made here that later segments use
    blobs: set[str] | None = field(default_factory=set)  # client tensors it uses; None: all

    @property
    def model(self) -> str:
        return self.traces[0].model


@dataclass
class SessionPlan:
    segments: list[Segment]
    n_traces: int
    steps: list[SessionStep] = field(default_factory=list)  # session steps, in program order


def plan_session(session: SessionIR) -> SessionPlan:
    traces, steps = session.traces, session.steps
    if len(traces) == 1:  # the common case: nothing crosses, every blob is the trace's own
        return SessionPlan([Segment(0, list(traces), [set()], blobs=None)], 1, list(steps))
    breaks = {step.at for step in steps}  # a segment does not run across a session step
    uses = [_refs_of(t) for t in traces]
    owner: dict[int, int] = {n.id: i for i, t in enumerate(traces) for n in t.nodes}
    keeps: list[set[int]] = [set() for _ in traces]
    for i, used in enumerate(uses):
        for ref in used:
            j = owner.get(ref)
            if j is not None and j < i:
                keeps[j].add(ref)
    segments: list[Segment] = []
    for i, trace in enumerate(traces):
        if segments and segments[-1].model == trace.model and i not in breaks:
            seg = segments[-1]
            seg.traces.append(trace)
            seg.keeps.append(keeps[i])
        else:
            seg = Segment(i, [trace], [keeps[i]])
            segments.append(seg)
        seg.blobs |= _blobs_of(trace)
    for seg in segments:
        last = seg.first + len(seg.traces)
        here = range(seg.first, last)
        for i in here:
            seg.imports |= {r for r in uses[i] if owner.get(r, i) < seg.first}
        seg.exports = {r for i in range(last, len(traces)) for r in uses[i] if owner.get(r, -1) in here}
    return SessionPlan(segments, len(traces), list(steps))


def _refs_of(trace: TraceIR) -> set[int]:
    return {r for node in trace.nodes for r in refs_in(node.args, node.kwargs)}


def _blobs_of(trace: TraceIR) -> set[str]:
    names: set[str] = set()
    for node in trace.nodes:
        names |= blobs_in([node.args, list(node.kwargs.values())])
    for invoke in trace.invokes:
        names |= blobs_in(invoke.input)
    names |= blobs_in(list(trace.kwargs.values()))
    return names
