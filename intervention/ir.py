"""The intervention IR: what a client sends and the engine executes.

A session is a list of traces run in order. A trace names a model, its inputs (one entry per
invoke) and a flat list of nodes in program order. A node is one operation from the whitelist in
`ops.py`; its arguments are JSON values in which a few tagged objects stand for things JSON cannot
say (see `args.py`): references to other nodes (possibly of earlier traces), tensor blobs, slices.

Everything here is plain data: pydantic models, no code, nothing pickled. New features add ops and
optional fields; existing ones never change meaning (`IR_VERSION` bumps only if they must).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

IR_VERSION = 1

# Where a node came from in the user's code; every error names it.
Location = tuple[str, int, str]  # (file, line, source line text)


def format_location(loc: Location | None) -> str:
    if not loc:
        return "<unknown location>"
    file, line, code = loc
    text = f'File "{file}", line {line}'
    return f"{text}\n    {code}" if code else text


class Node(BaseModel):
    """One operation. `id` is unique within the whole session, so later traces can refer to it."""

    model_config = ConfigDict(extra="forbid")

    id: int
    op: str
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    # Which invoke's rows this node sees; None: the whole batch of the trace (code outside invokes).
    invoke: int | None = None
    loc: Location | None = None


class Invoke(BaseModel):
    """One input of a batched forward. `input` is a prompt, a list of prompts, token ids
    (list or nested list of ints), or a tensor-blob argument."""

    model_config = ConfigDict(extra="forbid")

    input: Any


class TraceIR(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    kind: Literal["forward"] = "forward"  # "generate" is the next kind; new kinds, not new meanings
    invokes: list[Invoke] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)  # forward kwargs, JSON args
    nodes: list[Node] = Field(default_factory=list)
    loc: Location | None = None


class SessionIR(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = IR_VERSION
    traces: list[TraceIR] = Field(default_factory=list)

    def exports(self) -> list[set[int]]:
        """For each trace, the ids of its nodes that a later trace uses (kept in the cluster)."""
        from intervention.args import refs_in

        if len(self.traces) == 1:  # the common case: nothing comes after the only trace
            return [set()]
        owner: dict[int, int] = {}
        needed: list[set[int]] = [set() for _ in self.traces]
        for i, trace in enumerate(self.traces):
            for node in trace.nodes:
                for ref in refs_in(node.args, node.kwargs):
                    j = owner.get(ref)
                    if j is not None and j != i:
                        needed[j].add(ref)
            for node in trace.nodes:
                owner[node.id] = i
        return needed
