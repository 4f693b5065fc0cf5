"""The wire format: sessions and results survive encode -> decode exactly, and nothing is pickled."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import safetensors.torch
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from intervention import ops
from intervention.errors import ValidationError
from intervention.ir import Invoke, Node, SessionIR, TraceIR, session_to_json
from intervention.wire import (
    RESULT_KEY,
    SESSION_KEY,
    decode_result,
    decode_session,
    encode_result,
    encode_session,
    read_metadata,
)

LOC = ("/home/me/experiment.py", 12, "h = model.model.layers[0].output")

# Every tag of args.py, nested inside each other so that the walk has to recurse.
ALL_TAGS = {
    "$tuple": [
        {"$ref": 0},
        {"$tensor": "steer"},
        {"$slice": [None, {"$float": "-inf"}, 2]},
        {"$ellipsis": None},
        {"$dict": {"k": {"$dtype": "bfloat16"}, "nan": {"$float": "nan"}, "inf": {"$float": "inf"}}},
        [1, 2.5, "text", True, None],
    ]
}


def _args_for(op: str) -> list:
    """Arguments of the right arity for `op`, using every tag somewhere."""
    lo, hi = ops.ARITY[op]
    if op.startswith("module."):
        first = ["model.layers.0", 0] if op != "module.call" else ["model.norm"]
        extra = [{"$ref": 0}] if op.startswith("module.set_") else []
        return first + extra if op != "module.call" else first + [{"$ref": 0}, ALL_TAGS]
    if op == "stop":
        return ["trace"]
    if op == "method":
        return ["to", {"$ref": 0}, {"$dtype": "float16"}]
    if op == "function":
        return ["torch.cat", [{"$ref": 0}, {"$tensor": "steer"}]]
    if op == "getattr":
        return [{"$ref": 0}, "shape"]
    if op == "log":
        return ["value:", ALL_TAGS]
    args = [{"$ref": 0}, ALL_TAGS, {"$slice": [1, None, None]}]
    return args[: hi if hi is not None else lo]


def _session() -> tuple[SessionIR, dict[str, torch.Tensor]]:
    nodes = [Node(id=0, op="module.output", args=["model.layers.0", 0], loc=LOC)]
    for i, op in enumerate(sorted(ops.ARITY), start=1):
        kwargs = {"dim": -1, "dtype": {"$dtype": "float32"}} if op == "function" else {}
        nodes.append(Node(id=i, op=op, args=_args_for(op), kwargs=kwargs, invoke=i % 2, loc=LOC))
    trace1 = TraceIR(
        model="tiny-llama",
        invokes=[Invoke(input="The Eiffel Tower"), Invoke(input={"$tensor": "ids"})],
        kwargs={"output_hidden_states": True},
        nodes=nodes,
        loc=LOC,
    )
    # A second trace on another model that refers to a value of the first.
    trace2 = TraceIR(
        model="tiny-gpt2",
        invokes=[Invoke(input=[[5, 6, 7], [8, 9, 10]])],
        nodes=[Node(id=len(nodes), op="module.set_output", args=["transformer.h.1", 0, {"$ref": 0}])],
    )
    tensors = {
        "steer": torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0)),
        "ids": torch.tensor([[1, 2, 3]], dtype=torch.int64),
        "half": torch.tensor([1.5, -0.0, float("nan"), float("inf")], dtype=torch.float16),
        "bf16": torch.tensor([3.140625, -2.0], dtype=torch.bfloat16),
        "mask": torch.tensor([True, False]),
        "scalar": torch.tensor(7, dtype=torch.int32),
    }
    return SessionIR(traces=[trace1, trace2]), tensors


def _bits(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor: equal bits, NaN payloads and -0.0 included."""
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.dim() else t.reshape(1).view(
        torch.uint8
    ).numpy().tobytes()


def test_session_round_trip_covers_every_op_and_tag() -> None:
    session, tensors = _session()
    used_ops = {n.op for t in session.traces for n in t.nodes}
    assert used_ops == set(ops.ARITY), "the session must exercise every whitelisted op"
    text = session_to_json(session)
    for tag in ("$ref", "$tensor", "$slice", "$ellipsis", "$tuple", "$dict", "$dtype", "$float"):
        assert f'"{tag}"' in text

    decoded, blobs = decode_session(encode_session(session, tensors))

    assert decoded == session
    assert decoded.traces[0].nodes[1].loc == LOC  # locations survive as (file, line, code)
    assert set(blobs) == set(tensors)
    for name, t in tensors.items():
        assert blobs[name].dtype == t.dtype and blobs[name].shape == t.shape, name
        assert _bits(blobs[name]) == _bits(t), name


