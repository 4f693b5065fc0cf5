"""Engine overhead: what a local raysight trace costs over a bare forward, beside nnsight 0.8.1.

    .venv/bin/python bench/engine_overhead.py [--json PATH] [--clock cpu|wall] [--profile]

Both libraries run the same experiments on the same tiny random Llama (built into a temp folder,
4 layers, hidden 64), in this one process, interleaved round by round so drift hits both alike:

- bare:   the HF model's forward under torch.no_grad() on the pre-tokenized prompt.
- empty:  a trace whose only statement saves the logits (`model.lm_head.output.save()`), the
          least an experiment can do and still get something back. Its time minus bare is the
          per-trace overhead. (`pass`, a trace that returns nothing, is reported beside it.)
- reads:  empty plus N reads, each `module.output.save()` of a different module, in execution
          order: per layer input_layernorm, post_attention_layernorm, mlp, the layer (N <= 16).
- edits:  empty plus N in-place edits `module.output[:] += 0.5` on the same modules.
- programs: P single-read programs (one trace each, as P requests would send them) in ONE forward
          through the engine's API (`run_programs` + `ForwardDriver.for_programs`, the replica's
          batching path), minus a bare forward on the same P rows. `engine_programs_per_forward`:
          the overhead per program with P = 16 over the overhead of one program alone (what
          sharing a forward costs each program); `..._total`: all 16 programs' over one's.

Per-read and per-edit overheads are least-squares slopes over N in {4, 8, 12, 16}, where both
libraries' cost is linear in N (see SLOPE_NS: nnsight's empty trace costs more than one with 4
reads). Every configuration is timed `--inner` times per round, its calls spread over the
round, and the fastest kept (background load only adds time); the figures are the median, min and
max over rounds (for ratios: the ratio of the medians, and its extremes over 5 blocks of rounds;
the per-read and per-edit ratios: of the slopes through each configuration's median time). The
default clock is this process's CPU time, which other processes on a shared machine barely
disturb; `--clock wall` measures elapsed time (the same on an idle machine: all work here is one
thread at a time). Both sides tokenize the prompt on every trace (the bare forward does not), and
nnsight runs under torch.no_grad() (its traces otherwise record autograd); raysight's engine
turns grad off itself. Both run with torch.set_num_threads(1).

nnsight re-reads the source of each `with` block, so its experiments must live in this file, as
plain functions; raysight's experiments mirror them statement for statement.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub on these machines: fail fast

import torch

PROMPT = "The Eiffel Tower is in the city of"
NS = (0, 4, 8, 12, 16)  # numbers of reads / edits; 0 is the empty trace
# The per-operation slopes are fitted where the cost is linear in N: from the empty trace to the
# first reads nnsight's time falls (0.8.1, 2026-12-05: reads 0 / 4 / 8 / 16 took 1.703 / 1.642 /
# 1.640 / 1.718 ms, medians of 100 rounds; its worker thread's wake-ups change with the first
# module it waits for), so a slope through N = 0 is no per-read cost; raysight's first reads cost
# more than the later ones (its wrappers). Both libraries are fitted over the same N.
SLOPE_NS = NS[1:]
PROGRAMS = (1, 16)  # programs in one forward
BLOCKS = 5  # ratios' min and max: over this many blocks of consecutive rounds
EDIT = 0.5


# -- the experiments, raysight -------------------------------------------------------------------


def rs_pass(model, modules, n):
    with model.trace(PROMPT):
        pass


def rs_reads(model, modules, n):
    saves = []
    with model.trace(PROMPT):
        for m in modules[:n]:
            saves.append(m.output.save())
        logits = model.lm_head.output.save()
    return saves, logits


def rs_edits(model, modules, n):
    with model.trace(PROMPT):
        for m in modules[:n]:
            m.output[:] += EDIT
        logits = model.lm_head.output.save()
    return logits


# -- the same experiments, nnsight (callers hold torch.no_grad()) ---------------------------------


def nn_pass(model, modules, n):
    with model.trace(PROMPT):
        pass


def nn_reads(model, modules, n):
    saves = []
    with model.trace(PROMPT):
        for m in modules[:n]:
            saves.append(m.output.save())
        logits = model.lm_head.output.save()
    return saves, logits


def nn_edits(model, modules, n):
    with model.trace(PROMPT):
        for m in modules[:n]:
            m.output[:] += EDIT
        logits = model.lm_head.output.save()
    return logits


def programs_call(rs, count: int) -> Callable[[], object]:
    """`count` single-read programs in one forward. Each reads the last module (`lm_head`), so
    the forward runs to its end as the bare one does (programs that have all ended skip the
    rest of the model: a read of an early layer would make this cheaper than the baseline)."""
    from client_sdk.tracing import recording
    from intervention.drivers import ForwardDriver
    from intervention.engine import run_programs
    from intervention.program import Program

    with recording() as graph, rs.trace(PROMPT):
        rs.lm_head.output[:, -1].save()
    trace, module, tokenizer = graph.traces[0], rs.local_module, rs.tokenizer

    def call():
        programs = [Program(trace) for _ in range(count)]
        run_programs(module, programs, ForwardDriver.for_programs(tokenizer, programs))
        return [p.result() for p in programs]

    return call


def bare_rows(rs, count: int) -> Callable[[], object]:
    """A bare forward on `count` copies of the prompt (the rows the programs' forward has)."""
    module = rs.local_module
    ids = dict(rs.tokenizer([PROMPT] * count, return_tensors="pt"))

    def call():
        with torch.no_grad():
            module(**ids)

    return call


# -- setup -----------------------------------------------------------------------------------------


def edit_targets(model) -> list:
    """The 16 modules, in the order their outputs appear during the forward pass."""
    out = []
    for layer in model.model.layers:
        out += [layer.input_layernorm, layer.post_attention_layernorm, layer.mlp, layer]
    return out


def load(model_dir: Path):
    from nnsight.modeling.transformers import TransformersModel
    from transformers.utils import logging as hf_logging

    from client_sdk import LanguageModel

    hf_logging.disable_progress_bar()
    rs = LanguageModel(str(model_dir))
    rs.local_module  # load the weights now, not inside the first timed trace  # noqa: B018
    nn = TransformersModel(str(model_dir), task="text-generation", device_map="cpu", dispatch=True)
    return rs, nn


def check_same_numbers(rs, nn) -> None:
    """Both sides must compute the same thing, or the timings compare different work."""
    rs_saves, rs_logits = rs_reads(rs, edit_targets(rs), 16)
    with torch.no_grad():
        nn_saves, nn_logits = nn_reads(nn, edit_targets(nn), 16)
    for a, b in zip([*rs_saves, rs_logits], [*nn_saves, nn_logits], strict=True):
        torch.testing.assert_close(a, b)
    rs_edited = rs_edits(rs, edit_targets(rs), 16)
    with torch.no_grad():
        nn_edited = nn_edits(nn, edit_targets(nn), 16)
    torch.testing.assert_close(rs_edited, nn_edited)
    assert not torch.allclose(rs_edited, rs_logits), "the edits changed nothing"


# -- timing ----------------------------------------------------------------------------------------


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def slope(xs: tuple[int, ...], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def configs(rs, nn) -> dict[str, Callable[[], object]]:
    """name -> a zero-argument call running that configuration once."""
    module = rs.local_module
    ids = dict(rs.tokenizer(PROMPT, return_tensors="pt"))
    rs_mods, nn_mods = edit_targets(rs), edit_targets(nn)

    def bare():
        with torch.no_grad():
            module(**ids)

    def nn_call(fn, n):
        def call():
            with torch.no_grad():
                fn(nn, nn_mods, n)

        return call

    out: dict[str, Callable[[], object]] = {"bare": bare}
    out["raysight pass"] = lambda: rs_pass(rs, rs_mods, 0)
    out["nnsight pass"] = nn_call(nn_pass, 0)
    for n in NS:
        out[f"raysight reads {n}"] = lambda n=n: rs_reads(rs, rs_mods, n)
        out[f"nnsight reads {n}"] = nn_call(nn_reads, n)
    for n in NS[1:]:  # edits 0 is reads 0: the empty trace
        out[f"raysight edits {n}"] = lambda n=n: rs_edits(rs, rs_mods, n)
        out[f"nnsight edits {n}"] = nn_call(nn_edits, n)
    for p in PROGRAMS:
        out[f"programs {p}"] = programs_call(rs, p)
        out[f"bare rows {p}"] = bare_rows(rs, p)
    return out


def measure(
    calls: dict[str, Callable[[], object]],
    rounds: int,
    inner: int,
    clock: Callable[[], float],
    budget_s: float,
) -> list[dict[str, float]]:
    """Per round, each configuration's time. Stops early (after at least 10 rounds) when
    `budget_s` of wall time is spent, so a loaded machine still finishes in bounded time."""
    for fn in calls.values():  # warm up: first-call costs (caches, lazy imports) are not overhead
        for _ in range(3):
            fn()
    start = time.perf_counter()
    per_round = []
    for _ in range(rounds):
        gc.collect()  # no collection left pending by the previous round
        # The fastest of `inner` calls: other processes on a shared machine only ever add time.
        # The calls of one configuration are spread over the round, not made back to back, so
        # a burst of load elsewhere does not spoil all of them.
        best = dict.fromkeys(calls, float("inf"))
        for _ in range(inner):
            for name, fn in calls.items():
                t0 = clock()
                fn()
                best[name] = min(best[name], clock() - t0)
        per_round.append(best)
        if len(per_round) >= 10 and time.perf_counter() - start > budget_s:
            break
    return per_round


# -- figures ---------------------------------------------------------------------------------------


def figures(per_round: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per-round derived figures, then median/min/max over rounds."""
    derived: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        derived.setdefault(key, []).append(value)

    for r in per_round:
        add("bare_forward_ms", r["bare"] * 1e3)
        for lib in ("raysight", "nnsight"):
            empty = r[f"{lib} reads 0"]
            add(f"{lib}_trace_ms", empty * 1e3)
            add(f"{lib}_trace_overhead_ms", (empty - r["bare"]) * 1e3)
            add(f"{lib}_pass_trace_overhead_ms", (r[f"{lib} pass"] - r["bare"]) * 1e3)
            add(f"{lib}_per_read_us", slope(SLOPE_NS, [r[f"{lib} reads {n}"] for n in SLOPE_NS]) * 1e6)
            add(f"{lib}_per_edit_us", slope(SLOPE_NS, [r[f"{lib} edits {n}"] for n in SLOPE_NS]) * 1e6)
    for p in PROGRAMS:
        for r in per_round:
            add(f"programs_{p}_overhead_ms", (r[f"programs {p}"] - r[f"bare rows {p}"]) * 1e3)
    figs = {
        k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in derived.items()
    }
    # Ratios: one round's slope is noisy and can be near zero or negative, so a per-round ratio
    # means little. The median is the ratio of the two medians; min and max are the extremes of
    # the same ratio over BLOCKS consecutive blocks of rounds (how much it moved during the run).
    n_blocks = max(1, min(BLOCKS, len(per_round) // 4))
    many, one = derived[f"programs_{PROGRAMS[-1]}_overhead_ms"], derived["programs_1_overhead_ms"]
    figs["engine_programs_per_forward_total"] = ratio(many, one, n_blocks)
    figs["engine_programs_per_forward"] = ratio([m / PROGRAMS[-1] for m in many], one, n_blocks)
    figs["engine_overhead_ratio_vs_nnsight"] = ratio(
        derived["raysight_trace_overhead_ms"], derived["nnsight_trace_overhead_ms"], n_blocks)
    for op, key in (("reads", "engine_read_overhead_ratio_vs_nnsight"),
                    ("edits", "engine_edit_overhead_ratio_vs_nnsight")):
        figs[key] = slope_ratio(per_round, op, n_blocks)
    return figs


def slope_ratio(per_round: list[dict[str, float]], op: str, n_blocks: int) -> dict[str, float]:
    """raysight's per-operation cost over nnsight's: the slopes of each configuration's MEDIAN
    time over N (a single round's slope moves by more than the cost it measures: tens of µs on
    traces of ~1.5 ms); min and max: the same over `n_blocks` consecutive blocks of rounds."""

    def one(rounds: list[dict[str, float]]) -> float:
        def per_op(lib: str) -> float:
            return slope(SLOPE_NS, [statistics.median(r[f"{lib} {op} {n}"] for r in rounds) for n in SLOPE_NS])

        return per_op("raysight") / per_op("nnsight")

    size = len(per_round) // n_blocks
    blocks = [one(per_round[i : i + size]) for i in range(0, size * n_blocks, size)]
    return {"median": one(per_round), "min": min(blocks), "max": max(blocks)}


def ratio(a: list[float], b: list[float], n_blocks: int) -> dict[str, float]:
    """median(a) / median(b), with its extremes over `n_blocks` consecutive blocks of rounds."""
    size = len(a) // n_blocks
    blocks = [
        statistics.median(a[i : i + size]) / statistics.median(b[i : i + size])
        for i in range(0, size * n_blocks, size)
    ]
    return {"median": statistics.median(a) / statistics.median(b), "min": min(blocks), "max": max(blocks)}


def table(figs: dict[str, dict[str, float]]) -> str:
    rows = [
        ("bare forward (ms)", "bare_forward_ms", "bare_forward_ms"),
        ("trace, one save (ms)", "raysight_trace_ms", "nnsight_trace_ms"),
        ("per-trace overhead (ms)", "raysight_trace_overhead_ms", "nnsight_trace_overhead_ms"),
        ("  empty `pass` trace (ms)", "raysight_pass_trace_overhead_ms", "nnsight_pass_trace_overhead_ms"),
        ("per read (us)", "raysight_per_read_us", "nnsight_per_read_us"),
        ("per edit (us)", "raysight_per_edit_us", "nnsight_per_edit_us"),
    ]

    def cell(f: dict[str, float]) -> str:
        return f"{f['median']:8.3f} [{f['min']:.3f}, {f['max']:.3f}]"

    lines = [f"{'median [min, max] over rounds':28}{'raysight':>28}{'nnsight 0.8.1':>28}"]
    for label, a, b in rows:
        lines.append(f"{label:28}{cell(figs[a]):>28}{cell(figs[b]):>28}")
    lines.append("")
    for label, key in (("per-trace overhead", "engine_overhead_ratio_vs_nnsight"),
                       ("per read", "engine_read_overhead_ratio_vs_nnsight"),
                       ("per edit", "engine_edit_overhead_ratio_vs_nnsight")):
        lines.append(f"raysight / nnsight, {label:20}{cell(figs[key]):>28}")
    lines.append("")
    for p in PROGRAMS:
        lines.append(f"{p:2d} program(s) in one forward, overhead (ms){cell(figs[f'programs_{p}_overhead_ms']):>28}")
    lines.append(f"{PROGRAMS[-1]} programs / 1, overhead{cell(figs['engine_programs_per_forward_total']):>45}")
    lines.append(f"  per program, in the {PROGRAMS[-1]} / alone{cell(figs['engine_programs_per_forward']):>41}")
    return "\n".join(lines)


def profile(rs, n: int = 16, calls: int = 300) -> None:
    """cProfile of raysight's trace path (tracing, validation, engine, forward), top entries."""
    import cProfile
    import pstats

    mods = edit_targets(rs)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        rs_reads(rs, mods, n)
        rs_edits(rs, mods, n)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=80, help="timing rounds (default 80)")
    parser.add_argument("--inner", type=int, default=5, help="calls per configuration per round")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="cpu",
        help="cpu: this process's CPU time (default; other processes' load does not count), "
        "wall: elapsed time",
    )
    parser.add_argument(
        "--budget-s", type=float, default=75.0,
        help="stop timing after this many seconds (at least 10 rounds run; default 75)",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of raysight")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread: less scheduler noise on a small shared machine

    from fixtures.tiny_models import build_tiny_llama

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_llama(Path(tmp) / "tiny-llama", seed=0)
        rs, nn = load(model_dir)
        cfg = rs.local_module.config
        model_text = (
            f"tiny Llama: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, intermediate "
            f"{cfg.intermediate_size}, {cfg.num_attention_heads} heads ({cfg.num_key_value_heads} kv), "
            f"vocab {cfg.vocab_size}; prompt of {len(rs.tokenizer(PROMPT)['input_ids'])} tokens"
        )
        check_same_numbers(rs, nn)
        per_round = measure(
            configs(rs, nn), args.rounds, args.inner, CLOCKS[args.clock], args.budget_s
        )
        figs = figures(per_round)
        print(table(figs))
        if args.profile:
            profile(rs)
    import nnsight
    import transformers

    result = {
        **figs,
        "configs_ms": {  # each configuration's time, median over rounds
            name: statistics.median(r[name] for r in per_round) * 1e3 for name in per_round[0]
        },
        "settings": {
            "rounds": len(per_round), "inner": args.inner, "clock": args.clock,
            "n_values": list(NS), "slope_n_values": list(SLOPE_NS), "prompt": PROMPT,
            "edit": f"module.output[:] += {EDIT}", "torch_threads": torch.get_num_threads(),
        },
        "machine": {
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "nnsight": nnsight.__version__,
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "model": model_text, "load_average_end": [round(x, 2) for x in os.getloadavg()],
        },
        "wall_s": time.perf_counter() - start,
    }
    print(
        f"\n{len(per_round)} rounds x {args.inner} calls per configuration, {args.clock} clock, "
        f"{result['wall_s']:.0f} s in all"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
