"""Tracing and rebinding: after the outermost block, saved names hold real values."""

from __future__ import annotations

import runpy
import types
from pathlib import Path

import pytest
import torch

import client_sdk
from client_sdk import LanguageModel, Proxy, TracingError

P1 = "The Eiffel Tower is in the city of"
P2 = "Buckingham Palace is in the city of"


@pytest.fixture(scope="module")
def model(tiny_llama_path: Path) -> LanguageModel:
    return LanguageModel(str(tiny_llama_path))


@pytest.fixture(scope="module")
def reference(model: LanguageModel) -> dict[str, torch.Tensor]:
    """Plain-PyTorch values for P1: every layer's output and the logits."""
    hf, out = model.local_module, {}
    handles = [
        layer.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(f"layer{i}", o.clone()))
        for i, layer in enumerate(hf.model.layers)
    ]
    try:
        with torch.no_grad():
            out["logits"] = hf(**model.tokenizer([P1], return_tensors="pt")).logits
    finally:
        for h in handles:
            h.remove()
    return out


def test_function_locals(model: LanguageModel, reference: dict) -> None:
    with model.trace(P1):
        hidden = model.model.layers[1].output
        logits = model.lm_head.output.save()
        token = model.lm_head.output[0, -1].argmax().save()
    assert type(logits) is torch.Tensor and torch.equal(logits, reference["logits"])
    assert type(token) is torch.Tensor and token.item() == reference["logits"][0, -1].argmax().item()
    assert type(hidden) is Proxy  # unsaved: stays a proxy


def test_same_proxy_under_two_names_and_non_tensor_values(model: LanguageModel) -> None:
    with model.trace(P1):
        width = model.model.layers[0].output.shape[-1].save()
        a = model.lm_head.output.save()
        b = a
        shape = model.lm_head.output.shape.save()
    assert a is b and type(a) is torch.Tensor
    assert tuple(shape) == (1, 8, 803) and width == 64


def test_containers(model: LanguageModel, reference: dict) -> None:
    with model.trace(P1):
        layers = [layer.output.save() for layer in model.model.layers]
        by_name = {"first": layers[0] * 1, "last": layers[-1]}
        by_name["first"].save()
        pairs = [(0, layers[0]), {"deep": [layers[1]]}]
        mixed = (layers[2], layers[2][:, -1])
    assert all(type(x) is torch.Tensor for x in layers)
    for i, x in enumerate(layers):
        assert torch.equal(x, reference[f"layer{i}"])
    assert torch.equal(by_name["first"], reference["layer0"]) and by_name["last"] is layers[-1]
    assert pairs[0][1] is layers[0] and pairs[1]["deep"][0] is layers[1]
    assert type(mixed) is tuple and mixed[0] is layers[2] and type(mixed[1]) is Proxy


def test_module_globals(model: LanguageModel, tmp_path: Path, reference: dict) -> None:
    """A `with` block at module level (a script, a notebook cell) rebinds the module's globals."""
    script = tmp_path / "experiment.py"
    script.write_text(
        "with model.trace(prompt):\n"
        "    outputs = [model.model.layers[0].output.save()]\n"
        "    unsaved = model.model.layers[1].output\n"
        "    logits = model.lm_head.output.save()\n"
    )
    module = runpy.run_path(str(script), init_globals={"model": model, "prompt": P1})
    assert type(module["logits"]) is torch.Tensor
    assert torch.equal(module["logits"], reference["logits"])
    assert torch.equal(module["outputs"][0], reference["layer0"])
    assert type(module["unsaved"]) is Proxy


def test_block_inside_a_helper_and_a_closure(model: LanguageModel, reference: dict) -> None:
    def run() -> torch.Tensor:
        with model.trace(P1):
            logits = model.lm_head.output.save()
        return logits

    assert type(run()) is torch.Tensor

    with model.trace(P1):
        captured = model.lm_head.output.save()

    def read() -> torch.Tensor:  # `captured` is a cell variable of this frame
        return captured

    assert type(read()) is torch.Tensor and torch.equal(read(), reference["logits"])


def test_client_sdk_save(model: LanguageModel, reference: dict) -> None:
    with model.trace(P1):
        h = client_sdk.save(model.model.layers[3].output)
        literal = client_sdk.save(5)
    assert type(h) is torch.Tensor and torch.equal(h, reference["layer3"])
    assert literal == 5


def test_save_outside_a_trace_is_an_error() -> None:
    with pytest.raises(TracingError, match="inside a trace"):
        client_sdk.save(torch.ones(1))
    with pytest.raises(TracingError, match="inside a trace"):
        client_sdk.log("x")


def test_unsaved_values_keep_a_helpful_error(model: LanguageModel) -> None:
    with model.trace(P1):
        h = model.model.layers[0].output
        s = h.sum()
    for value in (h, s):
        assert type(value) is Proxy
        with pytest.raises(TracingError, match=r"not saved: call \.save\(\)"):
            _ = value.value
        with pytest.raises(TracingError, match="not saved"):
            _ = value * 2
        with pytest.raises(TracingError, match="not saved"):
            _ = value[0]
        with pytest.raises(TracingError, match="not saved"):
            torch.softmax(value, dim=-1)
    assert "unsaved" in repr(h)


