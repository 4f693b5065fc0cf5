"""Module execution order: recorded once per model, used to reject out-of-order reads statically.

A model's forward calls its modules in a fixed order. Recording which module input/output events
fire first, on a tiny input, lets validation reject a trace that reads layer 3 and then layer 1
before any model time is spent. Only first calls are compared; anything not observed in the
recording is left to the engine's runtime check.
"""

from __future__ import annotations

from typing import Any

import torch

from intervention import ops
from intervention.errors import ValidationError
from intervention.ir import TraceIR

EventKey = tuple[str, str]  # (module path, "input" | "output")


def record_order(model: torch.nn.Module, tokenizer: Any) -> list[EventKey]:
    """The order in which module input/output events first fire on a short prompt."""
    order: list[EventKey] = []
    seen: set[EventKey] = set()

    def note(key: EventKey) -> None:
        if key not in seen:
            seen.add(key)
            order.append(key)

    handles = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, p=path: note((p, "input"))))
        handles.append(module.register_forward_hook(lambda m, a, o, p=path: note((p, "output"))))
    try:
        ids = tokenizer("order", return_tensors="pt")["input_ids"]
        device = next(model.parameters()).device
        with torch.no_grad():
            model(input_ids=ids.to(device))
    finally:
        for h in handles:
            h.remove()
    return order


# id(order) -> (order, its rank table). A model's order list never changes once recorded, and
# rebuilding the table cost more than the check itself; holding the list keeps its id unique.
_RANKS: dict[int, tuple[list, dict]] = {}


def rank_of(order: list[EventKey]) -> dict[EventKey, int]:
    """Each event's place in `order`."""
    cached = _RANKS.get(id(order))
    if cached is None or cached[0] is not order or len(cached[1]) != len(order):
        if len(_RANKS) > 64:  # orders come from a handful of models: bound it all the same
            _RANKS.clear()
        cached = _RANKS[id(order)] = (order, {key: i for i, key in enumerate(order)})
    return cached[1]


def ranks_by_kind(order: list[EventKey]) -> dict[str, dict[str, int]]:
    """`rank_of(order)` split by kind: "input" | "output" -> path -> rank (looked up without
    making a key). Made once per order, like `rank_of`'s table."""
    cached = _BY_KIND.get(id(order))
    if cached is None or cached[0] is not order:
        if len(_BY_KIND) > 64:
            _BY_KIND.clear()
        by_kind: dict[str, dict[str, int]] = {"input": {}, "output": {}}
        for (path, kind), r in rank_of(order).items():
            by_kind.setdefault(kind, {})[path] = r
        cached = _BY_KIND[id(order)] = (order, by_kind)
    return cached[1]


_BY_KIND: dict[int, tuple[list, dict]] = {}


def check_order(trace: TraceIR, order: list[EventKey]) -> None:
    """Raise if a thread (invoke) of `trace` reads modules against the recorded order."""
    rank, kinds = rank_of(order), _KIND
    last: dict[int | None, int] = {}
    for node in trace.nodes:
        kind = kinds.get(node.op)
        if kind is None:  # not a module event
            continue
        args = node.args
        if args[1] != 0:  # not its first call
            continue
        r = rank.get((args[0], kind))
        if r is None:
            continue
        if r < last.get(node.invoke, -1):
            raise out_of_order(args[0], kind, node.loc)
        last[node.invoke] = r


def out_of_order(path: str, kind: str, loc: Any) -> ValidationError:
    """What `check_order` raises (also found while recording: intervention.program.Recording)."""
    return ValidationError(
        f"'{path}' {kind} is accessed after a module that runs later in the forward pass: access "
        "modules in the order the model executes them",
        loc,
        code="out_of_order",
    )


# op -> the module event it waits for ("module.call" runs a module outside the forward: none)
_KIND = {op: "input" if op in ops.INPUT_OPS else "output" for op in ops.MODULE_READS | ops.MODULE_WRITES}
