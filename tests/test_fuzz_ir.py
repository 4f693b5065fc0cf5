"""Property-based fuzz of what a server accepts: request bodies and IR, as an attacker might send.

Whatever the body, the server's path — `decode_session`, `validate_session`, then (if valid) the
engine on a real tiny Llama with a server's bounds — ends in an InterventionError (a clear error for
the client) or a result; never another exception (which a replica would report as its own failure).
`make test` runs a bounded number of examples; `make fuzz` many more (HYPOTHESIS_PROFILE=fuzz).
"""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from intervention import ops
from intervention.errors import InterventionError
from intervention.module_tree import module_paths, module_tree
from intervention.plan import plan_session
from intervention.session import run_segment
from intervention.validate import validate_session
from intervention.wire import SESSION_KEY, decode_session

settings.register_profile("test", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "test"))

PATHS = ["model.layers.0", "model.layers.1.mlp", "model.norm", "lm_head", "model.embed_tokens", "no.such"]
OPS = sorted(ops.ARITY) + ["exec", "__import__", "module.output"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                    st.text(max_size=8))


def tagged(children):
    """The argument codec's tags, well-formed or not."""
    return st.one_of(
        st.builds(lambda i: {"$ref": i}, st.integers(-2, 40)),
        st.builds(lambda b: {"$slice": b}, st.lists(st.one_of(st.none(), st.integers(-9, 9)), max_size=4)),
        st.builds(lambda n: {"$tensor": n}, st.sampled_from(["t0", "t1", "nope"])),
        st.builds(lambda d: {"$dtype": d}, st.sampled_from(["float32", "int64", "float8_e4m3fn", "x"])),
        st.builds(lambda v: {"$tuple": v}, st.lists(children, max_size=3)),
        st.builds(lambda v: {"$dict": v}, st.dictionaries(st.text(max_size=4), children, max_size=2)),
        st.builds(lambda v: {"$float": v}, st.sampled_from(["nan", "inf", "-inf", "1e400", "x"])),
        st.just({"$ellipsis": None}),
        st.dictionaries(st.text(max_size=6), children, max_size=2),
    )


args_values = st.recursive(scalars, lambda children: st.one_of(st.lists(children, max_size=4), tagged(children)),
                           max_leaves=8)


def node_args(op: str):
    if op in ops.MODULE_READS:  # mostly plausible reads, so the engine runs often
        return st.one_of(st.tuples(st.sampled_from(PATHS), st.integers(0, 2)).map(list), st.lists(args_values, max_size=3))
    return st.lists(args_values, max_size=4)


@st.composite
def nodes(draw, n: int):
    out = []
    for i in range(n):
        op = draw(st.sampled_from(OPS))
        out.append({"id": draw(st.one_of(st.just(i), st.integers(-1, n + 2))), "op": op,
                    "args": draw(node_args(op)),
                    "kwargs": draw(st.dictionaries(st.text(max_size=5), args_values, max_size=2)),
                    "invoke": draw(st.one_of(st.none(), st.integers(-1, 2)))})
    return out


index = st.one_of(
    st.integers(-3, 3),
    st.builds(lambda a, b: {"$slice": [a, b, None]}, st.one_of(st.none(), st.integers(-9, 9)), st.one_of(st.none(), st.integers(-9, 9))),
    st.builds(lambda t: {"$tuple": t}, st.lists(st.one_of(st.integers(-2, 2), st.just({"$slice": [None, None, None]}),
                                                           st.just({"$ellipsis": None})), max_size=4)),
)


