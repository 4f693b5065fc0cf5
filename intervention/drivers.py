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
        self.placed: list[tuple[Program, int, int]] = []  # each program and its rows [start, end)

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
        driver = cls(batch, kwargs, pad)
        driver.placed = [(p, start, start + spans[-1][1])
                         for p, start, spans in zip(placed, batch.starts, batch.spans, strict=True)]
        return driver

    def run(self, model: torch.nn.Module, il: Interleaver) -> Any:
        device = first_device(model)
        inputs = {k: v.to(device) for k, v in self.batch.kwargs.items()}
        return model(**inputs, **self.kwargs)


class GenerateDriver(ForwardDriver):
    """HF `generate` on the stacked rows: module call k is decoding step k. Returns the token ids
    (prompt and new tokens, left-padded rows as in the batch).

    Programs of different requests in one generation (greedy, equal arguments) may end at
    different steps: alone, `generate` stops once every row of the program has produced EOS. So
    each program ends where it would alone (`_ProgramEnds`): it gets `tracer.result` then (its rows'
    tokens so far) and no event of a later step, while the generation goes on for the others."""

    def run(self, model: torch.nn.Module, il: Interleaver) -> Any:
        device = first_device(model)
        # generate derives positions from the attention mask itself, step after step
        inputs = {k: self.batch.kwargs[k].to(device) for k in ("input_ids", "attention_mask")}
        kwargs = dict(self.kwargs)
        seed = kwargs.pop("seed", None)
        kwargs.setdefault("pad_token_id", self.pad)
        eos = _token_ids(kwargs.get("eos_token_id", getattr(model.generation_config, "eos_token_id", None)))
        if len(self.placed) > 1 and eos:
            # generate's own list type; imported here, when a batch needs it
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_ProgramEnds(self.placed, eos, il)])
        # A user's seed makes sampling reproducible (same tokens locally and on a replica); the
        # process's own random state is left as it was.
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            return model.generate(**inputs, **kwargs)


class _ProgramEnds:
    """A stopping criterion of `generate`, called after each step's new token: a program all of whose rows have produced
    EOS ends here, as its generation would alone. Stops no row itself (generate's own criteria do)."""

    def __init__(self, placed: list[tuple[Program, int, int]], eos: list[int], il: Interleaver):
        self.placed, self.il = placed, il
        self.eos = torch.tensor(eos)
        self.ended: torch.Tensor | None = None  # per row: has produced EOS

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        new = torch.isin(input_ids[:, -1], self.eos.to(input_ids.device))
        self.ended = new if self.ended is None else self.ended | new
        for program, start, end in self.placed:
            if program.running and bool(self.ended[start:end].all()):
                self.il.end_program(program, input_ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _token_ids(value: Any) -> list[int]:
    """`eos_token_id` as generate takes it (an id, a list of ids, a tensor or None) -> ids."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def driver_for(tokenizer: Any, programs: list[Program]) -> ForwardDriver | None:
    """The driver for programs of one kind (they share a run only if their kinds and kwargs match)."""
    kind = GenerateDriver if programs and programs[0].trace.kind == "generate" else ForwardDriver
    return kind.for_programs(tokenizer, programs)
