"""Cross-request batching, the pure part: which traces may share a driver run, the fair order of
waiting traces, and which of them form the next batch. No Ray, no asyncio: the model deployment
(actors/batcher.py) drives it, and tests run it in-process.

A trace of one request becomes a `Program`; programs of different requests and users run in one
`run_programs` call (engine.py), each on its own rows. Whether two traces may share a run is a
question about the driver, which takes its kind and keyword arguments from the first program
(drivers.py): traces share a run only if their `batch_key`s are equal, and a trace whose key is
None runs alone.

The fair order is a per-user round robin: the first waiting trace of every user, in turn order,
then every user's second, and so on. A user served by a batch moves to the back of the turn
order, so a burst of one user never keeps another's first trace waiting for more than the batch
already running.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from intervention.errors import InterventionError
from intervention.inputs import trace_rows
from intervention.ir import TraceIR

# Defaults of the per-model limits (serve_app/config.py ModelConfig names them).
MAX_BATCH_SIZE = 16  # rows of one forward
MAX_BATCH_TOKENS = 8192  # rows x the longest prompt's tokens (what a left-padded batch holds)
BATCH_WAIT_MS = 2.0  # how long an idle replica waits for more traces before it starts a batch

_WHOLE_RUN_OPS = frozenset({"backward", "grad"})


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int = MAX_BATCH_SIZE
    max_batch_tokens: int = MAX_BATCH_TOKENS
    batch_wait_ms: float = BATCH_WAIT_MS


def batch_key(trace: TraceIR, *, samples_by_default: bool = False) -> Hashable | None:
    """What a trace must share with others to run in one driver run with them; None: it runs
    alone. `samples_by_default`: the model's generation config samples (do_sample) unless a
    trace says otherwise.

    Alone:
    - a trace with a backward or a `.grad` read: the driver then runs the whole forward with grad
      mode on, a backward walks (and frees) the graph of the whole batch, and `.grad` reads turn
      batch-wide module outputs into leaves; another program's backward would find the graph
      freed, and every program of the run would pay autograd's memory;
    - a trace whose forward kwargs hold a client tensor (`$tensor`): it names a blob of its own
      request, so equal JSON does not mean equal values;
    - a generation that samples (or searches beams): the random draws of a batch differ from
      those of one row, so a seeded sample would not be what the trace gets alone.
    Greedy generations with equal arguments batch: each program ends at the step where its own
    rows have all produced EOS, as alone (drivers.GenerateDriver), while the others go on.
    Everything else a program does stays in its rows (values.narrow / write_rows; `module.skip`
    of some rows runs the module and replaces those rows; explicit module calls run on the
    program's own values), so traces of one kind with equal kwargs share a forward."""
    for node in trace.nodes:
        if node.op in _WHOLE_RUN_OPS:
            return None
    kwargs = trace.kwargs or {}
    if _holds_tensor(kwargs):
        return None
    searches = kwargs.get("do_sample", samples_by_default) or kwargs.get("num_beams", 1) not in (1, None)
    if trace.kind == "generate" and searches:
        return None
    return (trace.model, trace.kind, json.dumps(kwargs, sort_keys=True))


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, dict):
        return "$tensor" in value or any(_holds_tensor(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_tensor(v) for v in value)
    return False


def trace_size(tokenizer: Any, trace: TraceIR, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(rows, longest row in tokens) of a trace's input; (1, 1) for an input the driver will
    refuse (its program then fails alone, at its line)."""
    try:
        rows, _ = trace_rows(tokenizer, trace, tensors)
    except InterventionError:
        return 1, 1
    return len(rows), max((len(r) for r in rows), default=1)


@dataclass(eq=False)
class Waiting:
    """One trace waiting for a batch. `key`: its batch_key (None: alone); `rows`, `width`: its
    share of the batch; `payload`: whatever the scheduler carries with it."""

    user: str
    key: Hashable | None
    rows: int = 1
    width: int = 1
    payload: Any = None


class FairQueue:
    """Waiting traces per user; `order()` is the per-user round robin."""

    def __init__(self) -> None:
        self._users: dict[str, deque[Waiting]] = {}  # insertion order is the turn order

    def __len__(self) -> int:
        return sum(len(q) for q in self._users.values())

    def push(self, item: Waiting) -> None:
        self._users.setdefault(item.user, deque()).append(item)

    def remove(self, item: Waiting) -> bool:
        """Take `item` out (e.g. cancelled while waiting); False if it is not here."""
        queue = self._users.get(item.user)
        if queue is None or item not in queue:
            return False
        queue.remove(item)
        if not queue:
            del self._users[item.user]
        return True

    def order(self) -> list[Waiting]:
        """Every waiting trace in the order they would be served: round k holds every user's
        k-th trace, users in turn order."""
        out: list[Waiting] = []
        queues = list(self._users.values())
        depth = 0
        while queues:
            queues = [q for q in queues if len(q) > depth]
            out.extend(q[depth] for q in queues)
            depth += 1
        return out

    def take(self, batch: Iterable[Waiting]) -> None:
        """Remove a batch's traces; the users it served go to the back of the turn order (in the
        order they were served), the others keep their turns."""
        served: list[str] = []
        for item in batch:
            if self.remove(item) and item.user not in served:
                served.append(item.user)
        for user in served:
            queue = self._users.pop(user, None)
            if queue:
                self._users[user] = queue


def select_batch(order: list[Waiting], limits: BatchLimits) -> list[Waiting]:
    """The next batch: the first trace in fair order, then every later one, in fair order, with
    its key that still fits `max_batch_size` rows and `max_batch_tokens` (rows x longest row).
    A trace that needs more than the limits alone still runs, alone; one with key None, alone."""
    if not order:
        return []
    head = order[0]
    batch, rows, width = [head], head.rows, head.width
    if head.key is None:
        return batch
    for item in order[1:]:
        if item.key != head.key:
            continue  # it keeps its place for a later batch of its kind
        n, w = rows + item.rows, max(width, item.width)
        if n > limits.max_batch_size or n * w > limits.max_batch_tokens:
            continue  # a smaller one later in the order may still fit
        batch.append(item)
        rows, width = n, w
        if rows >= limits.max_batch_size:
            break
    return batch
