"""Drivers: how the model is called for one run of the engine.

A driver owns the model call and its inputs: `ForwardDriver` is one forward pass on a batch that
stacks every program's rows, where a module's k-th call in that forward is call k. The shape
admits more: a generate driver calls the model many times (module call k is step k), and a
backward runs inside a program's step with grad mode on (`grad`), its gradients arriving as events
too. Whatever the driver, the interleaver turns module calls into events and programs consume
them; the driver never looks inside a program.
"""

from __future__ import annotations

from typing import Any

import torch

from intervention.args import ArgError, decode, no_refs
from intervention.errors import InterventionError, ValidationError
from intervention.inputs import Batch, pad_id, stack, trace_rows
from intervention.interleaver import Interleaver
from intervention.program import Program
from intervention.values import Shape, first_device


class ForwardDriver:
    """One forward pass of the model on the stacked rows of its programs."""

    grad = False  # interventions read and edit activations; nothing here needs autograd

    def __init__(self, batch: Batch, kwargs: dict[str, Any]):
        self.batch = batch
        self.kwargs = kwargs
        self.shape = Shape(batch.size, batch.width)

    @classmethod
    def for_programs(cls, tokenizer: Any, programs: list[Program]) -> ForwardDriver | None:
        """Stack the programs' inputs into one batch and give each program its rows. A program
        whose input is invalid fails alone; None if no program is left to run."""
        parts, placed = [], []
        for program in programs:
            try:
                parts.append(trace_rows(tokenizer, program.trace, program.tensors))
            except InterventionError as err:
                program.fail(err)
                continue
            placed.append(program)
        if not placed:
            return None
        try:  # programs run together only with equal forward kwargs: the first one's stand
            kwargs = decode({"$dict": placed[0].trace.kwargs}, no_refs, placed[0].tensors)
        except ArgError as exc:
            for program in placed:
                program.fail(ValidationError(str(exc), program.trace.loc))
            return None
        batch = stack(parts, pad_id(tokenizer))
        for program, start, spans, pos in zip(placed, batch.starts, batch.spans, batch.pos, strict=True):
            program.place(start, spans, batch.size, pos)
        return cls(batch, kwargs)

    def run(self, model: torch.nn.Module, il: Interleaver) -> None:
        device = first_device(model)
        inputs = {k: v.to(device) for k, v in self.batch.kwargs.items()}
        model(**inputs, **self.kwargs)
