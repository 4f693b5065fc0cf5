"""`x[i] op= v` is recorded as one `augassign` node, with Python's own semantics.

Python runs it as getitem, an in-place op and setitem. The recorder defers basic subscripts (views)
until they are used, so the three become one node; anything else records what was deferred at its
own line. These tests pin down that nothing about the results or the errors changes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import client_sdk
from client_sdk import ExecutionError, LanguageModel, tracing

P1 = "The Eiffel Tower is in the city of"
P2 = "Buckingham Palace is in the city of"


@pytest.fixture(scope="module")
def lm(tiny_llama_path: Path) -> LanguageModel:
    return LanguageModel(str(tiny_llama_path))


def ops_of(body) -> list[list[str]]:
    with tracing.recording() as graph:
        body()
    return [[n.op for n in t.nodes] for t in graph.session_ir().traces]


def hooked(lm: LanguageModel, prompt: str, layer: int, edit) -> torch.Tensor:
    hf = lm.local_module
    handle = hf.model.layers[layer].register_forward_hook(lambda m, a, o: edit(o))
    try:
        with torch.no_grad():
            return hf(**lm.tokenizer(prompt, return_tensors="pt")).logits
    finally:
        handle.remove()


def test_an_augmented_assignment_is_one_node(lm: LanguageModel) -> None:
    def body():
        with lm.trace(P1):
            lm.model.layers[1].output[:, -1] += 0.5
            lm.model.layers[2].output[0, :, :3] *= 2
            lm.lm_head.output.save()

    assert ops_of(body) == [["module.output", "augassign", "module.output", "augassign", "module.output", "save"]]


def test_it_edits_like_python(lm: LanguageModel) -> None:
    with lm.trace(P1):
        lm.model.layers[1].output[:, -1] += 0.5
        logits = lm.lm_head.output.save()

    def edit(o):
        o[:, -1] += 0.5

    assert torch.equal(logits, hooked(lm, P1, 1, edit))


def test_the_subscript_and_its_result_stay_usable_afterwards(lm: LanguageModel) -> None:
    with lm.trace(P1):
        x = lm.model.layers[1].output
        t = x[:, -1]
        t += 1.0
        x[:, -1] = t  # the three calls of `x[:, -1] += 1.0`, written out
        after = t.save()  # a view of x[:, -1]: it shows the edit
        whole = x.save()
    assert torch.equal(after, whole[:, -1])


def test_advanced_indices_are_recorded_as_they_come(lm: LanguageModel) -> None:
    def body():
        with lm.trace(P1):
            h = lm.model.layers[1].output
            h[h < 0] += 1.0  # a copy, not a view: getitem, iadd and setitem all matter

    assert ops_of(body) == [["module.output", "lt", "getitem", "iadd", "setitem"]]
    with lm.trace(P1):
        h = lm.model.layers[1].output
        h[h < 0] += 1.0
        logits = lm.lm_head.output.save()

    def edit(o):
        o[o < 0] += 1.0

    assert torch.equal(logits, hooked(lm, P1, 1, edit))


def test_a_tuple_target_fails_as_in_python(lm: LanguageModel) -> None:
    """self_attn returns a tuple: `output[0] += v` edits the tensor in it, then Python's setitem
    on the tuple raises TypeError (as nnsight reports it too)."""
    with pytest.raises(ExecutionError) as info, lm.trace(P1):
        lm.model.layers[0].self_attn.output[0] += 1.0  # @tuple-target
    assert "does not support item assignment" in str(info.value)
    assert "self_attn.output[0] += 1.0" in str(info.value)


def test_a_bad_index_that_is_never_used_still_fails_at_its_line(lm: LanguageModel) -> None:
    with pytest.raises(ExecutionError) as info, lm.trace(P1):
        lm.lm_head.output[:, 100]  # unused on purpose
    assert "IndexError" in str(info.value) and "lm_head.output[:, 100]" in str(info.value)


def test_a_subscript_used_by_a_later_trace_is_computed_in_its_own(lm: LanguageModel) -> None:
    """The seed pattern: only the last-token vector crosses to the next trace, not the layer."""

    def body():  # recording() is the session
        with lm.trace(P1):
            hs = lm.model.layers[-1].output[:, -1, :]
        with lm.trace(P2):
            lm.model.layers[1].output[:, -1, :] = hs
            client_sdk.log("patched")

    first, second = ops_of(body)
    assert first == ["module.output", "getitem"]
    assert second == ["module.output", "setitem", "log"]


def test_a_subscript_written_before_a_stop_is_computed(lm: LanguageModel) -> None:
    with lm.session():
        with lm.trace(P1) as tracer:
            hs = lm.model.layers[-1].output[:, -1]
            tracer.stop()
        with lm.trace(P2):
            out = (hs * 1).save()
    assert out.shape == (1, 64)


def test_an_edit_of_the_value_just_read_fails_at_its_own_line(lm: LanguageModel) -> None:
    """Locally a read and the scalar edit right after it run as one step: a failing edit still
    names its own line, not the read's."""
    with pytest.raises(ExecutionError) as info, lm.trace(P1):
        h = lm.model.layers[1].output
        h[5] += 1.0  # a batch of one: no row 5
    assert "IndexError" in str(info.value) and "h[5] += 1.0" in str(info.value)