def test_proxy_value_property(model: LanguageModel) -> None:
    holder = types.SimpleNamespace()
    with model.trace(P1):
        holder.logits = model.lm_head.output.save()  # an attribute: not rebound
    assert type(holder.logits) is Proxy
    assert type(holder.logits.value) is torch.Tensor
    assert "tensor(" in repr(holder.logits)
    with pytest.raises(TracingError, match=r"\.value"):
        _ = holder.logits + 1


def test_saved_value_of_an_earlier_session_in_a_new_trace(model: LanguageModel, reference: dict) -> None:
    with model.trace(P1):
        hs = model.model.layers[-1].output[:, -1, :].save()
    holder = types.SimpleNamespace()
    with model.trace(P1):
        holder.hs = model.model.layers[-1].output[:, -1, :].save()

    with model.trace(P2):
        model.model.layers[1].output[:, -1, :] = hs  # a tensor now
        patched = model.lm_head.output.save()
    with model.trace(P2):
        model.model.layers[1].output[:, -1, :] = holder.hs  # still a proxy, but saved and ready
        patched_too = model.lm_head.output.save()

    expected_hs = reference["layer3"][:, -1, :]
    assert torch.equal(hs, expected_hs)
    hf = model.local_module

    def edit(module, args, output):
        output[:, -1, :] = expected_hs

    handle = hf.model.layers[1].register_forward_hook(edit)
    try:
        with torch.no_grad():
            expected = hf(**model.tokenizer([P2], return_tensors="pt")).logits
    finally:
        handle.remove()
    assert torch.equal(patched, expected)
    assert torch.equal(patched_too, expected)


def test_values_saved_in_a_session_are_bound_after_it(model: LanguageModel, reference: dict) -> None:
    with model.session():
        with model.trace(P1):
            first = model.model.layers[0].output.save()
        assert type(first) is Proxy  # the session has not run yet
        with model.trace(P2):
            model.model.layers[0].output[:, -1] = first[:, -1]  # saved values flow too
            second = model.lm_head.output.save()
    assert type(first) is torch.Tensor and type(second) is torch.Tensor
    assert torch.equal(first, reference["layer0"])


def test_proxies_of_other_sessions_are_left_alone(model: LanguageModel) -> None:
    with model.trace(P1):
        old_unsaved = model.model.layers[0].output
    with model.trace(P1):
        new = model.lm_head.output.save()
    assert type(old_unsaved) is Proxy and type(new) is torch.Tensor


def test_an_empty_block_and_a_stopped_session(model: LanguageModel) -> None:
    with model.session() as session:
        session.stop()
        with model.trace(P1):
            never = model.lm_head.output.save()
    assert type(never) is Proxy
    with pytest.raises(TracingError, match="never computed"):
        _ = never.value
    with model.session():
        pass


def test_recorded_ir(model: LanguageModel) -> None:
    """What a block records: one node per operation, in program order, each at its line."""
    from client_sdk import tracing

    with tracing.recording() as graph, model.trace(P1) as tracer:
        h = model.model.layers[1].output
        model.model.layers[2].output = h * 2 + torch.ones(64)
        client_sdk.log("h", h[0, -1, 0])
        tracer.stop()
    (trace,) = graph.session_ir().traces
    assert trace.model == model.name and trace.invokes[0].input == P1
    assert [n.op for n in trace.nodes] == [
        "module.output", "mul", "add", "module.set_output", "getitem", "log", "stop",
    ]
    assert [n.id for n in trace.nodes] == list(range(7))
    assert trace.nodes[3].args == ["model.layers.2", 0, {"$ref": 2}]
    assert trace.nodes[2].args[1] == {"$tensor": "t0"} and torch.equal(graph.tensors["t0"], torch.ones(64))
    assert all(n.loc[0] == __file__ for n in trace.nodes)
    assert trace.nodes[0].loc[2] == "h = model.model.layers[1].output"
    assert trace.nodes[6].args == ["trace"]


def test_what_the_hot_paths_make_has_every_field(model: LanguageModel) -> None:
    """The recorder makes nodes, proxies and steps without calling their classes (a cheaper
    path): each still has every field its class's constructor would set."""
    import dataclasses

    from client_sdk import tracing
    from intervention.ir import Node
    from intervention.program import Edit, ReadStep

    with tracing.recording() as graph, model.trace(P1):
        model.model.layers[0].output.save()  # a read and its save
        model.model.layers[1].output[:] += 1.0  # a read and its edit
        h = model.model.layers[2].output
        t = h[:, -1]  # lazy subscript
        t += 2.0  # pending in-place op
        h[:, -1] = t
        model.lm_head.output  # noqa: B018 - a read alone
    (trace,) = graph.session_ir().traces
    for node in trace.nodes:
        for f in dataclasses.fields(Node):
            getattr(node, f.name)
    proxies = [p for p in graph.proxies]
    assert len(proxies) >= 5
    for proxy in proxies:
        for slot in Proxy.__slots__:
            if slot != "__weakref__":
                getattr(proxy, slot)
    recording = graph.recordings[id(trace)]
    steps = [s for steps in recording.by_invoke.values() for s in steps]
    assert {type(s).__name__ for s in steps} >= {"ReadSaveStep", "ReadEditStep", "ReadStep"}
    for step in steps:
        for slot in ReadStep.__slots__:
            if slot != "edit" or step.edits:
                getattr(step, slot)
        if step.edits:
            for slot in Edit.__slots__:
                getattr(step.edit, slot)