def test_session_with_views_and_non_contiguous_tensors() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"a": base[1:3], "b": base[:, ::2], "c": base.t(), "d": base}
    session = SessionIR(traces=[TraceIR(model="m", invokes=[Invoke(input="x")])])
    _, blobs = decode_session(encode_session(session, tensors))
    for name, t in tensors.items():
        assert torch.equal(blobs[name], t), name


def test_result_round_trip() -> None:
    logits = torch.randn(1, 4, 803, generator=torch.Generator().manual_seed(1))
    saves = {
        3: logits,
        4: torch.tensor([[351, 605]]),
        5: 2.5,
        6: float("-inf"),
        7: (torch.ones(2, dtype=torch.bfloat16), [1, "two", None]),
        8: {"first": torch.zeros(3, dtype=torch.int8), "n": 4},
        9: torch.Size([1, 4, 64]),
        10: True,
        11: logits[0, -1],  # a view into another saved tensor
    }
    values, info = decode_result(encode_result(saves, {"stopped": "trace", "traces_run": 2}))
    assert info == {"stopped": "trace", "traces_run": 2}
    assert set(values) == set(saves)
    assert torch.equal(values[3], logits) and torch.equal(values[4], saves[4])
    assert values[5] == 2.5 and values[6] == float("-inf") and values[10] is True
    assert torch.equal(values[7][0], saves[7][0]) and values[7][1] == [1, "two", None]
    assert torch.equal(values[8]["first"], saves[8]["first"]) and values[8]["n"] == 4
    assert tuple(values[9]) == (1, 4, 64)
    assert torch.equal(values[11], logits[0, -1])


def test_result_model_output_becomes_a_dict_of_tensors() -> None:
    out = CausalLMOutputWithPast(logits=torch.randn(1, 2, 5))
    values, _ = decode_result(encode_result({0: out}))
    assert set(values[0]) == {"logits"}
    assert torch.equal(values[0]["logits"], out.logits)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 7,
        b"not a safetensors file at all",
        struct.pack("<Q", 10**9) + b"{}",  # header longer than the message
        struct.pack("<Q", 5) + b"{{{{{",  # header is not JSON
        pickle.dumps({"version": 1}),  # a pickle is never accepted
    ],
    ids=["empty", "short", "text", "huge-header", "bad-json", "pickle"],
)
def test_malformed_bytes_are_validation_errors(data: bytes) -> None:
    with pytest.raises(ValidationError):
        decode_session(data)


def test_malformed_contents_are_validation_errors() -> None:
    session, tensors = _session()
    good = encode_session(session, tensors)

    no_session = safetensors.torch.save({"x": torch.ones(1)}, metadata={"other": "1"})
    with pytest.raises(ValidationError, match=SESSION_KEY):
        decode_session(no_session)

    bad_ir = safetensors.torch.save({}, metadata={SESSION_KEY: '{"traces": [{"nodes": 3}]}'})
    with pytest.raises(ValidationError):
        decode_session(bad_ir)

    extra = json.loads(session_to_json(session))
    extra["traces"][0]["nodes"][0]["code_to_run"] = "import os"  # unknown fields are refused
    with pytest.raises(ValidationError):
        decode_session(safetensors.torch.save({}, metadata={SESSION_KEY: json.dumps(extra)}))

    with pytest.raises(ValidationError):
        decode_session(good[: len(good) - 10])  # tensor bytes cut off

    n = struct.unpack("<Q", good[:8])[0]
    header = good[8 : 8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1)
    assert header != good[8 : 8 + n]
    with pytest.raises(ValidationError):  # a header whose tensor offsets lie
        decode_session(good[:8] + header + good[8 + n :])


def test_messages_are_plain_safetensors_without_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """A message is a safetensors file: 8-byte length, a JSON header, raw bytes. No pickle at all."""

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle must never be used on the wire")

    for mod, name in ((pickle, "loads"), (pickle, "dumps"), (pickle, "load"), (pickle, "dump"),
                      (torch, "load"), (torch, "save")):
        monkeypatch.setattr(mod, name, forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)

    session, tensors = _session()
    request = encode_session(session, tensors)
    decoded, _ = decode_session(request)
    result = encode_result({1: tensors["steer"], 2: (3, 4.5)})
    values, _ = decode_result(result)
    assert decoded == session and torch.equal(values[1], tensors["steer"])

    for data, key in ((request, SESSION_KEY), (result, RESULT_KEY)):
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])  # the whole header is JSON
        assert json.loads(header["__metadata__"][key])  # and so is the IR / result inside it
        assert read_metadata(data) == header["__metadata__"]
        # Not a pickle stream (PROTO opcode 0x80 + protocol 2-5). The first byte alone proves
        # nothing: it is the low byte of the header length, which may well be 0x80.
        assert data[:2] not in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
        # The safetensors library itself parses it (it refuses anything else).
        assert set(safetensors.torch.load(data)) == {k for k in header if k != "__metadata__"}

