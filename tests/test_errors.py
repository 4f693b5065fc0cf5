"""Every error names the user's file and line, and leaves the model as it found it.

Lines are found by the `# @name` marker at the end of the statement that should be blamed.
After every test the model must still work, carry no hooks, and grad mode must be unchanged.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import pytest
import torch

import client_sdk
from client_sdk import (
    ExecutionError,
    InterventionError,
    LanguageModel,
    TracingError,
    ValidationError,
)
from intervention.engine import run_trace
from intervention.ir import Invoke, Node, TraceIR

P = "The Eiffel Tower is in the city of"


@cache
def line(tag: str) -> int:
    """The line of this file that ends with `# @tag`."""
    with open(__file__) as f:
        hits = [i for i, text in enumerate(f, start=1) if text.rstrip().endswith(f"# @{tag}")]
    assert len(hits) == 1, tag
    return hits[0]


def assert_at(exc: BaseException, tag: str) -> None:
    text = str(exc)
    assert f'File "{__file__}", line {line(tag)}' in text, text


@pytest.fixture(scope="module")
def model(tiny_llama_path: Path) -> LanguageModel:
    return LanguageModel(str(tiny_llama_path))


@pytest.fixture(scope="module")
def clean_logits(model: LanguageModel) -> torch.Tensor:
    with model.trace(P):
        logits = model.lm_head.output.save()
    return logits


@pytest.fixture(autouse=True)
def model_still_works(model: LanguageModel, clean_logits: torch.Tensor) -> Iterator[None]:
    with watch_activations(model.local_module) as refs:
        yield
    assert_freed(refs, allow_empty=True)
    assert torch.is_grad_enabled(), "grad mode changed"
    assert client_sdk.tracing.current_graph() is None, "a trace is still open"
    hf = model.local_module
    for name, m in hf.named_modules():
        hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
        # transformers keeps its own output-capturing hooks once output_hidden_states was used
        ours = [h for h in hooks if not getattr(h, "__module__", "").startswith("transformers.")]
        assert not ours, f"hook left on {name!r}"
    with model.trace(P):
        logits = model.lm_head.output.save()
    assert torch.equal(logits, clean_logits)


@contextmanager
def watch_activations(hf: torch.nn.Module) -> Iterator[list]:
    """Weak references to every decoder layer's output of the forward passes inside the block."""
    refs: list = []
    handles = [
        layer.register_forward_hook(lambda m, a, o: refs.append(weakref.ref(o)))
        for layer in hf.model.layers
    ]
    try:
        yield refs
    finally:
        for h in handles:
            h.remove()


def assert_freed(refs: list, allow_empty: bool = False) -> None:
    assert refs or allow_empty, "no activation was watched"
    if any(r() is not None for r in refs):
        gc.collect()  # only when needed: a full collection is slow with torch loaded
    assert all(r() is None for r in refs), "an activation outlived its trace"


# -- trace time ------------------------------------------------------------------------------------


def test_nonexistent_module(model: LanguageModel) -> None:
    with pytest.raises(AttributeError) as info, model.trace(P):
        model.model.layer[0].output.save()  # @no-module
    assert "'model' has no submodule 'layer'" in str(info.value)
    assert "layers" in str(info.value) and "norm" in str(info.value)  # lists the children
    assert_at(info.value, "no-module")


def test_layer_index_out_of_range(model: LanguageModel) -> None:
    with pytest.raises(IndexError) as info, model.trace(P):
        model.model.layers[4].output.save()  # @index-range
    assert "4 modules" in str(info.value)
    assert_at(info.value, "index-range")
    with pytest.raises(IndexError) as info, model.trace(P):
        model.model.layers[-5].output.save()  # @index-range-negative
    assert_at(info.value, "index-range-negative")


