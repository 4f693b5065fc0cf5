"""Dtype names: the one table both sides use (plain strings, so importing it costs nothing).

`WIRE_DTYPE_NAMES`: the torch dtypes a node argument may name (`{"$dtype": "float32"}`) and a
client tensor blob may have. `MODEL_DTYPES`: what a served model may be loaded in ("auto": the
checkpoint's own dtype).
"""

from __future__ import annotations

WIRE_DTYPE_NAMES: tuple[str, ...] = (
    "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
    "uint8", "bool", "complex64",
)

MODEL_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "auto")
