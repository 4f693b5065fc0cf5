"""Several programs (traces of different requests) in one forward pass of the engine.

Each program has its own values, rows, stop, error and cancel flag: what it sees and returns equals
running it alone, and one program's end never touches another. Traces are recorded with
client_sdk's own recorder, so their node ids all start at 0 and would collide in a shared table.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import client_sdk
from client_sdk import LanguageModel, tracing
from intervention.engine import run_forward
from intervention.errors import Cancelled, ExecutionError, ValidationError
from intervention.ir import TraceIR
from intervention.program import Program, ProgramResult

P1 = "The Eiffel Tower is in the city of"  # 8 tokens
P3 = "The Kremlin is in the city of"  # 8 tokens, like P1
SHORT = "Paris"  # 1 token


@pytest.fixture(scope="module")
def lm(tiny_llama_path: Path) -> LanguageModel:
    return LanguageModel(str(tiny_llama_path))


def record(lm: LanguageModel, body: Callable[[], None]) -> tuple[TraceIR, dict]:
    with tracing.recording() as graph:
        body()
    (trace,) = graph.session_ir().traces
    return trace, graph.tensors


def run(lm: LanguageModel, *recorded: tuple[TraceIR, dict], **kwargs) -> list[ProgramResult]:
    programs = [Program(trace, tensors=tensors, **kwargs) for trace, tensors in recorded]
    with torch.no_grad():
        run_forward(lm.local_module, lm.tokenizer, programs)
    return [p.result() for p in programs]


def alone(lm: LanguageModel, rec: tuple[TraceIR, dict]) -> ProgramResult:
    (result,) = run(lm, rec)
    return result


def reader(lm: LanguageModel, prompt: str) -> tuple[TraceIR, dict]:
    def body():
        with lm.trace(prompt):
            lm.model.layers[1].output.save()
            lm.model.layers[2].output[:, -1].save()
            lm.lm_head.output.save()

    return record(lm, body)


def editor(lm: LanguageModel, prompt: str, steer: torch.Tensor) -> tuple[TraceIR, dict]:
    def body():
        with lm.trace(prompt):
            lm.model.layers[1].output[:, -1] += steer
            lm.model.layers[2].output.save()
            lm.lm_head.output.save()

    return record(lm, body)


def logits(result: ProgramResult) -> torch.Tensor:
    """The last value the trace saved (every trace here saves lm_head's output last)."""
    return result.saves[max(result.saves)]


def assert_same(got: ProgramResult, want: ProgramResult, exact: bool = True) -> None:
    assert got.error is None and want.error is None, (got.error, want.error)
    assert got.saves.keys() == want.saves.keys()
    for k in want.saves:
        a, b = got.saves[k], want.saves[k]
        assert a.shape == b.shape, k
        if exact:
            assert torch.equal(a, b), k
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_two_programs_see_exactly_what_each_sees_alone(lm: LanguageModel) -> None:
    a, b = reader(lm, P1), reader(lm, P3)
    got_a, got_b = run(lm, a, b)
    assert_same(got_a, alone(lm, a))
    assert_same(got_b, alone(lm, b))
    assert not torch.equal(logits(got_a), logits(got_b))  # really different rows


def test_an_edit_stays_in_its_programs_rows(lm: LanguageModel) -> None:
    steer = torch.full((64,), 3.0)
    edit, read = editor(lm, P1, steer), reader(lm, P3)
    got_edit, got_read = run(lm, edit, read)
    assert_same(got_read, alone(lm, read))
    assert_same(got_edit, alone(lm, edit))
    assert not torch.equal(logits(got_edit), logits(alone(lm, reader(lm, P1))))  # the edit did edit


def test_programs_of_different_lengths_each_see_their_own_width(lm: LanguageModel) -> None:
    long, short = reader(lm, P1), reader(lm, SHORT)
    got_long, got_short = run(lm, long, short)
    assert_same(got_long, alone(lm, long), exact=False)
    assert_same(got_short, alone(lm, short), exact=False)
    assert got_short.saves[0].shape[1] == 1  # not the 8 positions of the shared batch


def test_a_program_with_invokes_beside_another(lm: LanguageModel) -> None:
    def invokes():
        with lm.trace() as tracer:
            with tracer.invoke(P1):
                lm.model.layers[0].output[:] *= 0.5
                lm.lm_head.output.save()
            with tracer.invoke(P3):
                lm.lm_head.output.save()
            lm.lm_head.output.sum().save()  # outside invokes: all of this program's rows

    mine, other = record(lm, invokes), reader(lm, P1)
    got_mine, got_other = run(lm, mine, other)
    assert_same(got_mine, alone(lm, mine))
    assert_same(got_other, alone(lm, other))


def test_one_program_fails_one_stops_one_is_cancelled_the_others_finish(lm: LanguageModel) -> None:
    def failing():
        with lm.trace(P3):
            lm.model.layers[1].output[:, 100].save()  # IndexError: 8 positions

    def stopping():
        with lm.trace(P1) as tracer:
            lm.model.layers[0].output.save()
            tracer.stop()
            lm.lm_head.output.save()

    cancel = threading.Event()

    def cancelled():
        with lm.trace(P3):
            lm.model.layers[0].output.save()
            client_sdk.log("layer 0 ran")  # its log handler cancels it: mid-forward
            lm.lm_head.output.save()

    good = reader(lm, P1)
    programs = [
        Program(*record(lm, failing)[:1], tensors={}),
        Program(*record(lm, stopping)[:1], tensors={}),
        Program(*record(lm, cancelled)[:1], tensors={}, cancel=cancel, on_log=lambda m: cancel.set()),
        Program(good[0], tensors=good[1]),
    ]
    with torch.no_grad():
        run_forward(lm.local_module, lm.tokenizer, programs)
    failed, stopped, was_cancelled, finished = (p.result() for p in programs)

    assert isinstance(failed.error, ExecutionError) and "IndexError" in failed.error.message
    assert failed.saves == {}
    assert stopped.error is None and stopped.stopped == "trace" and list(stopped.saves) == [0]
    assert isinstance(was_cancelled.error, Cancelled) and was_cancelled.saves == {}
    assert_same(finished, alone(lm, good))


def test_the_forward_stops_once_every_program_has_ended(lm: LanguageModel) -> None:
    calls = []
    handle = lm.local_module.lm_head.register_forward_hook(lambda m, a, o: calls.append(1))

    def early():
        with lm.trace(P1):
            lm.model.layers[0].output.save()

    try:
        (result,) = run(lm, record(lm, early))
        assert result.error is None and list(result.saves) == [0]
        assert calls == []  # nothing waited for lm_head: the forward ended after layer 0

        def late():
            with lm.trace(P1):
                lm.output.logits.save()  # the root's output: lm_head has run by then

        run(lm, record(lm, late))
        assert calls == [1]
    finally:
        handle.remove()


def test_an_unknown_module_fails_only_its_program(lm: LanguageModel) -> None:
    bad_trace, _ = reader(lm, P1)
    bad_trace.nodes[0].args[0] = "model.layers.9"
    good = reader(lm, P3)
    got_bad, got_good = run(lm, (bad_trace, {}), good)
    assert isinstance(got_bad.error, ValidationError) and got_bad.error.code == "unknown_module"
    assert_same(got_good, alone(lm, good))


def test_a_saved_view_does_not_keep_its_whole_activation(tiny_llama_path) -> None:
    """`h[:, -1].save()` keeps its own elements, not all of `h` (a copy of the view)."""
    lm = LanguageModel(str(tiny_llama_path))
    with lm.trace("The Eiffel Tower is in the city of"):
        h = lm.model.layers[0].output
        last = h[:, -1].save()
        whole = h.save()
    assert last.untyped_storage().nbytes() == last.numel() * last.element_size()
    torch.testing.assert_close(last, whole[:, -1])