def test_bool_int_iter_len(model: LanguageModel) -> None:
    with pytest.raises(TracingError) as info, model.trace(P):
        h = model.model.layers[0].output
        if h.sum() > 0:  # @bool
            pass
    assert "condition" in str(info.value)
    assert_at(info.value, "bool")

    with pytest.raises(TracingError) as info, model.trace(P):
        int(model.lm_head.output.argmax())  # @int
    assert "int()" in str(info.value)
    assert_at(info.value, "int")

    with pytest.raises(TracingError) as info, model.trace(P):
        for _x in model.model.layers[0].output:  # @iter
            pass
    assert "iterating" in str(info.value)
    assert_at(info.value, "iter")

    with pytest.raises(TracingError) as info, model.trace(P):
        len(model.model.layers[0].output)  # @len
    assert_at(info.value, "len")


def test_proxy_as_python_index(model: LanguageModel) -> None:
    with pytest.raises(TracingError) as info, model.trace(P):
        top = model.lm_head.output[0, -1].argmax()
        [1, 2, 3][top]  # @py-index
    assert_at(info.value, "py-index")


def test_nested_traces_and_sessions(model: LanguageModel) -> None:
    with pytest.raises(TracingError) as info, model.trace(P), model.trace(P):  # @nested-trace
        pass
    assert "nested" in str(info.value)
    assert_at(info.value, "nested-trace")

    with pytest.raises(TracingError) as info, model.session(), client_sdk.session():  # @nested-session
        pass
    assert_at(info.value, "nested-session")

    with pytest.raises(TracingError) as info, model.trace() as tracer:
        inner = tracer.invoke(P)
        with tracer.invoke(P), inner:  # @nested-invoke
            pass
    assert_at(info.value, "nested-invoke")


def test_unsupported_torch_function(model: LanguageModel) -> None:
    with pytest.raises(TracingError) as info, model.trace(P):
        torch.fft.fft(model.model.layers[0].output)  # @torch-fn
    assert "fft" in str(info.value) and "not supported" in str(info.value)
    assert_at(info.value, "torch-fn")


def test_unsupported_tensor_method(model: LanguageModel) -> None:
    with pytest.raises(TracingError) as info, model.trace(P):
        model.model.layers[0].output.numpy()  # @method
    assert ".numpy() is not supported" in str(info.value)
    assert_at(info.value, "method")
    with pytest.raises(InterventionError) as info, model.trace(P):
        model.model.layers[0].output.data.save()  # @attribute
    assert ".data is not supported" in str(info.value)
    assert_at(info.value, "attribute")
    # .grad is supported since issue 10, after a backward: without one it is refused at the line
    with pytest.raises(TracingError) as info, model.trace(P):
        model.model.layers[0].output.grad.save()  # @grad
    assert "with loss.backward()" in str(info.value)
    assert_at(info.value, "grad")


def test_envoy_outside_a_trace(model: LanguageModel) -> None:
    with pytest.raises(TracingError) as info:
        _ = model.model.layers[0].output  # @outside
    assert "inside a trace" in str(info.value)
    assert_at(info.value, "outside")


def test_envoy_of_another_model(model: LanguageModel, tiny_gpt2_path: Path) -> None:
    gpt2 = LanguageModel(str(tiny_gpt2_path))
    with pytest.raises(TracingError) as info, model.trace(P):
        gpt2.transformer.h[0].output.save()  # @other-model
    assert_at(info.value, "other-model")


def test_trace_without_input(model: LanguageModel) -> None:
    with pytest.raises(TracingError) as info, model.trace():  # @no-input
        model.lm_head.output.save()
    assert "no input" in str(info.value)
    assert_at(info.value, "no-input")


def test_value_of_unsupported_type(model: LanguageModel) -> None:
    with pytest.raises(TracingError) as info, model.trace(P):
        model.model.layers[0].output[:, 0] = object()  # @bad-type
    assert "object" in str(info.value)
    assert_at(info.value, "bad-type")


# -- after the block -------------------------------------------------------------------------------


