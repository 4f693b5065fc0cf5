"""A trace cannot make the engine allocate unbounded memory from its arguments alone.

Factory calls without traced arguments run on the client, so the server-side guard is checked
with IR built directly (as a hostile client would send it), and with traced methods via the SDK.
"""

import pytest
import torch

from client_sdk import ExecutionError, LanguageModel
from intervention.engine import run_trace
from intervention.ir import Invoke, Node, TraceIR


@pytest.fixture(scope="module")
def model(tiny_llama_path):
    return LanguageModel(str(tiny_llama_path))


@pytest.mark.parametrize(
    "args",
    [["torch.zeros", 10**12], ["torch.full", {"$tuple": [10**6, 10**6]}, 1.0], ["torch.arange", 0, 10**11]],
)
def test_oversized_factory_calls_in_the_ir_are_refused(model, args):
    loc = ("hostile.py", 7, "x = torch.zeros(...)")
    trace = TraceIR(model="m", invokes=[Invoke(input="The Eiffel Tower")], nodes=[Node(id=0, op="function", args=args, loc=loc)])
    with pytest.raises(ExecutionError) as info:
        run_trace(model.local_module, trace, model.tokenizer)
    assert "the limit is" in str(info.value) and "hostile.py" in str(info.value)


@pytest.mark.parametrize(
    "make", [lambda h: h.new_zeros((10**5, 10**5)), lambda h: h.repeat(10**4, 10**4, 10)]
)
def test_oversized_traced_allocations_are_refused_at_the_users_line(model, make):
    with pytest.raises(ExecutionError) as info, model.trace("The Eiffel Tower"):
        h = model.model.layers[0].output
        make(h).save()
    assert "the limit is" in str(info.value)
    assert __file__ in str(info.value)


def test_small_allocations_still_work(model):
    with model.trace("The Eiffel Tower"):
        h = model.model.layers[0].output
        z = (torch.zeros(64) + h[0, -1]).save()
        r = h.repeat(2, 1, 1).save()
    assert z.shape == (64,) and r.shape[0] == 2


# -- issue 9: the ways around the per-op cap, and the memory budget of a trace ---------------------

N = 10**10  # elements: 40 GB of float32 if it were ever allocated
LOC = ("hostile.py", 9, "x = ...")


def _hostile(model, nodes) -> None:
    """Run IR built by hand (as a hostile client would send it) and expect the cap's error."""
    trace = TraceIR(model="m", invokes=[Invoke(input="The Eiffel Tower")],
                    nodes=[Node(id=i, op=op, args=args, kwargs=kw, loc=LOC) for i, (op, args, kw) in enumerate(nodes)])
    with pytest.raises(ExecutionError) as info:
        run_trace(model.local_module, trace, model.tokenizer)
    assert "the limit is" in str(info.value) and info.value.location[:2] == ("hostile.py", 9), str(info.value)


H = ("module.output", ["model.layers.0", 0], {})  # node 0: a (1, n, 64) hidden state
SCALAR = ("function", ["torch.tensor", 100_000], {})  # a 0-d tensor holding a size


