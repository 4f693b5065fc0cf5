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

Every node of every trace goes through this module several times (recorded, checked, compiled), so
the common cases — a reference, a scalar, a plain slice like `x[:, -1]` — take fast paths. They are
written once, here: `encode_list`, `decode_list` and `visit_args`; everything else calls them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from intervention.dtypes import WIRE_DTYPE_NAMES

WIRE_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in WIRE_DTYPE_NAMES}
_DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}


class ArgError(ValueError):
    """An argument that cannot be encoded or decoded."""


PLAIN_TYPES = frozenset({int, str, bool, type(None)})  # exact types that encode to themselves
_JSON_SCALARS = frozenset({int, float, str, bool, type(None)})  # hold no tags

TensorNamer = Callable[[torch.Tensor], str]
RefOf = Callable[[Any], "int | None"]


def ref_id(value: Any) -> int | None:
    """The node id of a well-formed {"$ref": n}, else None (the most common tag by far)."""
    if type(value) is dict and len(value) == 1:
        body = value.get("$ref")
        if type(body) is int:
            return body
    return None


def plain_slice(value: Any) -> list | None:
    """The body of `value` if it is a well-formed {"$slice": [a, b, c]} whose parts hold no tags
    (`x[:]`, `x[0:3]`), else None. Such slices are the most common argument after refs: callers
    handle them without the general walk, which would find nothing in them to resolve or check."""
    if type(value) is dict and len(value) == 1:
        body = value.get("$slice")
        if (
            type(body) is list and len(body) == 3
            and type(body[0]) in _JSON_SCALARS and type(body[1]) in _JSON_SCALARS
            and type(body[2]) in _JSON_SCALARS
        ):
            return body
    return None


# -- encoding ------------------------------------------------------------------------------------


def encode_list(values: list, tensor_name: TensorNamer, ref_of: RefOf, ref_type: type | None = None) -> list:
    """`encode` of a list (every node's argument list). Values of exactly `ref_type` (the
    tracer's proxies) go straight to `ref_of`; scalars and plain slices encode inline."""
    out = []
    for v in values:
        t = type(v)
        if t is ref_type:
            ref = ref_of(v)
            out.append({"$ref": ref} if ref is not None else encode(v, tensor_name, ref_of))
        elif t in PLAIN_TYPES or (t is float and math.isfinite(v)):
            out.append(v)
        elif t is slice and type(v.start) in PLAIN_TYPES and type(v.stop) in PLAIN_TYPES and type(v.step) in PLAIN_TYPES:
            out.append({"$slice": [v.start, v.stop, v.step]})
        else:
            out.append(encode(v, tensor_name, ref_of))
    return out


def encode(value: Any, tensor_name: TensorNamer, ref_of: RefOf) -> Any:
    """Python value -> JSON. `ref_of` maps proxies to node ids; `tensor_name` stores a tensor."""
    if type(value) in PLAIN_TYPES:
        return value
    if type(value) is list:
        return encode_list(value, tensor_name, ref_of)
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
        return {"$slice": encode_list([value.start, value.stop, value.step], tensor_name, ref_of)}
    if value is Ellipsis:
        return {"$ellipsis": None}
    if isinstance(value, torch.dtype):
        if value not in _DTYPE_NAMES:
            raise ArgError(f"dtype {value} is not supported")
        return {"$dtype": _DTYPE_NAMES[value]}
    if isinstance(value, list):
        return encode_list(value, tensor_name, ref_of)
    if isinstance(value, tuple):  # torch.Size too
        return {"$tuple": encode_list(list(value), tensor_name, ref_of)}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ArgError("only dicts with string keys can be sent")
        return {"$dict": {k: encode(v, tensor_name, ref_of) for k, v in value.items()}}
    raise ArgError(f"a value of type {type(value).__name__} cannot be used inside a trace")


# -- decoding ------------------------------------------------------------------------------------


def decode_list(
    values: list, resolve: Callable[[int], Any], tensors: dict[str, torch.Tensor], slots: list | None = None
) -> list:
    """`decode` of a list, with references, scalars and plain slices inline.

    With `slots`, a reference at the top level is not resolved: it becomes None in the result and
    (its index, its node id) goes to `slots` — a template the engine fills in at run time."""
    out = []
    for v in values:
        if type(v) is dict and len(v) == 1:
            ref = v.get("$ref")
            if type(ref) is int:
                if slots is None:
                    out.append(resolve(ref))
                else:
                    slots.append((len(out), ref))
                    out.append(None)
                continue
            body = v.get("$slice")  # `plain_slice`, inline: the next commonest argument
            if (
                type(body) is list and len(body) == 3 and type(body[0]) in _JSON_SCALARS
                and type(body[1]) in _JSON_SCALARS and type(body[2]) in _JSON_SCALARS
            ):
                out.append(slice(*body))
            elif type(body := v.get("$tuple")) is list:  # `x[:, -1]`: the index is a tuple
                out.append(tuple(decode_list(body, resolve, tensors)))
            else:
                out.append(decode(v, resolve, tensors))
        elif isinstance(v, (list, dict)):
            out.append(decode(v, resolve, tensors))
        else:
            out.append(v)
    return out