def test_edits_of_values_just_read_in_invokes_see_their_rows(lm: LanguageModel) -> None:
    with lm.trace() as tracer:
        with tracer.invoke(P1):
            lm.model.layers[1].output[:] += 0.5
            a = lm.lm_head.output.save()
        with tracer.invoke(P2):
            lm.model.layers[1].output[:, -1] *= 2.0
            b = lm.lm_head.output.save()
    with lm.trace(P1):
        lm.model.layers[1].output[:] += 0.5
        alone_a = lm.lm_head.output.save()
    with lm.trace(P2):
        lm.model.layers[1].output[:, -1] *= 2.0
        alone_b = lm.lm_head.output.save()
    torch.testing.assert_close(a[:, -1], alone_a[:, -1])
    torch.testing.assert_close(b[:, -1], alone_b[:, -1])


def test_an_edit_of_a_subscript_of_a_subscript_is_recorded_after_it(lm: LanguageModel) -> None:
    """`x[:, -1][0] += v`: the inner subscript is recorded first (a node of its own), then the edit."""
    with lm.trace(P1):
        x = lm.model.layers[1].output
        x[:, -1][0] += 1.0
        logits = lm.lm_head.output.save()

    def edit(o):
        o[:, -1][0] += 1.0

    assert torch.equal(logits, hooked(lm, P1, 1, edit))
    with tracing.recording() as graph, lm.trace(P1):
        lm.model.layers[1].output[:, -1][0] += 1.0
    nodes = graph.session_ir().traces[0].nodes
    assert [n.op for n in nodes] == ["module.output", "getitem", "augassign"]
    assert len({n.id for n in nodes}) == 3


def test_an_in_place_op_on_a_subscript_is_that_subscript(lm: LanguageModel) -> None:
    """`t += v` on a lazy subscript gives `t` itself back, as torch does for a tensor: the nodes,
    values and lines are those of the three calls written out."""
    def body():
        with lm.trace(P1):
            x = lm.model.layers[1].output
            t = x[:, -1]
            u = t
            t += 1.0
            assert t is u
            t.save()

    assert ops_of(body) == [["module.output", "getitem", "iadd", "save"]]
    with lm.trace(P1):
        x = lm.model.layers[1].output
        t = x[:, -1]
        t += t  # the operand is the subscript itself
        x[:, -1] = t
        logits = lm.lm_head.output.save()

    def edit(o):
        t = o[:, -1]
        t += t
        o[:, -1] = t

    assert torch.equal(logits, hooked(lm, P1, 1, edit))
    with pytest.raises(ExecutionError) as info, lm.trace(P1):
        t = lm.model.layers[1].output[:, -1]
        t += torch.ones(3)  # @bad-iadd: (1, 64) += (3,)
        t.save()
    assert "t += torch.ones(3)" in str(info.value)
