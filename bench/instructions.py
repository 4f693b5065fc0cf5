"""Engine overhead in instructions (callgrind): the per-read / per-edit figures without the noise.

    .venv/bin/python bench/instructions.py [--calls 60] [--json PATH]

bench/engine_overhead.py times raysight and nnsight on this machine's CPU clock, which a busy
shared box makes noisy (its per-read and per-edit slopes move by ±50% between runs). This runs the
same configurations (and the programs-per-forward ones) under valgrind's callgrind and counts the instructions each call executes —
the same count on every run — so a change can be judged in one run. Needs valgrind and its header
(`valgrind/callgrind.h`) and a C compiler; ~3 minutes.

Counts exclude the kernel (system calls, the thread switches nnsight makes), so they understate
nnsight's time a little: a ratio here is a slightly pessimistic estimate of the timed one. A
garbage collection is run before each configuration and left enabled inside it, as in real use.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = ("raysight reads 0", "raysight reads 16", "raysight edits 16",
           "nnsight reads 0", "nnsight reads 16", "nnsight edits 16",
           "programs 1", "bare rows 1", "programs 16", "bare rows 16")
_SHIM = """#include <valgrind/callgrind.h>
void cg_start(void){ CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; CALLGRIND_TOGGLE_COLLECT; }
void cg_stop(void){ CALLGRIND_TOGGLE_COLLECT; CALLGRIND_DUMP_STATS; CALLGRIND_STOP_INSTRUMENTATION; }
"""


def child(shim: str, calls: int) -> None:
    """Inside valgrind: run each configuration `calls` times between start and stop marks."""
    import ctypes
    import gc

    import torch

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import engine_overhead as eo

    from fixtures.tiny_models import build_tiny_llama

    torch.set_num_threads(1)
    cg = ctypes.CDLL(shim)
    rs, nn = eo.load(build_tiny_llama(Path(tempfile.mkdtemp()) / "tiny-llama", seed=0))
    table = eo.configs(rs, nn)
    for name in CONFIGS:
        for _ in range(5):  # warm up
            table[name]()
    for name in CONFIGS:
        fn = table[name]
        gc.collect()
        cg.cg_start()
        for _ in range(calls):
            fn()
        cg.cg_stop()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=60, help="calls per configuration (default 60)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.calls)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        src, shim = Path(tmp) / "cg.c", Path(tmp) / "libcg.so"
        src.write_text(_SHIM)
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(src)], check=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
             f"--callgrind-out-file={tmp}/cg.out", sys.executable, __file__, "--child", str(shim),
             "--calls", str(args.calls)],
            check=True, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        per_call = {}
        for i, name in enumerate(CONFIGS, start=1):
            text = Path(f"{tmp}/cg.out.{i}").read_text()
            # "totals", not the header's "summary": after a zeroing the latter can be off (even wrap)
            total = int(re.search(r"^totals: (\d+)", text, re.MULTILINE).group(1))
            per_call[name] = total / args.calls
    figs: dict = {"instructions_per_call": per_call, "calls": args.calls}
    for lib in ("raysight", "nnsight"):
        base = per_call[f"{lib} reads 0"]
        figs[f"{lib}_read_instructions"] = (per_call[f"{lib} reads 16"] - base) / 16
        figs[f"{lib}_edit_instructions"] = (per_call[f"{lib} edits 16"] - base) / 16
    for what in ("read", "edit"):
        figs[f"engine_{what}_instructions_ratio_vs_nnsight"] = (
            figs[f"raysight_{what}_instructions"] / figs[f"nnsight_{what}_instructions"]
        )
    # 16 single-read programs in one forward (over 16 rows) against one program (over one row),
    # each minus a bare forward on the same rows.
    many = per_call["programs 16"] - per_call["bare rows 16"]
    one = per_call["programs 1"] - per_call["bare rows 1"]
    figs["engine_programs_per_forward_total_instructions"] = many / one
    figs["engine_programs_per_forward_instructions"] = many / 16 / one
    print(f"16 programs in one forward / 1 alone, overhead: {many / one:.3f} in all, {many / 16 / one:.3f} per program")
    for what in ("read", "edit"):
        print(f"per {what}: raysight {figs[f'raysight_{what}_instructions']:,.0f} instructions, "
              f"nnsight {figs[f'nnsight_{what}_instructions']:,.0f}: "
              f"ratio {figs[f'engine_{what}_instructions_ratio_vs_nnsight']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(figs, indent=2))
    return figs


if __name__ == "__main__":
    main(sys.argv[1:])