def test_unsaved_value_after_the_block(model: LanguageModel) -> None:
    with model.trace(P):
        h = model.model.layers[0].output  # @defined
    assert isinstance(h, client_sdk.Proxy)
    with pytest.raises(TracingError) as info:
        _ = h + 1  # @used
    text = str(info.value)
    assert "was not saved" in text and ".save()" in text
    assert f"line {line('defined')}" in text  # where the value came from
    assert_at(info.value, "used")  # and where it was used
    with pytest.raises(TracingError) as info:
        _ = h.value  # @value
    assert_at(info.value, "value")
    with pytest.raises(TracingError):
        _ = torch.zeros(2) + h


def test_unsaved_value_used_in_a_later_trace(model: LanguageModel) -> None:
    with model.trace(P):
        h = model.model.layers[0].output
    with pytest.raises(TracingError) as info, model.trace(P):
        model.model.layers[1].output = h  # @later-trace
    assert "not saved" in str(info.value)
    assert_at(info.value, "later-trace")


# -- validation and execution ----------------------------------------------------------------------


def test_to_device_is_refused_before_running(model: LanguageModel) -> None:
    with watch_activations(model.local_module) as refs, pytest.raises(ValidationError) as info, \
            model.trace(P):
        model.model.layers[0].output.to("cuda").save()  # @to-cuda
    assert refs == []  # the model never ran
    assert info.value.code == "unsupported_call"
    assert_at(info.value, "to-cuda")


def test_out_of_order_read(model: LanguageModel) -> None:
    # Caught by validation (static module order) or by the engine: either way, at the late read.
    with pytest.raises(InterventionError) as info, model.trace(P):
        logits = model.lm_head.output.save()
        h = model.model.layers[0].output.save()  # @out-of-order
    assert info.value.code == "out_of_order"
    assert "order" in str(info.value)
    assert_at(info.value, "out-of-order")
    assert isinstance(logits, client_sdk.Proxy) and isinstance(h, client_sdk.Proxy)


def test_out_of_order_write(model: LanguageModel) -> None:
    with pytest.raises(InterventionError) as info, model.trace(P):
        model.model.layers[2].output[:] = 0
        model.model.layers[1].output[:] = 0  # @out-of-order-write
    assert info.value.code == "out_of_order"
    assert_at(info.value, "out-of-order-write")


def test_out_of_order_found_while_recording_runs_nothing(model: LanguageModel, capsys) -> None:
    """Once the model's order is known, local traces are checked as they are recorded: still a
    validation error at the late line, before any trace of the session runs."""
    assert model.module_order  # known from now on
    with watch_activations(model.local_module) as refs, pytest.raises(ValidationError) as info, model.session():
        with model.trace(P):
            client_sdk.log("first trace ran")
            model.lm_head.output.save()
        with model.trace(P) as tracer:
            with tracer.invoke(P):
                model.model.layers[1].output[:] += 1
            with tracer.invoke(P):
                model.model.layers[2].output.save()
                model.model.layers[0].output[:, -1] = 0  # @recorded-out-of-order
    assert refs == [] and "first trace ran" not in capsys.readouterr().out
    assert info.value.code == "out_of_order"
    assert_at(info.value, "recorded-out-of-order")


def test_shape_mismatch_on_assignment(model: LanguageModel) -> None:
    # scan=False: the error at model time, from the engine (the shape check would find it first)
    with watch_activations(model.local_module) as refs:
        with pytest.raises(ExecutionError) as info, model.trace(P, scan=False):
            h = model.model.layers[1].output.save()
            model.model.layers[1].output[:, -1, :] = torch.ones(3)  # @shape
        assert "shape" in str(info.value) or "size" in str(info.value)
        assert_at(info.value, "shape")
        assert isinstance(h, client_sdk.Proxy)  # nothing comes back from a failed trace
        assert_freed(refs)  # even while the exception is still held (a notebook keeps it)


