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
