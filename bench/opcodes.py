"""Where a read, an edit or a program goes, per Python function, in bytecodes executed.

    .venv/bin/python bench/opcodes.py reads|edits|programs [--top 25]

The same configurations as bench/engine_overhead.py, traced with `sys.settrace` opcode events:
per function, the bytecodes one operation adds — (reads 16 - reads 0) / 16, (edits 16 - reads 0)
/ 16, or (16 programs - 1 program) / 15 per extra program in one forward — and its calls. Exact
and repeatable in seconds (callgrind's `bench/instructions.py` takes minutes and sees only the
interpreter's C functions): the tool for finding what to cut. It does not see C time (tensor ops,
the tokenizer); on this machine one bytecode of the engine's Python costs ~65 instructions.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

Key = tuple[str, int, str]


def count(call: Callable[[], object], n: int = 5) -> tuple[collections.Counter, collections.Counter]:
    """Bytecodes and calls per function, averaged over `n` calls (after 5 warm-up calls)."""
    ops: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()

    def tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        code = frame.f_code
        key = (os.path.relpath(code.co_filename, HERE.parent) if code.co_filename.startswith(str(HERE.parent))
               else os.path.basename(code.co_filename), code.co_firstlineno, code.co_name)
        calls[key] += 1

        def local(frame, event, arg):
            if event == "opcode":
                ops[key] += 1
            return local

        return local

    for _ in range(5):
        call()
    sys.settrace(tracer)
    try:
        for _ in range(n):
            call()
    finally:
        sys.settrace(None)
    return (collections.Counter({k: v / n for k, v in ops.items()}),
            collections.Counter({k: v / n for k, v in calls.items()}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("reads", "edits", "programs"))
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    import engine_overhead as eo
    import torch
    from transformers.utils import logging as hf_logging

    from client_sdk import LanguageModel
    from fixtures.tiny_models import build_tiny_llama

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    rs = LanguageModel(str(build_tiny_llama(Path(tempfile.mkdtemp()) / "tiny-llama", seed=0)))
    rs.local_module  # noqa: B018 - load now
    mods = eo.edit_targets(rs)
    if args.what == "programs":
        (a, ac), (b, bc), per = count(eo.programs_call(rs, 1)), count(eo.programs_call(rs, 16)), 15
    else:
        many = eo.rs_edits if args.what == "edits" else eo.rs_reads
        (a, ac), (b, bc), per = count(lambda: eo.rs_reads(rs, mods, 0)), count(lambda: many(rs, mods, 16)), 16
    rows = sorted((((b[k] - a[k]) / per, (bc[k] - ac[k]) / per, k) for k in set(a) | set(b)), reverse=True)
    unit = "extra program" if args.what == "programs" else args.what[:-1]
    print(f"bytecodes per {unit}: {sum(r[0] for r in rows):.0f}")
    for ops, calls, (file, line, name) in rows[: args.top]:
        print(f"{ops:8.1f}  {calls:5.2f} calls  {file}:{line} {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