def test_replacement_that_breaks_the_model(model: LanguageModel) -> None:
    with watch_activations(model.local_module) as refs:
        with pytest.raises(ExecutionError) as info, model.trace(P):
            layer = model.model.layers[1]
            layer.output = layer.output[:, :3]  # @breaks-model
            model.lm_head.output.save()
        assert "after this intervention" in str(info.value)
        assert_at(info.value, "breaks-model")
        assert_freed(refs)


def test_bad_index(model: LanguageModel) -> None:
    with pytest.raises(ExecutionError) as info, model.trace(P):
        model.lm_head.output[:, 100].save()  # @bad-index
    assert "IndexError" in str(info.value)
    assert_at(info.value, "bad-index")


def test_bad_method_arguments(model: LanguageModel) -> None:
    with pytest.raises(ExecutionError) as info, model.trace(P):
        h = model.model.layers[0].output
        h.view(7, 7).save()  # @view
    assert_at(info.value, "view")


def test_error_in_the_second_trace_of_a_session(model: LanguageModel) -> None:
    with pytest.raises(ExecutionError) as info, model.session():
        with model.trace(P):
            first = model.lm_head.output.save()
        with model.trace(P):
            model.model.layers[0].output[:, :, 999] = 0  # @second-trace
    assert_at(info.value, "second-trace")
    assert isinstance(first, client_sdk.Proxy)  # the session failed as a whole


def test_error_inside_an_invoke(model: LanguageModel) -> None:
    with pytest.raises(ExecutionError) as info, model.trace() as tracer:
        with tracer.invoke(P):
            model.lm_head.output.save()
        with tracer.invoke("Paris"):
            model.lm_head.output[:, :, 5000].save()  # @invoke
    assert_at(info.value, "invoke")


def _run_ir(model: LanguageModel, *nodes: Node) -> None:
    """Run hand-written IR on the engine directly, past validation: its runtime checks."""
    trace = TraceIR(model="m", invokes=[Invoke(input=P)], nodes=list(nodes))
    run_trace(model.local_module, trace, model.tokenizer)


def test_module_that_never_ran(model: LanguageModel) -> None:
    """A read of a call that never happens (the second call of a layer) fails at its line."""
    loc = (__file__, line("second-call"), "model.model.layers[0].output  (second call)")
    with pytest.raises(ExecutionError) as info:
        _run_ir(model, Node(id=0, op="module.output", args=["model.layers.0", 1], loc=loc))  # @second-call
    assert info.value.code == "module_not_called"
    assert "'model.layers.0' was not called" in str(info.value)
    assert_at(info.value, "second-call")


def test_out_of_order_at_run_time(model: LanguageModel) -> None:
    """The engine's own check, for orders validation cannot know (e.g. a later call's event)."""
    late = (__file__, line("engine-order"), "model.model.layers[0].output")
    with pytest.raises(ExecutionError) as info:
        _run_ir(
            model,
            Node(id=0, op="module.output", args=["model.layers.2", 0]),
            Node(id=1, op="module.output", args=["model.layers.0", 0], loc=late),  # @engine-order
        )
    assert info.value.code == "out_of_order"
    assert_at(info.value, "engine-order")


def test_grad_mode_is_restored_after_an_error(model: LanguageModel) -> None:
    for mode in (False, True):
        with torch.set_grad_enabled(mode):
            with pytest.raises(ExecutionError), model.trace(P):
                model.lm_head.output[:, 100].save()
            assert torch.is_grad_enabled() is mode


def test_no_leak_after_a_successful_trace(model: LanguageModel) -> None:
    with watch_activations(model.local_module) as refs, model.trace(P):
        hidden = model.model.layers[1].output[:, -1]  # unsaved
        saved = model.model.layers[2].output.save()
    assert isinstance(hidden, client_sdk.Proxy) and isinstance(saved, torch.Tensor)
    assert_freed(refs)  # the engine keeps no activation; `saved` is a detached tensor of its own
