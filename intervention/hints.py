"""Hints for the commonest porting mistake, added to an error at the user's line.

Tutorials written for transformers 4 index a decoder layer's output as a tuple
(`layers[i].output[0][:, -1, :]`); in transformers 5 it is the hidden-states tensor, so `[0]` is its
first batch row and the next index fails. Both the engine (at run time) and the shape check (on
meta tensors, intervention/scan.py) say so, with what to write instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from intervention.args import walk
from intervention.ir import Node, TraceIR


def tuple_habit(trace: TraceIR, loc: Any, is_tensor: Callable[[Node], bool]) -> str | None:
    """If a node at the failing line, or one it depends on, is `module.output[0]` on a module
    whose value is a tensor (`is_tensor(read node)`), say so and what to write instead."""
    by_id: dict[int, Node] = {n.id: n for n in trace.nodes}
    reads = {n.id: n for n in trace.nodes if n.op in ("module.output", "module.input")}
    failing = [n for n in trace.nodes if n.loc == loc]
    seen: set[int] = set()
    stack = [n.id for n in failing]
    while stack:
        node = by_id.get(stack.pop())
        if node is None or node.id in seen:
            continue
        seen.add(node.id)
        args = node.args
        if node.op == "getitem" and len(args) == 2 and args[1] == 0 and isinstance(args[0], dict):
            source = reads.get(args[0].get("$ref"))
            if source is not None and is_tensor(source):
                path, attr = source.args[0], "." + source.op.split(".")[1]
                return (
                    f"hint: '{path}'{attr} is a tensor, not a tuple (in transformers 5 a decoder "
                    f"layer returns its hidden states tensor), so {attr}[0] is its first batch "
                    f"row. Drop the [0]: write {attr}[:, -1, :] rather than {attr}[0][:, -1, :]."
                )
        for value in (*args, *node.kwargs.values()):
            stack.extend(body for tag, body in walk(value) if tag == "$ref")
    return None
