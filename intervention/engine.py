"""The engine: runs programs (compiled traces) inside a model's forward pass.

    programs = [Program(trace, tensors=..., externals=..., keep=...), ...]
    run_programs(model, programs, ForwardDriver.for_programs(tokenizer, programs))
    results = [p.result() for p in programs]

Three parts, one file each: `program.py` compiles a trace into threads of steps and runs them with
its own values and rows; `interleaver.py` turns module calls into events and dispatches them;
`drivers.py` calls the model. Several programs in one run is how an invoke-batched trace works and
how the model deployment merges traces of different requests: each sees only its rows, and one
program's error, stop or cancel ends it alone.

The engine leaves nothing behind: wrappers are removed and grad mode restored however the run
ends, and only saved or exported values survive it (views are copied so they do not pin whole
activations).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from intervention.drivers import driver_for
from intervention.errors import ExecutionError, InterventionError
from intervention.interleaver import Ended, Interleaver
from intervention.ir import TraceIR
from intervention.program import RESULT_EVENT, Program, ProgramResult


def run_programs(model: torch.nn.Module, programs: list[Program], driver: Any) -> None:
    """Run `programs` in one driver run of `model`. Each program ends done, stopped, failed or
    cancelled (see its `result()`); nothing raised here comes from a program."""
    grad = driver.grad or any(p.needs_grad for p in programs)  # a backward in some program
    with Interleaver(model, programs, driver.shape) as il, torch.set_grad_enabled(grad):
        for program in programs:
            # what needs no module: constants, client tensors (and a cancel made before the run)
            if program.running and (program.runs_first or program.cancel is not None):
                program.advance(None, il)
        if any(p.running for p in programs):
            try:
                output = driver.run(model, il)
                if any(p.running for p in programs):
                    il.current = output  # `tracer.result`: what the model call returned
                    il.fire(RESULT_EVENT)
                    il.current = None
            except Ended:
                pass  # every program ended early: the rest of the model's work is not needed
            except Exception as exc:  # noqa: BLE001 - the model itself failed, likely from an edit
                for program in programs:
                    program.fail(_forward_error(program, exc))
        for program in programs:
            program.finish(il)


def run_forward(model: torch.nn.Module, tokenizer: Any, programs: list[Program]) -> None:
    """Run `programs` in one driver run on their stacked inputs: one forward pass, or one
    `generate` for generation traces."""
    driver = driver_for(tokenizer, programs)
    if driver is not None:
        run_programs(model, programs, driver)


def run_trace(
    model: torch.nn.Module,
    trace: TraceIR,
    tokenizer: Any,
    *,
    tensors: dict[str, torch.Tensor] | None = None,
    externals: dict[int, Any] | None = None,
    keep: set[int] | frozenset[int] = frozenset(),
    on_log: Callable[[str], None] = print,
    cancel: threading.Event | None = None,
) -> ProgramResult:
    """Run one trace alone and return its result; raises its error, if any."""
    program = Program(trace, tensors=tensors, externals=externals, keep=keep, on_log=on_log, cancel=cancel)
    run_forward(model, tokenizer, [program])
    result = program.result()
    if result.error is not None:
        raise result.error
    return result


def _forward_error(program: Program, exc: Exception) -> InterventionError:
    msg = f"{type(exc).__name__}: {exc}"
    if program.last_write is not None:
        return ExecutionError(f"the model failed after this intervention: {msg}", program.last_write.loc)
    return ExecutionError(f"the model's forward pass failed: {msg}", program.trace.loc)