@pytest.mark.parametrize(
    "nodes",
    [
        [("function", ["torch.arange", 0], {"end": N})],
        [("function", ["torch.eye"], {"n": 10**6})],
        [("function", ["torch.linspace", 0, 1], {"steps": N})],
        [SCALAR, ("function", ["torch.zeros", {"$ref": 0}, {"$ref": 0}], {})],
        [SCALAR, ("function", ["torch.full", {"$tuple": [{"$ref": 0}, {"$ref": 0}]}, 1.0], {})],
        [H, ("method", ["unsqueeze", {"$ref": 0}, 1], {}), ("method", ["expand", {"$ref": 1}, -1, N, -1, -1], {})],
        [H, ("method", ["reshape", {"$ref": 0}, -1], {}), ("method", ["repeat", {"$ref": 1}, 10**8], {})],
        [SCALAR, ("method", ["new_zeros", {"$ref": 0}, {"$tuple": [{"$ref": 0}, {"$ref": 0}]}], {})],
        [("function", ["torch.ones", 10**6], {}), ("function", ["torch.outer", {"$ref": 0}, {"$ref": 0}], {})],
        [("function", ["torch.ones", 10**6], {}),
         ("function", ["torch.einsum", "i,j->ij", {"$ref": 0}, {"$ref": 0}], {})],
        [("function", ["torch.ones", 10**6, 1], {}), ("function", ["torch.ones", 1, 10**6], {}),
         ("matmul", [{"$ref": 0}, {"$ref": 1}], {})],
        [("function", ["torch.ones", 10**6, 1], {}), ("function", ["torch.ones", 1, 10**6], {}),
         ("mul", [{"$ref": 0}, {"$ref": 1}], {})],
        [("function", ["torch.tensor", [1, 2]], {}),
         ("function", ["torch.nn.functional.one_hot", {"$ref": 0}], {"num_classes": N})],
        [("function", ["torch.tensor", [1, 10**9]], {}),
         ("function", ["torch.nn.functional.one_hot", {"$ref": 0}], {})],
        [H, ("function", ["torch.nn.functional.pad", {"$ref": 0}, [0, N]], {})],
        [("function", ["torch.ones", 10**6], {}), ("function", ["torch.diag", {"$ref": 0}], {})],
    ],
    ids=["arange-end-kw", "eye-n-kw", "linspace-steps-kw", "zeros-0d-sizes", "full-0d-sizes",
         "expand-minus-one", "repeat-flat", "new_zeros-0d", "outer", "einsum", "matmul-operator",
         "broadcast-mul", "one_hot-num_classes", "one_hot-implicit", "pad", "diag"],
)
def test_every_way_around_the_allocation_cap_is_refused_before_allocating(model, nodes):
    _hostile(model, nodes)


def test_expand_then_contiguous_is_refused_at_the_expand(model):
    with pytest.raises(ExecutionError) as info, model.trace("The Eiffel Tower"):
        h = model.model.layers[0].output
        h[:, :1].expand(-1, 10**8, -1).contiguous().save()
    assert "the limit is" in str(info.value) and __file__ in str(info.value)


def _program(model, body, **kwargs):
    from client_sdk import tracing
    from intervention.engine import run_forward
    from intervention.program import Program

    with tracing.recording() as graph:
        body()
    (trace,) = graph.session_ir().traces
    program = Program(trace, tensors=graph.tensors, **kwargs)
    with torch.no_grad():
        run_forward(model.local_module, model.tokenizer, [program])
    return program.result()


def test_the_total_a_trace_holds_is_bounded_at_the_line_that_crossed_it(model):
    def body():
        with model.trace("The Eiffel Tower"):
            h = model.model.layers[0].output
            kept = [h.new_ones(256, 1024) for _ in range(3)]  # 1 MiB each, all held
            (kept[0] + kept[1] + kept[2]).sum().save()

    ok = _program(model, body, max_bytes=8 * 2**20)
    assert ok.error is None
    small = _program(model, body, max_bytes=2 * 2**20 + 2**19)  # the third 1 MiB crosses 2.5 MiB
    err = small.error
    assert isinstance(err, ExecutionError) and err.code == "memory_limit", err
    assert "limit of 2,621,440 bytes" in err.message
    assert err.location[0] == __file__


def test_views_and_in_place_edits_hold_nothing_new(model):
    def body():
        with model.trace("The Eiffel Tower"):
            h = model.model.layers[0].output
            x = h.new_ones(256, 1024)  # 1 MiB
            for _ in range(50):
                x[0] += 1  # in place
                x = x.view(1024, 256).view(256, 1024)  # views
            x.sum().save()

    assert _program(model, body, max_bytes=2 * 2**20).error is None