def decode(value: Any, resolve: Callable[[int], Any], tensors: dict[str, torch.Tensor]) -> Any:
    """JSON -> Python value, resolving node references through `resolve`."""
    if isinstance(value, list):
        return decode_list(value, resolve, tensors)
    if not isinstance(value, dict):
        return value
    tag, body = _tag(value)
    if tag == "$ref":
        return resolve(body)
    if tag == "$tensor":
        if body not in tensors:
            raise ArgError(f"tensor blob {body!r} is missing from the request")
        return tensors[body]
    if tag == "$slice":
        return slice(*decode_list(body, resolve, tensors))
    if tag == "$ellipsis":
        return Ellipsis
    if tag == "$tuple":
        return tuple(decode_list(body, resolve, tensors))
    if tag == "$dict":
        return {k: decode(v, resolve, tensors) for k, v in body.items()}
    if tag == "$dtype":
        return WIRE_DTYPES[body]
    return float(body)  # $float, checked by _tag


def no_refs(i: int) -> Any:
    """A `resolve` for values that may not refer to traced values (inputs, forward kwargs)."""
    raise ArgError("this value cannot refer to a value computed in a trace")


# -- walking -------------------------------------------------------------------------------------

# tag -> check of its body. Built once: _tag runs for every tagged object of every node.
_TAG_CHECKS: dict[str, Callable[[Any], bool]] = {
    "$ref": lambda b: isinstance(b, int) and not isinstance(b, bool),
    "$tensor": lambda b: isinstance(b, str),
    "$slice": lambda b: isinstance(b, list) and len(b) == 3,
    "$ellipsis": lambda b: b is None,
    "$tuple": lambda b: isinstance(b, list),
    "$dict": lambda b: isinstance(b, dict),
    "$dtype": lambda b: b in WIRE_DTYPES,
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


def visit(value: Any, fn: Callable[[str, Any], None]) -> None:
    """Call fn(tag, body) for every tagged object inside an encoded value, outer before inner.
    Raises ArgError at the first malformed tag (after fn has seen the ones before it)."""
    if isinstance(value, list):
        for v in value:
            if isinstance(v, (list, dict)):  # scalars hold no tags
                visit(v, fn)
    elif isinstance(value, dict):
        ref = ref_id(value)
        if ref is not None:
            fn("$ref", ref)
            return
        tag, body = _tag(value)
        fn(tag, body)
        if tag in ("$slice", "$tuple"):
            visit(body, fn)
        elif tag == "$dict":
            visit(list(body.values()), fn)


def visit_args(args: list, kwargs: dict, fn: Callable[[str, Any], None]) -> None:
    """`visit` of a node's arguments, with its two most common cases (a reference, a plain slice)
    inline: validation and planning run this for every node of every request."""
    for v in args:
        if type(v) is dict:
            ref = ref_id(v)
            if ref is not None:
                fn("$ref", ref)
            elif plain_slice(v) is None:
                visit(v, fn)
        elif type(v) is list:
            visit(v, fn)
    if kwargs:
        visit(list(kwargs.values()), fn)


def walk(value: Any) -> Iterator[tuple[str, Any]]:
    """(tag, body) of every tagged object inside an encoded value, in `visit` order."""
    found: list[tuple[str, Any]] = []
    visit(value, lambda tag, body: found.append((tag, body)))
    return iter(found)


def refs_in(args: list, kwargs: dict) -> list[int]:
    """The node ids a node's arguments refer to, in order."""
    refs: list[int] = []

    def collect(tag: str, body: Any) -> None:
        if tag == "$ref":
            refs.append(body)

    visit_args(args, kwargs, collect)
    return refs


def blobs_in(value: Any) -> set[str]:
    """The tensor blob names inside an encoded value."""
    names: set[str] = set()

    def collect(tag: str, body: Any) -> None:
        if tag == "$tensor":
            names.add(body)

    visit(value, collect)
    return names
