"""Drivers: how the model is called for one run of the engine.

A driver owns the model call and its inputs: `ForwardDriver` is one forward pass on a batch that
stacks every program's rows, where a module's k-th call in that forward is call k.
`GenerateDriver` calls HF `generate` on the same batch: with the KV cache every decoding step calls
each module once, so a module's k-th call is step k (step 0 reads the whole prompt). A backward
would run inside a program's step with grad mode on (`grad`), its gradients arriving as events
too. Whatever the driver, the interleaver turns module calls into events and programs consume
them; the driver never looks inside a program. `run` returns what the model call returned: the
engine hands it to programs as the result event (`tracer.result`).
"""

from __future__ import annotations

from typing import Any

import torch

from intervention.args import ArgError, decode, no_refs
from intervention.errors import InterventionError, ValidationError
from intervention.inputs import Batch, pad_id, stack, tokenize, trace_inputs, trace_rows
from intervention.interleaver import Interleaver
from intervention.program import Program
from intervention.values import Shape, first_device


class ForwardDriver:
    """One forward pass of the model on the stacked rows of its programs."""

    grad = False  # interventions read and edit activations; nothing here needs autograd

    def __init__(self, batch: Batch, kwargs: dict[str, Any], pad: int = 0):
        self.batch = batch
        self.kwargs = kwargs
        self.pad = pad
        self.shape = Shape(batch.size, batch.width)

    @classmethod
    def for_programs(cls, tokenizer: Any, programs: list[Program]) -> ForwardDriver | None:
        """Stack the programs' inputs into one batch and give each program its rows. A program
        whose input is invalid fails alone; None if no program is left to run."""
        decoded, ready = [], []
        for program in programs:
            try:
                decoded.append(trace_inputs(program.trace, program.tensors))
            except InterventionError as err:
                program.fail(err)
                continue
            ready.append(program)
        tokens = tokenize(tokenizer, decoded)  # every program's prompts in one tokenizer call
        parts, placed = [], []
        for program, inputs in zip(ready, decoded, strict=True):
            try:
                parts.append(trace_rows(tokenizer, program.trace, program.tensors, inputs, tokens))
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
        pad = pad_id(tokenizer)
        batch = stack(parts, pad)
        for program, start, spans, pos in zip(placed, batch.starts, batch.spans, batch.pos, strict=True):
            program.place(start, spans, batch.size, pos)
        return cls(batch, kwargs, pad)

    def run(self, model: torch.nn.Module, il: Interleaver) -> Any:
        device = first_device(model)
        inputs = {k: v.to(device) for k, v in self.batch.kwargs.items()}
        return model(**inputs, **self.kwargs)


class GenerateDriver(ForwardDriver):
    """HF `generate` on the stacked rows: module call k is decoding step k. Returns the token ids
    (prompt and new tokens, left-padded rows as in the batch)."""

    def run(self, model: torch.nn.Module, il: Interleaver) -> Any:
        device = first_device(model)
        # generate derives positions from the attention mask itself, step after step
        inputs = {k: self.batch.kwargs[k].to(device) for k in ("input_ids", "attention_mask")}
        kwargs = dict(self.kwargs)
        seed = kwargs.pop("seed", None)
        kwargs.setdefault("pad_token_id", self.pad)
        # A user's seed makes sampling reproducible (same tokens locally and on a replica); the
        # process's own random state is left as it was.
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            return model.generate(**inputs, **kwargs)


def driver_for(tokenizer: Any, programs: list[Program]) -> ForwardDriver | None:
    """The driver for programs of one kind (they share a run only if their kinds and kwargs match)."""
    kind = GenerateDriver if programs and programs[0].trace.kind == "generate" else ForwardDriver
    return kind.for_programs(tokenizer, programs)
