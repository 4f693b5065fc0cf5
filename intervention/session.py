"""Running a whole session in one process: traces in order, values flowing between them.

Local execution uses this directly. The cluster runs the same loop in its session actor, with
each trace sent to its model's deployment and the values between traces kept in Ray's object store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from intervention.engine import run_trace
from intervention.inputs import prepare_batch
from intervention.ir import SessionIR

# name -> (module, tokenizer)
Loader = Callable[[str], tuple[torch.nn.Module, Any]]


@dataclass
class SessionOutcome:
    saves: dict[int, Any] = field(default_factory=dict)
    stopped: str | None = None
    traces_run: int = 0


def run_session(
    session: SessionIR,
    tensors: dict[str, torch.Tensor],
    load: Loader,
    on_log: Callable[[str], None] = print,
    on_trace: Callable[[int, int], None] | None = None,
) -> SessionOutcome:
    outcome = SessionOutcome()
    exports = session.exports()
    externals: dict[int, Any] = {}
    for i, trace in enumerate(session.traces):
        if on_trace:
            on_trace(i, len(session.traces))
        module, tokenizer = load(trace.model)
        batch, spans = prepare_batch(tokenizer, trace, tensors)
        result = run_trace(
            module, trace, batch, spans, tensors=tensors, externals=externals, keep=exports[i], on_log=on_log
        )
        outcome.saves.update(result.saves)
        externals.update(result.exports)
        outcome.traces_run += 1
        if result.stopped == "session":
            outcome.stopped = "session"
            break
    return outcome