@st.composite
def plausible_nodes(draw, n: int):
    """Nodes much like a recorder's: reads of real modules, then operations on earlier values."""
    out, values = [], []
    for i in range(n):
        ref = {"$ref": draw(st.sampled_from(values))} if values else None
        kind = draw(st.sampled_from(["read", "read", "getitem", "binary", "method", "setitem", "augassign",
                                     "set_output", "save", "save"])) if ref else "read"
        if kind == "read":
            op, args = draw(st.sampled_from(["module.output", "module.input"])), [draw(st.sampled_from(PATHS)), 0]
        elif kind == "getitem":
            op, args = "getitem", [ref, draw(index)]
        elif kind == "binary":
            op = draw(st.sampled_from(["add", "mul", "sub", "truediv", "matmul", "iadd"]))
            args = [ref, draw(st.one_of(st.floats(-2, 2, allow_nan=False), st.sampled_from([{"$ref": v} for v in values]),
                                        st.just({"$tensor": "t0"})))]
        elif kind == "method":
            name = draw(st.sampled_from(["sum", "mean", "softmax", "argmax", "norm", "reshape", "expand", "new_ones", "view"]))
            op, args = "method", [name, ref, *draw(st.lists(st.integers(-3, 70000), max_size=3))]
        elif kind == "setitem":
            op, args = "setitem", [ref, draw(index), draw(st.one_of(st.floats(-1, 1, allow_nan=False), st.just({"$tensor": "t1"})))]
        elif kind == "augassign":
            op, args = "augassign", [ref, draw(index), draw(st.sampled_from(["iadd", "imul", "isub"])), 0.5]
        elif kind == "set_output":
            op, args = "module.set_output", [draw(st.sampled_from(PATHS)), 0, ref]
        else:
            op, args = "save", [ref]
        out.append({"id": i, "op": op, "args": args, "kwargs": {}, "invoke": None})
        if kind not in ("setitem", "augassign", "set_output", "save"):
            values.append(i)
    return out


@st.composite
def plausible_sessions(draw):
    trace = {"model": "llama", "kind": "forward", "kwargs": {},
             "invokes": [{"input": draw(st.sampled_from(["The Eiffel Tower is in", "a b c d e f g", "x"]))}],
             "nodes": draw(plausible_nodes(draw(st.integers(1, 10))))}
    return {"version": 1, "traces": [trace]}


@st.composite
def sessions(draw):
    n = draw(st.integers(0, 8))
    trace = {
        "model": draw(st.sampled_from(["llama", "other"])),
        "kind": draw(st.sampled_from(["forward", "generate", "backward"])),
        "kwargs": draw(st.dictionaries(st.sampled_from(["max_new_tokens", "use_cache", "x"]), scalars, max_size=2)),
        "invokes": draw(st.lists(st.fixed_dictionaries({"input": st.one_of(
            st.text(max_size=20), st.lists(st.integers(-5, 2000), max_size=6), args_values)}), max_size=2)),
        "nodes": draw(nodes(n)),
    }
    body = {"version": draw(st.sampled_from([1, 1, 1, 2])), "traces": [trace]}
    return draw(st.one_of(st.just(body), st.just({"traces": "x"}), st.just([]), st.just(body | {"extra": 1})))


def blob_tensors(draw_dtype: str) -> dict[str, torch.Tensor]:
    dtype = {"float32": torch.float32, "int64": torch.int64, "uint16": torch.uint16}[draw_dtype]
    return {"t0": torch.ones(2, 64, dtype=dtype), "t1": torch.zeros(3, dtype=dtype)}


@pytest.fixture(scope="module")
def tiny(tiny_llama_path):
    from transformers import AutoModelForCausalLM

    from intervention.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    return model, load_tokenizer(tiny_llama_path), set(module_paths(module_tree(model)))


@given(data=st.binary(max_size=300))
def test_random_bytes_are_a_clear_error(data: bytes) -> None:
    with pytest.raises(InterventionError):
        decode_session(data)


@given(body=st.one_of(sessions(), plausible_sessions(), plausible_sessions()),
       dtype=st.sampled_from(["float32", "float32", "int64", "uint16"]))
def test_random_sessions_end_in_a_result_or_a_clear_error(tiny, body, dtype) -> None:
    model, tokenizer, paths = tiny
    data = safetensors.torch.save(blob_tensors(dtype), metadata={SESSION_KEY: json.dumps(body)})
    try:
        session, tensors = decode_session(data)
        validate_session(session, tensors, {"llama": paths})
    except InterventionError as err:
        event(f"refused: {err.code}")
        return
    event("valid: the engine ran it")
    for segment in plan_session(session).segments:
        outcome = run_segment(model, tokenizer, segment, {}, tensors, on_log=lambda m: None,
                              max_trace_bytes=64 * 2**20, max_saved_bytes=64 * 2**20)
        assert outcome.error is None or isinstance(outcome.error, InterventionError)
        event(f"engine: {outcome.error.code if outcome.error else 'result'}")
