"""Turning invoke inputs into one left-padded batch, for one program or several.

Each invoke contributes rows: a prompt is one row, a list of prompts several, token ids one row
per list. Rows are left-padded to a common length, as nnsight does, so `[:, -1]` is every prompt's
last token, and each row's positions count from its first real token, so a padded prompt sees what
it sees alone. Several programs (traces of different requests) stack their rows in one batch: each
gets its row offset, and `pos`, the padding it only has because a longer prompt shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from intervention.args import ArgError, decode, no_refs
from intervention.errors import ValidationError
from intervention.ir import TraceIR

Rows = list[list[int]]


@dataclass
class Batch:
    """The forward's keyword arguments, and where each program's rows are in it."""

    kwargs: dict[str, torch.Tensor]
    starts: list[int]  # each program's first row
    spans: list[list[tuple[int, int]]]  # each program's invokes' rows, relative to its start
    pos: list[int]  # each program's leading positions that are shared-batch padding only
    size: int
    width: int  # 0 when no program has such padding


def token_rows(tokenizer: Any, value: Any, tokens: dict[str, list[int]] | None = None) -> Rows:
    """One invoke's input -> rows of token ids. `tokens`: prompts tokenized already (see
    `tokenize`); others are tokenized here."""
    if isinstance(value, str):
        ids = tokens.get(value) if tokens else None
        return [ids if ids is not None else tokenizer(value)["input_ids"]]
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dim() not in (1, 2):
            raise ValueError("a tensor input must hold token ids, with 1 or 2 dimensions")
        return [value.tolist()] if value.dim() == 1 else value.tolist()
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, str) for v in value):
            if tokens and all(v in tokens for v in value):
                return [tokens[v] for v in value]
            return [tokenizer(v)["input_ids"] for v in value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [list(value)]
        if all(isinstance(v, (list, tuple)) and v and all(isinstance(t, int) for t in v) for v in value):
            return [list(v) for v in value]
    raise ValueError(
        "an input must be a prompt, a list of prompts, token ids, or a list of token-id lists; "
        f"got {type(value).__name__}"
    )


def trace_inputs(trace: TraceIR, tensors: dict[str, torch.Tensor]) -> list[Any]:
    """Each invoke's input, decoded (None: an invoke without one)."""
    out = []
    for invoke in trace.invokes:
        if invoke.input is None:
            out.append(None)
            continue
        try:
            out.append(decode(invoke.input, no_refs, tensors))
        except ArgError as exc:
            raise ValidationError(str(exc), trace.loc, code="invalid_input") from None
    return out


def tokenize(tokenizer: Any, inputs: list[list[Any]]) -> dict[str, list[int]]:
    """The distinct prompts among several traces' decoded inputs, tokenized in one call: a
    tokenizer call costs far more than the per-prompt work, and programs batched together
    often share prompts. ({} if the batch call fails: each prompt is then tried alone, so the
    error belongs to its program.)"""
    prompts: dict[str, None] = {}
    for values in inputs:
        for value in values:
            if isinstance(value, str):
                prompts[value] = None
            elif isinstance(value, (list, tuple)):
                for v in value:
                    if isinstance(v, str):
                        prompts[v] = None
    if len(prompts) < 2 and sum(len(v) for v in inputs) < 2:
        return {}  # one prompt once: nothing to share, tokenized where it is used
    try:
        ids = tokenizer(list(prompts))["input_ids"]
    except Exception:  # noqa: BLE001 - reported per program by the one-by-one path
        return {}
    return dict(zip(prompts, ids, strict=True))


def trace_rows(
    tokenizer: Any, trace: TraceIR, tensors: dict[str, torch.Tensor],
    inputs: list[Any] | None = None, tokens: dict[str, list[int]] | None = None,
) -> tuple[Rows, list[tuple[int, int]]]:
    """A trace's rows, and which of them each invoke owns. An invoke without an input (None)
    adds no rows and owns them all: its code sees the whole batch. `inputs`: the trace's
    decoded inputs (`trace_inputs`), `tokens`: prompts tokenized already (`tokenize`)."""
    if inputs is None:
        inputs = trace_inputs(trace, tensors)
    rows: Rows = []
    spans: list[tuple[int, int]] = []
    whole: list[int] = []
    for value in inputs:
        if value is None:
            whole.append(len(spans))
            spans.append((0, 0))
            continue
        try:
            new = token_rows(tokenizer, value, tokens)
        except ValueError as exc:
            raise ValidationError(str(exc), trace.loc, code="invalid_input") from None
        spans.append((len(rows), len(rows) + len(new)))
        rows.extend(new)
    if not rows:
        raise ValidationError("this trace has no input: pass a prompt to trace() or use invoke()", trace.loc)
    for i in whole:
        spans[i] = (0, len(rows))
    return rows, spans


def stack(parts: list[tuple[Rows, list[tuple[int, int]]]], pad_id: int) -> Batch:
    """One left-padded batch from each program's (rows, spans)."""
    rows = [r for part, _ in parts for r in part]
    width = max(len(r) for r in rows)
    # Padded in Python, then one tensor each: a tensor per row costs more than the lists.
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    padded = any(len(r) < width for r in rows)
    if padded:
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    else:
        mask = torch.ones((len(rows), width), dtype=torch.long)
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if padded:
        # Left padding shifts absolute positions: count each row from its first real token (as
        # nnsight does), so a padded prompt sees what it sees alone, also with learned positions.
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    starts, pos, start = [], [], 0
    for part, _ in parts:
        starts.append(start)
        start += len(part)
        pos.append(width - max(len(r) for r in part) if len(parts) > 1 else 0)
    return Batch(kwargs, starts, [spans for _, spans in parts], pos, len(rows), width if any(pos) else 0)


def pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return value
    return 0


def prepare_batch(
    tokenizer: Any, trace: TraceIR, tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """One trace's forward keyword arguments (input_ids, attention_mask) and each invoke's rows."""
    batch = stack([trace_rows(tokenizer, trace, tensors)], pad_id(tokenizer))
    return batch.kwargs, batch.spans[0]
