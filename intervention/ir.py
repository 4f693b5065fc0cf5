"""The intervention IR: what a client sends and the engine executes.

A session is a list of traces run in order. A trace names a model, its inputs (one entry per
invoke) and a flat list of nodes in program order. A node is one operation from the whitelist in
`ops.py`; its arguments are JSON values in which a few tagged objects stand for things JSON cannot
say (see `args.py`): references to other nodes (possibly of earlier traces), tensor blobs, slices.

Everything here is plain data, nothing pickled. The classes are slotted dataclasses, cheap to build
while tracing; JSON goes through pydantic at the wire (`SESSION_ADAPTER`), which also enforces the
types and rejects unknown fields of untrusted requests. New features add ops and optional fields;
existing ones never change meaning (`IR_VERSION` bumps only if they must).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ConfigDict, TypeAdapter

IR_VERSION = 1

# Where a node came from in the user's code; every error names it.
Location = tuple[str, int, str]  # (file, line, source line text)

_STRICT = ConfigDict(extra="forbid")


def format_location(loc: Location | None) -> str:
    if not loc:
        return "<unknown location>"
    file, line, code = loc
    text = f'File "{file}", line {line}'
    return f"{text}\n    {code}" if code else text


@dataclass(slots=True)
class Node:
    """One operation. `id` is unique within the whole session, so later traces can refer to it."""

    __pydantic_config__ = _STRICT

    id: int
    op: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Which invoke's rows this node sees; None: all the rows of its trace (code outside invokes).
    invoke: int | None = None
    loc: Location | None = None


@dataclass(slots=True)
class Invoke:
    """One input of a batched forward. `input` is a prompt, a list of prompts, token ids
    (list or nested list of ints), or a tensor-blob argument; None: an input-less invoke, which
    adds no rows and whose code sees the whole batch."""

    __pydantic_config__ = _STRICT

    input: Any
    # An input-less invoke that records activations (`tracer.cache()`): at each module event its
    # reads run after every other thread's, so they see the values after interventions.
    cache: bool = False


@dataclass(slots=True)
class TraceIR:
    __pydantic_config__ = _STRICT

    model: str
    # "forward": one forward pass; "generate": HF `generate`, where a module's k-th call is step k.
    # New kinds, not new meanings.
    kind: Literal["forward", "generate"] = "forward"
    invokes: list[Invoke] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)  # forward (or generate) kwargs, JSON args
    nodes: list[Node] = field(default_factory=list)
    loc: Location | None = None


@dataclass(slots=True)
class SessionStep:
    """A statement of the session body outside any trace: `client_sdk.log(...)` or a session stop.
    It runs after the first `at` traces and before the rest, so its log prints in program order
    with the traces' logs, and a stop there ends the session (the traces after it do not run).
    Its arguments are values the client knows (JSON, tensor blobs), never references: a value
    computed in a trace is logged inside that trace."""

    __pydantic_config__ = _STRICT

    op: Literal["log", "stop"]
    at: int  # how many traces of the session run before it
    args: list[Any] = field(default_factory=list)
    loc: Location | None = None


@dataclass(slots=True)
class SessionIR:
    __pydantic_config__ = _STRICT

    version: int = IR_VERSION
    traces: list[TraceIR] = field(default_factory=list)
    steps: list[SessionStep] = field(default_factory=list)  # in program order (`at` never decreases)


SESSION_ADAPTER: TypeAdapter[SessionIR] = TypeAdapter(SessionIR)


def session_to_json(session: SessionIR) -> str:
    return SESSION_ADAPTER.dump_json(session).decode()


def session_from_json(text: str | bytes) -> SessionIR:
    """Parse and type-check a session; raises pydantic's ValidationError on anything malformed."""
    return SESSION_ADAPTER.validate_json(text)
