"""Opt-in marks along a request's path, in every process it crosses, for profiling.

With `RAYSIGHT_TIMELINE=FILE` in the environment of `raysight serve` (Ray's processes inherit
it), the ingress and the model replicas append one line per mark to FILE: `time pid request-id
label`, `time.time()` (one clock on one machine). `bench/breakdown.py` joins them with the
client's own marks into the per-hop table of docs/BENCHMARKS.md. Without the variable a mark
costs one dictionary lookup. Marks carry a request id and a label, nothing a user sent.
"""

from __future__ import annotations

import os
import time

ENV = "RAYSIGHT_TIMELINE"
_files: dict[str, int] = {}  # path -> file descriptor, opened for appending on first use


def mark(request_id: str, label: str, at: float | None = None) -> None:
    """Note that `request_id` reached `label` (at `at`, a `time.time()` taken earlier, or now)."""
    path = os.environ.get(ENV)
    if not path:
        return
    fd = _files.get(path)
    if fd is None:
        fd = _files[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    line = f"{time.time() if at is None else at:.6f} {os.getpid()} {request_id} {label}\n"
    os.write(fd, line.encode())  # one write of a short line: appends from processes do not interleave


def read(path: str) -> dict[str, dict[str, float]]:
    """request id -> label -> time (the first mark of each label), from a timeline file."""
    marks: dict[str, dict[str, float]] = {}
    with open(path) as f:
        for line in f:
            t, _pid, request_id, label = line.split()
            marks.setdefault(request_id, {}).setdefault(label, float(t))
    return marks
