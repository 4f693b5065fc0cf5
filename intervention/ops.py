"""The op whitelist: every operation a node may name, and nothing else.

All ops are pure tensor computation. Nothing here does I/O, loads or saves files, or moves data to
a device the user picks (the engine places tensors itself). Adding a feature means adding an op
here; an existing op never changes meaning.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


# Ops whose output size comes from their arguments, not from tensors the model made: a request
# must not be able to ask a replica for terabytes. 2**28 elements is 1 GiB of float32.
MAX_NEW_ELEMENTS = 2**28
ALLOCATING_FUNCTIONS = frozenset(
    f"torch.{n}" for n in ("zeros", "ones", "full", "arange", "linspace", "eye", "tensor")
)
ALLOCATING_METHODS = frozenset({"new_zeros", "new_ones", "new_full", "repeat", "expand"})


def check_allocation(name: str, args: tuple | list, kwargs: dict, obj=None) -> None:
    """Raise before allocating if the requested tensor is larger than MAX_NEW_ELEMENTS."""
    n = _requested_elements(name.rsplit(".", 1)[-1], list(args), kwargs, obj)
    if n > MAX_NEW_ELEMENTS:
        raise ValueError(f"{name}() would create {n:,} elements; the limit is {MAX_NEW_ELEMENTS:,}")


def _requested_elements(name: str, args: list, kwargs: dict, obj) -> int:
    if name == "tensor":
        return 0  # literal data: bounded by the request size
    if name == "arange":
        nums = [float(a) for a in args if isinstance(a, (int, float))]
        start, end, step = (0.0, nums[0], 1.0) if len(nums) == 1 else (*nums[:2], nums[2] if len(nums) > 2 else 1.0)
        return int(abs((end - start) / step)) if step else 0
    if name == "linspace":
        return int(kwargs.get("steps", args[2] if len(args) > 2 else 0))
    if name == "eye":
        n = int(args[0]) if args else 0
        return n * int(args[1] if len(args) > 1 else n)
    if name in ("full", "new_full"):
        args = args[:1]
    size = kwargs.get("size", args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args)
    n = 1
    for d in size:
        if isinstance(d, int):
            n *= max(d, 0)
    if name == "repeat" and obj is not None:
        n *= obj.numel()
    return n
