"""Turning invoke inputs into one left-padded batch.

Each invoke contributes rows: a prompt is one row, a list of prompts several, token ids one row
per list. Rows are left-padded to a common length, as nnsight does, so `[:, -1]` is every prompt's
last token. The spans say which rows belong to which invoke.
"""

from __future__ import annotations

from typing import Any

import torch

from intervention.args import decode
from intervention.errors import ValidationError
from intervention.ir import TraceIR


def token_rows(tokenizer: Any, value: Any) -> list[list[int]]:
    """One invoke's input -> rows of token ids."""
    if isinstance(value, str):
        return [tokenizer(value)["input_ids"]]
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dim() not in (1, 2):
            raise ValueError("a tensor input must hold token ids, with 1 or 2 dimensions")
        return [value.tolist()] if value.dim() == 1 else value.tolist()
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, str) for v in value):
            return [tokenizer(v)["input_ids"] for v in value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [list(value)]
        if all(isinstance(v, (list, tuple)) and v and all(isinstance(t, int) for t in v) for v in value):
            return [list(v) for v in value]
    raise ValueError(
        "an input must be a prompt, a list of prompts, token ids, or a list of token-id lists; "
        f"got {type(value).__name__}"
    )


def prepare_batch(
    tokenizer: Any, trace: TraceIR, tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """The forward's keyword arguments (input_ids, attention_mask) and each invoke's rows."""
    rows: list[list[int]] = []
    spans: list[tuple[int, int]] = []
    for invoke in trace.invokes:
        try:
            new = token_rows(tokenizer, decode(invoke.input, _no_ref, tensors))
        except ValueError as exc:
            raise ValidationError(str(exc), trace.loc, code="invalid_input") from None
        spans.append((len(rows), len(rows) + len(new)))
        rows.extend(new)
    if not rows:
        raise ValidationError("this trace has no input: pass a prompt to trace() or use invoke()", trace.loc)
    width = max(len(r) for r in rows)
    pad = _pad_id(tokenizer)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if not bool(mask.all()):
        # Left padding shifts absolute positions: count each row from its first real token (as
        # nnsight does), so a padded prompt sees what it sees alone, also with learned positions.
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return batch, spans


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return value
    return 0


def _no_ref(i: int) -> Any:
    raise ValueError("an input cannot refer to a value computed in a trace")
