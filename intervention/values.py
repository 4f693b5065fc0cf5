"""What a program sees of the batch, and what it keeps.

A program (or one of its invokes) owns some rows of the batch. `Rows` says which: (start, stop,
pos) where `pos` is how many leading positions of the batch's sequence dimension are padding added
only because shorter and longer prompts share the batch, or None when it owns the whole batch
(nothing to narrow). Reads are views of those rows, so in-place edits reach the model; writes go
back into the same rows.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.utils import ModelOutput

Rows = tuple[int, int, int] | None


class Shape:
    """The batch's geometry for one driver run: its rows and its sequence width (0 when the
    programs' widths all agree, so no position narrowing is ever needed)."""

    __slots__ = ("batch", "width")

    def __init__(self, batch: int, width: int = 0):
        self.batch, self.width = batch, width


def narrow(value: Any, rows: Rows, shape: Shape) -> Any:
    """The rows of `value` a thread may see. Views, so in-place edits reach the model."""
    if rows is None:
        return value
    if isinstance(value, torch.Tensor):
        if not value.dim() or value.shape[0] != shape.batch:
            return value
        start, stop, pos = rows
        if pos and value.dim() > 1 and value.shape[1] == shape.width:
            return value[start:stop, pos:]
        return value[start:stop]
    if isinstance(value, ModelOutput):
        return type(value)(**{k: narrow(v, rows, shape) for k, v in value.items()})
    if isinstance(value, tuple):
        return tuple(narrow(v, rows, shape) for v in value)
    if isinstance(value, list):
        return [narrow(v, rows, shape) for v in value]
    if isinstance(value, dict):
        return {k: narrow(v, rows, shape) for k, v in value.items()}
    return value


def narrow_result(value: Any, rows: Rows, shape: Shape) -> Any:
    """The rows of what the model call returned (`tracer.result`). `generate` returns the token
    ids of the prompt and the new tokens, wider than the batch: a program that shares the batch
    with longer prompts drops the leading columns of their padding there too, so its result is
    what it gets alone."""
    if (rows is not None and rows[2] and isinstance(value, torch.Tensor) and value.dim() == 2
            and value.shape[0] == shape.batch and value.shape[1] > shape.width > 0):
        return value[rows[0]:rows[1], rows[2]:]
    return narrow(value, rows, shape)


def write_rows(target: Any, value: Any, rows: tuple[int, int, int], shape: Shape) -> None:
    """Assign `value` to the rows (and positions) of `target` a thread owns, in place."""
    if isinstance(target, torch.Tensor):
        narrow(target, rows, shape)[...] = value
    elif isinstance(target, (tuple, list)) and isinstance(value, (tuple, list)):
        for t, v in zip(target, value, strict=True):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == shape.batch:
                narrow(t, rows, shape)[...] = v
    else:
        raise TypeError(f"cannot assign a {type(value).__name__} to part of a {type(target).__name__}")


def first_input(args: list, kwargs: dict) -> Any:
    """The value `module.input` names: the first positional argument, else the first keyword one."""
    if args:
        return args[0]
    if kwargs:
        return next(iter(kwargs.values()))
    raise ValueError("this module was called without inputs")


def materialize(value: Any) -> Any:
    """A value to keep after the forward: detached, and views copied so they do not pin whole
    activations (a saved `h[:, -1]` must not keep all of `h` alive)."""
    if isinstance(value, torch.Tensor):
        value = value.detach()  # a tensor of its own: the model's activation object is not kept
        # (detach drops `_base`: a view is known by a storage larger than its own elements)
        pins_more = value.untyped_storage().nbytes() > value.numel() * value.element_size()
        return value.clone() if pins_more else value
    if isinstance(value, ModelOutput):
        return value
    if type(value) in (tuple, list):
        return type(value)(materialize(v) for v in value)
    if isinstance(value, dict):
        return {k: materialize(v) for k, v in value.items()}
    return value


def nbytes(value: Any) -> int:
    """Bytes of the tensors in a value (a tensor, a model output, or containers of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    if isinstance(value, dict):  # ModelOutput too
        return sum(nbytes(v) for v in value.values())
    return 0


def first_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def to_device_of(value: Any, like: Any) -> Any:
    """`value` moved next to `like` (a tensor or a device) if it is a tensor elsewhere."""
    if not isinstance(value, torch.Tensor):
        return value
    device = like.device if isinstance(like, torch.Tensor) else like
    if isinstance(device, torch.device) and value.device != device:
        return value.to(device)
    return value


def same_device(args: list, default: torch.device) -> list:
    """Client tensors arrive on the CPU; move them next to the model's tensors they meet."""
    devices = {a.device for a in args if isinstance(a, torch.Tensor)}
    if len(devices) < 2:
        return args
    target = next((d for d in devices if d.type != "cpu"), default)
    return [a.to(target) if isinstance(a, torch.Tensor) and a.device.type == "cpu" else a for a in args]
