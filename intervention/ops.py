"""The op whitelist: every operation a node may name, and nothing else.

All ops are pure tensor computation. Nothing here does I/O, loads or saves files, or moves data to
a device the user picks (the engine places tensors itself). Adding a feature means adding an op
here; an existing op never changes meaning.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from intervention.limits import MAX_NEW_ELEMENTS

# Ops the engine implements itself because they touch modules or the run, not only values.
# name -> (min args, max args); args[0] is a module path for module ops.
MODULE_READS = {"module.output", "module.input", "module.inputs"}
MODULE_WRITES = {"module.set_output", "module.set_input", "module.skip"}
# wait for a module's input event (a skip: before the module would run)
INPUT_OPS = {"module.input", "module.inputs", "module.set_input", "module.skip"}
CONTROL_OPS = {"save", "log", "stop"}

ARITY: dict[str, tuple[int, int | None]] = {
    "module.output": (2, 2),  # path, call index
    "module.input": (2, 2),
    "module.inputs": (2, 2),
    "module.set_output": (3, 3),  # path, call index, value
    "module.set_input": (3, 3),
    "module.skip": (3, 3),  # path, call index, value: the module does not run, value is its output
    "module.call": (1, None),  # path, *args
    "result": (0, 0),
    "backward": (1, 1),  # loss: backpropagate to the activations (weights stay frozen)
    "grad": (1, 1),  # value: its gradient, once a backward has run  # what the model call returned (generate: the token ids), after the run
    "save": (1, 1),
    "log": (0, None),
    "stop": (1, 1),  # "trace" | "session"
    "getitem": (2, 2),
    "setitem": (3, 3),
    "augassign": (4, 4),  # target, index, in-place op, value: `target[index] op= value`
    "getattr": (2, 2),
    "method": (2, None),  # name, self, *args
    "function": (1, None),  # qualified name, *args
}

BINARY = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
    "floordiv": operator.floordiv, "mod": operator.mod, "pow": operator.pow,
    "matmul": operator.matmul, "and": operator.and_, "or": operator.or_, "xor": operator.xor,
    "lshift": operator.lshift, "rshift": operator.rshift,
    "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le,
    "gt": operator.gt, "ge": operator.ge,
    # In-place forms: `x[...] += v` must edit the module's tensor, as in PyTorch.
    "iadd": operator.iadd, "isub": operator.isub, "imul": operator.imul,
    "itruediv": operator.itruediv, "ifloordiv": operator.ifloordiv, "imod": operator.imod,
    "ipow": operator.ipow, "imatmul": operator.imatmul, "iand": operator.iand,
    "ior": operator.ior, "ixor": operator.ixor,
}
IN_PLACE = frozenset(op for op in BINARY if op.startswith("i"))  # `x[...] += v` edits x
UNARY = {"neg": operator.neg, "pos": operator.pos, "abs": operator.abs, "invert": operator.invert}
for _name in BINARY:
    ARITY[_name] = (2, 2)
for _name in UNARY:
    ARITY[_name] = (1, 1)

# Tensor methods a node may call. Pure, or in-place on the tensor itself; none moves devices.
TENSOR_METHODS = frozenset(["abs", "abs_", "add", "add_", "all", "amax", "amin", "any", "argmax", "argmin", "argsort", "bfloat16", "bmm", "bool", "ceil", "chunk", "clamp", "clamp_", "clip", "clone", "contiguous", "cos", "cumprod", "cumsum", "detach", "diag", "diff", "dim", "div", "div_", "dot", "double", "eq", "exp", "expand", "expand_as", "fill_", "flatten", "flip", "float", "floor", "gather", "ge", "gt", "half", "index_select", "int", "isnan", "isinf", "item", "le", "log", "log_softmax", "logsumexp", "long", "lt", "masked_fill", "masked_fill_", "matmul", "max", "mean", "min", "mm", "mul", "mul_", "nan_to_num", "narrow", "ne", "neg", "nonzero", "norm", "numel", "permute", "pow", "prod", "reciprocal", "relu", "repeat", "reshape", "roll", "round", "rsqrt", "scatter", "sigmoid", "sign", "sin", "size", "softmax", "sort", "split", "sqrt", "square", "squeeze", "std", "sub", "sub_", "sum", "t", "tanh", "tolist", "topk", "transpose", "tril", "triu", "type_as", "unbind", "unflatten", "unsqueeze", "var", "view", "view_as", "where", "zero_", "copy_", "new_zeros", "new_ones", "new_full", "to"])

# Tensor attributes a node may read (ModelOutput fields are allowed by name too, see engine).
TENSOR_ATTRS = frozenset({"shape", "dtype", "T", "mT", "ndim", "real", "imag"})


@dataclass(frozen=True)
class Function:
    name: str
    fn: object


def _functions() -> dict[str, object]:
    torch_names = ["abs", "allclose", "amax", "amin", "arange", "argmax", "argmin", "argsort", "bmm", "cat", "chunk", "clamp", "clone", "cos", "cosine_similarity", "cumsum", "diag", "dist", "dot", "einsum", "eq", "equal", "exp", "eye", "flatten", "flip", "full", "full_like", "gather", "ge", "gt", "index_select", "isclose", "le", "linspace", "log", "log_softmax", "logsumexp", "lt", "matmul", "max", "maximum", "mean", "min", "minimum", "mm", "mul", "ne", "norm", "ones", "ones_like", "outer", "permute", "pow", "prod", "relu", "reshape", "roll", "round", "rsqrt", "sigmoid", "sign", "sin", "softmax", "sort", "split", "sqrt", "square", "squeeze", "stack", "std", "sub", "sum", "tanh", "tensor", "topk", "transpose", "tril", "triu", "unbind", "unsqueeze", "var", "where", "zeros", "zeros_like", "add", "div", "neg", "nan_to_num", "take_along_dim"]
    functional_names = ["softmax", "log_softmax", "gelu", "silu", "relu", "tanh", "sigmoid", "normalize", "cosine_similarity", "kl_div", "cross_entropy", "mse_loss", "layer_norm", "pad", "one_hot", "embedding", "linear", "dropout"]
    table: dict[str, object] = {f"torch.{n}": getattr(torch, n) for n in torch_names}
    table.update({f"torch.nn.functional.{n}": getattr(F, n) for n in functional_names})
    table["torch.linalg.norm"] = torch.linalg.norm
    table["torch.linalg.vector_norm"] = torch.linalg.vector_norm
    return table


FUNCTIONS: dict[str, object] = _functions()

# Keyword arguments never accepted: they would move data or write outside the value graph.
FORBIDDEN_KWARGS = frozenset({"device", "out", "pin_memory", "generator", "layout"})


def check_call(op: str, name: str, args: list, kwargs: dict) -> str | None:
    """Why a method/function call may not run, or None. Static part of validation."""
    if op == "method" and name not in TENSOR_METHODS:
        return f"tensor method .{name}() is not supported inside a trace"
    if op == "function" and name not in FUNCTIONS:
        return f"{name}() is not supported inside a trace"
    bad = FORBIDDEN_KWARGS.intersection(kwargs)
    if bad:
        return f"keyword argument {min(bad)!r} is not allowed: raysight places tensors itself"
    return None


def check_to_args(args: list) -> str | None:
    """`.to()` is allowed for dtype conversion only (the first arg after self)."""
    for a in args[2:]:
        if not (isinstance(a, dict) and "$dtype" in a):
            return ".to() accepts a dtype only: raysight chooses devices itself"
    return None


# A request must not be able to ask a replica for terabytes (the cap: intervention/limits.py).
# Ops whose output size comes from their arguments (sizes, counts, widths), not only from the
# tensors they take: their output shape is always computed first, on the meta device.
SIZED_FUNCTIONS = frozenset(
    f"torch.{n}" for n in ("zeros", "ones", "full", "arange", "linspace", "eye", "diag")
) | {"torch.nn.functional.one_hot", "torch.nn.functional.pad"}
SIZED_METHODS = frozenset({"new_zeros", "new_ones", "new_full", "repeat", "expand", "diag"})
_FACTORIES = frozenset(f"torch.{n}" for n in ("zeros", "ones", "full", "arange", "linspace", "eye"))


def check_output(name: str, fn: Callable, args: list, kwargs: dict, obj: torch.Tensor | None = None) -> None:
    """Raise before running `fn` (a function, or method `name` of `obj`) if its output would hold
    more than MAX_NEW_ELEMENTS elements.

    Sized ops are always checked; any other op only when it takes two or more tensors whose
    element counts multiply past the limit (broadcasting, `matmul`, `outer`, `einsum`... produce
    at most that product), so the common small op costs one loop over its arguments."""
    if name not in SIZED_FUNCTIONS and name not in SIZED_METHODS:
        bound, tensors = 1, 0
        for a in (obj, *args, *kwargs.values()) if obj is not None else (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                bound *= max(a.numel(), 1)
                tensors += 1
        if tensors < 2 or bound <= MAX_NEW_ELEMENTS:
            return
    n = _output_elements(name, fn, args, kwargs, obj)
    if n > MAX_NEW_ELEMENTS:
        short = name.rsplit(".", 1)[-1]
        raise ValueError(f"{short}() would create {n:,} elements; the limit is {MAX_NEW_ELEMENTS:,}")


def check_binary(fn: Callable, a: object, b: object) -> None:
    """`check_output` for a plain binary operator (`a * b`, `a @ b`): only tensor pairs whose
    element counts multiply past the limit can grow (broadcasting, matmul)."""
    if (
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        and a.numel() * b.numel() > MAX_NEW_ELEMENTS
    ):
        n = _output_elements("", fn, [a, b], {}, None)
        if n > MAX_NEW_ELEMENTS:
            raise ValueError(f"this operation would create {n:,} elements; the limit is {MAX_NEW_ELEMENTS:,}")


def _output_elements(name: str, fn: Callable, args: list, kwargs: dict, obj: torch.Tensor | None) -> int:
    """Elements of the op's output, computed on the meta device (shapes only, no data). 0 when
    the meta run fails: the real call then raises its own error (or the trace's memory budget
    catches what it holds)."""
    if name == "torch.tensor":
        return 0  # literal data: bounded by the request size
    try:
        if name in _FACTORIES:
            out = fn(*_sizes(args), **_sizes(kwargs), device="meta")
        elif obj is not None:
            out = getattr(obj.to("meta"), name)(*_sizes(args), **_sizes(kwargs))
        else:
            if name == "torch.nn.functional.one_hot" and "num_classes" not in kwargs and len(args) < 2:
                # its width is the largest index + 1: read it from the (real) index tensor
                kwargs = {**kwargs, "num_classes": int(args[0].max()) + 1 if args[0].numel() else 0}
            out = fn(*[_meta(a) for a in args], **{k: _meta(v) for k, v in kwargs.items()})
    except Exception:  # noqa: BLE001 - see above
        return 0
    return _numel(out)


def _meta(value: object) -> object:
    """A tensor as a meta tensor (same shape and dtype, no data); a 0-d tensor as its number,
    since it may be a size; containers element-wise."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 else value.to("meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_meta(v) for v in value) if type(value) in (list, tuple) else value
    return value


def _sizes(value: object) -> object:
    """Size arguments as numbers: 0-d tensors (a size computed in the trace) become ints."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    if type(value) in (list, tuple):
        return type(value)(_sizes(v) for v in value)
    if isinstance(value, dict):
        return {k: _sizes(v) for k, v in value.items()}
    return value


def _numel(out: object) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel()
    if isinstance(out, (list, tuple)):
        return sum(_numel(o) for o in out)
    return 0
