"""Bytes on the wire: one safetensors file per message, the JSON structure in its metadata.

A request is a safetensors file whose tensors are the client's blobs (steering vectors, patches)
and whose metadata key "raysight.session" holds the session IR as JSON. A result is the same
shape: saved tensors as tensors, and "raysight.result" holds the JSON that places them. safetensors
is a plain format (a JSON header, then raw bytes): nothing is pickled in either direction.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import safetensors.torch
import torch
from transformers.utils import ModelOutput

from intervention import args as argcodec
from intervention.errors import ValidationError
from intervention.ir import SessionIR, session_from_json, session_to_json

SESSION_KEY = "raysight.session"
RESULT_KEY = "raysight.result"


def encode_session(session: SessionIR, tensors: dict[str, torch.Tensor]) -> bytes:
    return _pack(tensors, {SESSION_KEY: session_to_json(session)})


def decode_session(data: bytes) -> tuple[SessionIR, dict[str, torch.Tensor]]:
    """Parse a request body. Raises ValidationError on anything malformed."""
    try:
        meta = read_metadata(data)
        session = session_from_json(meta[SESSION_KEY])
        tensors = safetensors.torch.load(data)
    except ValidationError:
        raise
    except KeyError:
        raise ValidationError(f"the request has no '{SESSION_KEY}' metadata") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure is the client's malformed body
        raise ValidationError(f"malformed request: {_short(exc)}") from None
    return session, tensors


def encode_result(saves: dict[int, Any], info: dict[str, Any] | None = None) -> bytes:
    """Saved values (node id -> value) -> bytes. Tensors travel raw; the rest as tagged JSON."""
    tensors: dict[str, torch.Tensor] = {}

    def store(t: torch.Tensor) -> str:
        name = f"r{len(tensors)}"
        tensors[name] = t.detach().contiguous()
        return name

    values = {str(k): argcodec.encode(_plain(v), store, lambda v: None) for k, v in saves.items()}
    return _pack(tensors, {RESULT_KEY: json.dumps({"values": values, **(info or {})}, separators=(",", ":"))})


def decode_result(data: bytes) -> tuple[dict[int, Any], dict[str, Any]]:
    body = json.loads(read_metadata(data)[RESULT_KEY])
    tensors = safetensors.torch.load(data)
    values = {int(k): _restore(argcodec.decode(v, argcodec.no_refs, tensors)) for k, v in body.pop("values").items()}
    return values, body


def read_metadata(data: bytes) -> dict[str, str]:
    """The metadata of a safetensors file, without touching its tensors."""
    if len(data) < 8:
        raise ValueError("too short to be a safetensors message")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("the header length exceeds the message")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})


def _pack(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    # safetensors refuses non-contiguous tensors (transposes, strided slices).
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    try:
        return safetensors.torch.save(tensors, metadata=metadata)
    except RuntimeError:  # tensors sharing storage: give each its own
        return safetensors.torch.save({k: v.clone() for k, v in tensors.items()}, metadata=metadata)


# A saved model output (`tracer.result` of a trace) travels as a dict of its tensor fields plus its
# class name, and comes back as that class: only transformers' own output dataclasses, by name.
OUTPUT_KEY = "raysight.model_output"


def _plain(value: Any) -> Any:
    """Values the wire can carry: model outputs become dicts of their tensor fields."""
    if isinstance(value, ModelOutput):
        fields = {k: _plain(v) for k, v in value.items() if isinstance(v, (torch.Tensor, tuple))}
        return {**fields, OUTPUT_KEY: type(value).__name__}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value) if type(value) in (list, tuple) else tuple(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _restore(value: Any) -> Any:
    """Model outputs back into their transformers class (see `_plain`); anything else as is."""
    if isinstance(value, dict):
        if type(value.get(OUTPUT_KEY)) is str:
            import transformers.modeling_outputs as outputs

            fields = {k: _restore(v) for k, v in value.items() if k != OUTPUT_KEY}
            cls = getattr(outputs, value[OUTPUT_KEY], None)
            if isinstance(cls, type) and issubclass(cls, ModelOutput) and set(fields) <= set(cls.__dataclass_fields__):
                return cls(**fields)
            return fields
        return {k: _restore(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_restore(v) for v in value)
    return value


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]


def merge_results(parts: list[bytes], info: dict[str, Any] | None = None) -> bytes:
    """One result message from the per-trace ones a session produced."""
    values: dict[int, Any] = {}
    for part in parts:
        values.update(decode_result(part)[0])
    return encode_result(values, info)
