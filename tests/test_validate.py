"""Static validation: everything invalid is refused before a model runs, at the node's location."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from client_sdk import LanguageModel
from client_sdk.local import LocalBackend
from intervention.errors import ValidationError
from intervention.ir import Invoke, Node, SessionIR, TraceIR
from intervention.module_tree import module_paths
from intervention.validate import InputBounds, Limits, validate_session
from intervention.wire import decode_session, encode_session

PATHS = {"", "model", "model.layers", "model.layers.0", "model.layers.1", "model.norm", "lm_head"}
MODELS = {"tiny": PATHS}
TRACE_LOC = ("/home/me/exp.py", 3, "with model.trace(prompt):")
BAD_LOC = ("/home/me/exp.py", 7, "the offending statement")
DEFAULT = Limits()


def _read(i: int = 0, path: str = "model.layers.0") -> Node:
    return Node(id=i, op="module.output", args=[path, 0], loc=("/home/me/exp.py", 4, "read"))


def _session(*bad: Node, model: str = "tiny", **trace) -> SessionIR:
    """A valid trace (read layer 0, take its last token) followed by the nodes under test."""
    nodes = [_read(0), Node(id=1, op="getitem", args=[{"$ref": 0}, {"$ellipsis": None}])]
    trace = {"invokes": [Invoke(input="hello")], "loc": TRACE_LOC, **trace}
    return SessionIR(traces=[TraceIR(model=model, nodes=[*nodes, *bad], **trace)])


def _node(op: str, *args, **kwargs) -> Node:
    return Node(id=10, op=op, args=list(args), kwargs=kwargs, loc=BAD_LOC)


def _refused(session: SessionIR, code: str, tensors=None, limits: Limits = DEFAULT, loc=BAD_LOC):
    with pytest.raises(ValidationError) as info:
        validate_session(session, tensors or {}, MODELS, limits)
    err = info.value
    assert err.code == code, err
    assert err.location == (tuple(loc) if loc else None), err
    if loc:
        assert f'File "{loc[0]}", line {loc[1]}' in str(err)
    return err


def test_a_valid_session_passes() -> None:
    steer = torch.ones(64)
    nodes = [
        replace(_node("add", {"$ref": 1}, {"$tensor": "steer"}), id=2),
        Node(id=3, op="module.set_output", args=["model.layers.1", 0, {"$ref": 2}]),
        Node(id=4, op="method", args=["to", {"$ref": 3}, {"$dtype": "float16"}]),
        Node(id=5, op="method", args=["softmax", {"$ref": 1}], kwargs={"dim": -1}),
        Node(id=6, op="function", args=["torch.nn.functional.softmax", {"$ref": 1}], kwargs={"dim": -1}),
        Node(id=7, op="module.call", args=["lm_head", {"$ref": 1}]),
        Node(id=8, op="save", args=[{"$ref": 7}]),
        Node(id=9, op="stop", args=["session"]),
    ]
    validate_session(_session(*nodes), {"steer": steer}, MODELS)


def test_unknown_op() -> None:
    err = _refused(_session(_node("eval", "print(1)")), "unknown_op")
    assert "'eval'" in err.message


@pytest.mark.parametrize(
    "op,args",
    [
        ("getitem", [{"$ref": 1}]),
        ("add", [{"$ref": 1}, 1, 2]),
        ("module.output", ["model.layers.0"]),
        ("module.set_output", ["model.layers.0", 0]),
        ("save", []),
        ("neg", []),
        ("method", ["sum"]),
    ],
)
def test_bad_arity(op: str, args: list) -> None:
    err = _refused(_session(_node(op, *args)), "invalid_request")
    assert f"got {len(args)}" in err.message


def test_unknown_model() -> None:
    err = _refused(_session(model="gpt-5"), "unknown_model", loc=TRACE_LOC)
    assert "gpt-5" in err.message and "tiny" in err.message  # names the models that are served


@pytest.mark.parametrize("path", ["model.layers.7", "model.layers.0.mlp", "transformer", 3])
def test_unknown_module_path(path) -> None:
    _refused(_session(_node("module.output", path, 0)), "unknown_module")
    _refused(_session(_node("module.call", path, {"$ref": 1})), "unknown_module")


def test_bad_call_index() -> None:
    _refused(_session(_node("module.output", "model.layers.0", -1)), "invalid_request")
    _refused(_session(_node("module.input", "model.layers.0", "0")), "invalid_request")


@pytest.mark.parametrize(
    "arg",
    [
        {"$ref": 10},  # itself
        {"$ref": 11},  # a later node
        {"$ref": 99},  # nothing
        {"$slice": [None, {"$ref": 50}, None]},  # nested inside another tag
        {"$dict": {"x": [{"$tuple": [{"$ref": 12}]}]}},
    ],
)
def test_forward_reference(arg) -> None:
    later = Node(id=11, op="neg", args=[{"$ref": 1}])
    _refused(_session(_node("add", {"$ref": 1}, arg), later), "invalid_request")


def test_forward_reference_in_kwargs_and_across_traces() -> None:
    _refused(_session(_node("method", "sum", {"$ref": 1}, dim={"$ref": 42})), "invalid_request")
    # A trace may use values of earlier traces, never of later ones.
    first = _session().traces[0]
    uses_later = TraceIR(model="tiny", invokes=[Invoke(input="a")], nodes=[_node("neg", {"$ref": 20})])
    later = TraceIR(model="tiny", invokes=[Invoke(input="b")], nodes=[Node(id=20, op="module.output",
                                                                           args=["lm_head", 0])])
    _refused(SessionIR(traces=[first, uses_later, later]), "invalid_request")
    ok = TraceIR(model="tiny", invokes=[Invoke(input="a")], nodes=[_node("neg", {"$ref": 1})])
    validate_session(SessionIR(traces=[first, ok]), {}, MODELS)


def test_duplicate_node_id() -> None:
    _refused(_session(_node("neg", {"$ref": 1}), _node("neg", {"$ref": 1})), "invalid_request")


def test_input_may_not_refer_to_traced_values() -> None:
    session = _session(invokes=[Invoke(input={"$ref": 0})])
    _refused(session, "invalid_request", loc=TRACE_LOC)


def test_dangling_tensor_blob() -> None:
    err = _refused(_session(_node("add", {"$ref": 1}, {"$tensor": "steer"})), "invalid_request")
    assert "steer" in err.message
    _refused(_session(invokes=[Invoke(input={"$tensor": "ids"})]), "invalid_request", loc=TRACE_LOC)


@pytest.mark.parametrize("name", ["cuda", "numpy", "cpu", "backward", "pin_memory", "share_memory_",
                                  "__reduce_ex__", "data_ptr", "storage", "register_hook"])
def test_method_not_whitelisted(name: str) -> None:
    err = _refused(_session(_node("method", name, {"$ref": 1})), "unsupported_call")
    assert name in err.message


@pytest.mark.parametrize("name", ["torch.load", "torch.save", "os.system", "builtins.eval",
                                  "torch.Tensor.cuda", "torch.from_file"])
def test_function_not_whitelisted(name: str) -> None:
    _refused(_session(_node("function", name, {"$ref": 1})), "unsupported_call")


@pytest.mark.parametrize(
    "op,args,kwargs",
    [
        ("function", ["torch.zeros_like", {"$ref": 1}], {"device": "cuda"}),
        ("function", ["torch.zeros", 3], {"device": "cuda:0"}),
        ("function", ["torch.add", {"$ref": 1}, 1], {"out": {"$ref": 1}}),
        ("method", ["new_zeros", {"$ref": 1}, 3], {"device": "cuda"}),
        ("method", ["to", {"$ref": 1}], {"device": "cuda"}),
        ("method", ["to", {"$ref": 1}], {"dtype": {"$dtype": "float16"}, "non_blocking": True}),
    ],
)
def test_forbidden_kwargs(op: str, args: list, kwargs: dict) -> None:
    _refused(_session(_node(op, *args, **kwargs)), "unsupported_call")


@pytest.mark.parametrize("target", ["cuda", "cuda:1", "cpu", "meta", {"$ref": 0}, 0])
def test_to_device_is_refused(target) -> None:
    err = _refused(_session(_node("method", "to", {"$ref": 1}, target)), "unsupported_call")
    assert "dtype" in err.message
    validate_session(_session(_node("method", "to", {"$ref": 1}, {"$dtype": "float16"})), {}, MODELS)


def test_private_attributes_are_refused() -> None:
    _refused(_session(_node("getattr", {"$ref": 1}, "__class__")), "invalid_request")
    _refused(_session(_node("getattr", {"$ref": 1}, "_base")), "invalid_request")
    _refused(_session(_node("getattr", {"$ref": 1}, 3)), "invalid_request")


def test_bad_stop_scope_and_save_of_a_literal() -> None:
    _refused(_session(_node("stop", "process")), "invalid_request")
    _refused(_session(_node("save", 3)), "invalid_request")


def test_malformed_tags() -> None:
    _refused(_session(_node("add", {"$ref": 1}, {"$code": "import os"})), "invalid_request")
    _refused(_session(_node("add", {"$ref": 1}, {"$ref": 0, "$tensor": "x"})), "invalid_request")
    _refused(_session(_node("method", "to", {"$ref": 1}, {"$dtype": "object"})), "invalid_request")
    _refused(_session(_node("add", {"$ref": 1}, {"$float": "1e400"})), "invalid_request")


def test_forward_kwargs_whitelist() -> None:
    _refused(_session(kwargs={"labels": [1, 2]}), "invalid_request", loc=TRACE_LOC)


def test_node_of_an_invoke_that_does_not_exist() -> None:
    bad = replace(_node("neg", {"$ref": 1}), invoke=3)
    _refused(_session(bad), "invalid_request")


def test_limits() -> None:
    many = [Node(id=i, op="neg", args=[{"$ref": 1}]) for i in range(2, 30)]
    _refused(_session(*many), "too_large", limits=Limits(max_nodes=20), loc=None)
    big = {"t": torch.zeros(1024, dtype=torch.float32)}
    _refused(_session(), "too_large", tensors=big, limits=Limits(max_tensor_bytes=4095), loc=None)
    validate_session(_session(), big, MODELS, Limits(max_tensor_bytes=4096))
    traces = _session().traces * 3
    _refused(SessionIR(traces=traces), "too_large", limits=Limits(max_traces=2), loc=None)


def test_bad_version_and_empty_session() -> None:
    err = _refused(replace(_session(), version=99), "invalid_request", loc=None)
    assert "99" in err.message
    _refused(SessionIR(traces=[]), "invalid_request", loc=None)


def test_sdk_sessions_validate_after_a_wire_round_trip(tiny_llama_path: Path) -> None:
    """What the SDK records is valid IR, also after encoding; run_local validates before running."""
    from client_sdk import tracing

    model = LanguageModel(str(tiny_llama_path))
    steer = torch.ones(64)
    with tracing.recording() as graph, model.trace("The Eiffel Tower is in the city of"):
        h = model.model.layers[1].output
        model.model.layers[2].output = h + steer
        model.lm_head(model.model.norm(h[:, -1])).softmax(dim=-1).save()
    session, tensors = decode_session(encode_session(graph.session_ir(), graph.tensors))
    paths = set(module_paths(model.module_tree))
    validate_session(session, tensors, {model.name: paths})

    # The local runner refuses an invalid session before the model runs. (The IR is edited by
    # hand after recording, so the steps compiled while it was recorded are dropped: the run
    # compiles the edited IR.)
    graph.traces[0].nodes[0].args[0] = "model.layers.9"
    (graph.recordings or {}).clear()
    with pytest.raises(ValidationError) as info:
        LocalBackend().run(graph)
    assert info.value.code == "unknown_module"
    assert info.value.location[0] == __file__


# -- inputs that fit the model, tensor dtypes the server takes (issue 9) ---------------------------

BOUNDS = {"tiny": InputBounds(vocab_size=1000, context=16, count_tokens=lambda s: len(s.split()))}


def _inputs_refused(value, tensors=None) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        validate_session(_session(invokes=[Invoke(input=value)]), tensors or {}, MODELS, inputs=BOUNDS)
    assert info.value.code == "invalid_input" and info.value.location == TRACE_LOC, info.value
    return info.value


@pytest.mark.parametrize("ids", [[2**70], [5, -1], [[1, 2], [3, 1000]]])
def test_token_ids_outside_the_vocabulary_are_refused(ids) -> None:
    assert "outside the model's vocabulary (0..999)" in _inputs_refused(ids).message


def test_inputs_longer_than_the_context_are_refused() -> None:
    assert "17 tokens" in _inputs_refused([1] * 17).message
    assert "17 tokens" in _inputs_refused(" ".join(["word"] * 17)).message
    assert "17 tokens" in _inputs_refused({"$tensor": "ids"}, {"ids": torch.ones(2, 17, dtype=torch.long)}).message
    # at the limit, and short prompts (not even counted), pass
    validate_session(_session(invokes=[Invoke(input=[1] * 16), Invoke(input="a b c")]), {}, MODELS, inputs=BOUNDS)


def test_token_id_tensors_must_be_integers() -> None:
    err = _inputs_refused({"$tensor": "ids"}, {"ids": torch.ones(1, 3)})
    assert "integer token ids, not float32" in err.message


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.uint16, torch.uint32])
def test_tensor_blobs_of_dtypes_the_server_does_not_take_are_refused(dtype) -> None:
    with pytest.raises(ValidationError) as info:
        validate_session(_session(), {"t0": torch.zeros(2, dtype=dtype)}, MODELS)
    assert info.value.code == "unsupported_dtype"
    assert str(dtype).removeprefix("torch.") in info.value.message and "'t0'" in info.value.message
