"""Node arguments on the wire: plain JSON plus a few tagged objects.

Every JSON object inside an argument is a tag with exactly one key:

    {"$ref": 7}              the value of node 7 (this trace or an earlier one)
    {"$tensor": "t0"}        a tensor blob shipped beside the IR (safetensors)
    {"$slice": [a, b, c]}    slice(a, b, c)
    {"$ellipsis": null}      ...
    {"$tuple": [...]}        a tuple (JSON lists decode to lists)
    {"$dict": {"k": v}}      a dict with string keys
    {"$dtype": "float32"}    a torch dtype
    {"$float": "inf"}        inf, -inf, nan

Decoding never evaluates anything: unknown tags are rejected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
        "uint8", "bool", "complex64",
    )
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ArgError(ValueError):
    """An argument that cannot be encoded or decoded."""


_PLAIN = frozenset({int, str, bool, type(None)})  # exact types that encode to themselves
PLAIN_TYPES = _PLAIN  # for callers with their own fast paths (the tracer)


def encode(value: Any, tensor_name: Callable[[torch.Tensor], str], ref_of: Callable[[Any], int | None]) -> Any:
    """Python value -> JSON. `ref_of` maps proxies to node ids; `tensor_name` stores a tensor."""
    # Fast paths for the common cases, none of which can be a proxy: skip the ref_of call.
    if type(value) in _PLAIN:
        return value
    if type(value) is float and math.isfinite(value):
        return value
    if type(value) is list:  # every node's argument list
        return [v if type(v) in _PLAIN else encode(v, tensor_name, ref_of) for v in value]
    ref = ref_of(value)
    if ref is not None:
        return {"$ref": ref}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, torch.Tensor):
        return {"$tensor": tensor_name(value)}
    if isinstance(value, slice):
        parts = (value.start, value.stop, value.step)
        return {"$slice": [v if type(v) in _PLAIN else encode(v, tensor_name, ref_of) for v in parts]}
    if value is Ellipsis:
        return {"$ellipsis": None}
    if isinstance(value, torch.dtype):
        if value not in _DTYPE_NAMES:
            raise ArgError(f"dtype {value} is not supported")
        return {"$dtype": _DTYPE_NAMES[value]}
    if isinstance(value, list):
        return [encode(v, tensor_name, ref_of) for v in value]
    if isinstance(value, tuple):  # torch.Size too
        return {"$tuple": [v if type(v) in _PLAIN else encode(v, tensor_name, ref_of) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ArgError("only dicts with string keys can be sent")
        return {"$dict": {k: encode(v, tensor_name, ref_of) for k, v in value.items()}}
    raise ArgError(f"a value of type {type(value).__name__} cannot be used inside a trace")


def decode(value: Any, resolve: Callable[[int], Any], tensors: dict[str, torch.Tensor]) -> Any:
    """JSON -> Python value, resolving node references through `resolve`."""
    if isinstance(value, list):
        # Scalars decode to themselves: skip the call for them (most arguments are scalars).
        return [decode(v, resolve, tensors) if isinstance(v, (list, dict)) else v for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and type(value.get("$ref")) is int:  # the most common tag: skip _tag
        return resolve(value["$ref"])
    tag, body = _tag(value)
    if tag == "$ref":
        return resolve(body)
    if tag == "$tensor":
        if body not in tensors:
            raise ArgError(f"tensor blob {body!r} is missing from the request")
        return tensors[body]
    if tag == "$slice":
        return slice(*[decode(v, resolve, tensors) for v in body])
    if tag == "$ellipsis":
        return Ellipsis
    if tag == "$tuple":
        return tuple(decode(v, resolve, tensors) for v in body)
    if tag == "$dict":
        return {k: decode(v, resolve, tensors) for k, v in body.items()}
    if tag == "$dtype":
        return DTYPES[body]
    return float(body)  # $float, checked by _tag


_JSON_SCALARS = frozenset({int, float, str, bool, type(None)})  # hold no tags


def plain_slice(value: Any) -> list | None:
    """The body of `value` if it is a well-formed {"$slice": [a, b, c]} whose parts hold no tags
    (`x[:]`, `x[0:3]`), else None. Such slices are the most common argument after refs: callers
    handle them without the general walk, which would find nothing in them to resolve or check."""
    if type(value) is dict and len(value) == 1:
        body = value.get("$slice")
        if (
            type(body) is list and len(body) == 3
            and type(body[0]) in _JSON_SCALARS and type(body[1]) in _JSON_SCALARS and type(body[2]) in _JSON_SCALARS
        ):
            return body
    return None


# tag -> check of its body. Built once: _tag runs for every tagged object of every node.
_TAG_CHECKS: dict[str, Callable[[Any], bool]] = {
    "$ref": lambda b: isinstance(b, int) and not isinstance(b, bool),
    "$tensor": lambda b: isinstance(b, str),
    "$slice": lambda b: isinstance(b, list) and len(b) == 3,
    "$ellipsis": lambda b: b is None,
    "$tuple": lambda b: isinstance(b, list),
    "$dict": lambda b: isinstance(b, dict),
    "$dtype": lambda b: b in DTYPES,
    "$float": lambda b: b in ("inf", "-inf", "nan"),
}


def _tag(value: dict) -> tuple[str, Any]:
    if len(value) != 1:
        raise ArgError(f"malformed argument object with keys {sorted(value)}")
    (tag, body), = value.items()
    ok = _TAG_CHECKS.get(tag)
    if ok is None or not ok(body):
        raise ArgError(f"malformed argument {tag!r}: {body!r}")
    return tag, body


def walk(value: Any) -> Iterator[tuple[str, Any]]:
    """Yield (tag, body) of every tagged object inside an encoded argument."""
    if isinstance(value, list):
        for v in value:
            if isinstance(v, (list, dict)):  # scalars hold no tags: skip a generator per scalar
                yield from walk(v)
    elif isinstance(value, dict):
        tag, body = _tag(value)
        yield tag, body
        if tag in ("$slice", "$tuple"):
            yield from walk(body)
        elif tag == "$dict":
            yield from walk(list(body.values()))


def visit(value: Any, fn: Callable[[str, Any], None]) -> None:
    """Call fn(tag, body) for every tagged object, in the order `walk` yields them.

    The same traversal without a generator per container: validation and `refs_in` run it on
    every node of every request. An exception from `fn` stops it where `walk` would stop."""
    if isinstance(value, list):
        for v in value:
            if isinstance(v, (list, dict)):
                visit(v, fn)
    elif isinstance(value, dict):
        if len(value) == 1 and type(value.get("$ref")) is int:  # the most common tag: skip _tag
            fn("$ref", value["$ref"])
            return
        tag, body = _tag(value)
        fn(tag, body)
        if tag in ("$slice", "$tuple"):
            visit(body, fn)
        elif tag == "$dict":
            visit(list(body.values()), fn)


def refs_in(args: list, kwargs: dict) -> Iterator[int]:
    refs: list[int] = []

    def collect(tag: str, body: Any) -> None:
        if tag == "$ref":
            refs.append(body)

    for v in args:  # visit(args, collect), with its most common case inline
        if type(v) is dict and len(v) == 1 and type(v.get("$ref")) is int:
            refs.append(v["$ref"])
        elif isinstance(v, (list, dict)):
            visit(v, collect)
    if kwargs:
        visit(list(kwargs.values()), collect)
    return iter(refs)
