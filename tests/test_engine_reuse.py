"""What the engine keeps between runs to be cheap, and that keeping it changes no result.

- Module wrappers are kept per model and reinstalled while the module and its `forward` are the
  ones they were made for; a module replaced in the model (or given a `forward` of its own) gets
  a fresh wrapper, and nothing is left on any module after a run.
- The prompts of all programs in one driver run are tokenized in one call, each distinct prompt
  once: every program gets exactly the rows it gets alone.
- Local runs hand the engine the compiled arguments of `x[i] op= v` (no JSON decode): the values
  equal those of the same trace compiled from its IR alone.
- Where saves cannot fail (no cap on saved bytes), a read and its `.save()` right after run as
  one step: the same saves, and with a cap a save still fails at its own line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client_sdk import LanguageModel, tracing
from intervention.drivers import ForwardDriver
from intervention.engine import run_programs
from intervention.errors import ExecutionError
from intervention.program import Program

P1 = "The Eiffel Tower is in the city of"
P2 = "Buckingham Palace is in"


@pytest.fixture(scope="module")
def lm(tiny_llama_path: Path) -> LanguageModel:
    return LanguageModel(str(tiny_llama_path))


def _instance_forwards(module: torch.nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if "forward" in m.__dict__]


def test_a_replaced_module_is_wrapped_anew(lm: LanguageModel) -> None:
    hf = lm.local_module
    with lm.trace(P1):
        before = lm.model.layers[1].mlp.output.save()
    original = hf.model.layers[1].mlp
    # The same weights behind a new module object, whose output is the original's doubled.
    class Doubled(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * 2

    hf.model.layers[1].mlp = Doubled(original)
    try:
        with lm.trace(P1):
            after = lm.model.layers[1].mlp.output.save()
    finally:
        hf.model.layers[1].mlp = original
    # A stale wrapper on the old module would never fire: the read would fail or be stale.
    torch.testing.assert_close(after, before * 2)
    with lm.trace(P1):
        again = lm.model.layers[1].mlp.output.save()
    torch.testing.assert_close(again, before)
    assert _instance_forwards(hf) == [], "a run left a wrapper behind"


def test_a_forward_set_on_the_module_is_respected(lm: LanguageModel) -> None:
    hf = lm.local_module
    with lm.trace(P1):
        before = lm.model.layers[0].mlp.output.save()
    mlp = hf.model.layers[0].mlp
    plain = mlp.forward
    mlp.forward = lambda x: plain(x) + 1.0  # an instance forward, as accelerate's hooks set
    try:
        with lm.trace(P1):
            after = lm.model.layers[0].mlp.output.save()
        assert "forward" in mlp.__dict__, "the run removed the user's own forward"
    finally:
        del mlp.forward
    torch.testing.assert_close(after, before + 1.0)
    assert _instance_forwards(hf) == []


def _record(lm: LanguageModel, prompt: str) -> tuple:
    with tracing.recording() as graph, lm.trace(prompt):
        lm.model.layers[0].output[:, -1].save()
        lm.lm_head.output[:, -1].argmax(dim=-1).save()
    (trace,) = graph.session_ir().traces
    return trace, graph.tensors


def _run(lm: LanguageModel, traces: list[tuple]) -> list[list[torch.Tensor]]:
    programs = [Program(trace, tensors=tensors) for trace, tensors in traces]
    run_programs(lm.local_module, programs, ForwardDriver.for_programs(lm.tokenizer, programs))
    out = []
    for program in programs:
        result = program.result()
        assert result.error is None
        out.append([result.saves[i] for i in sorted(result.saves)])
    return out


def test_shared_and_distinct_prompts_tokenized_together_give_each_its_own_rows(lm: LanguageModel) -> None:
    a, b = _record(lm, P1), _record(lm, P2)
    alone_a, alone_b = _run(lm, [a])[0], _run(lm, [b])[0]
    together = _run(lm, [a, b, a, b, a])
    for got, want in zip(together, [alone_a, alone_b, alone_a, alone_b, alone_a], strict=True):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)
    assert lm.tokenizer(P1)["input_ids"] != lm.tokenizer(P2)["input_ids"]


def test_local_augassign_templates_equal_the_decoded_ir(lm: LanguageModel) -> None:
    def body() -> None:
        h = lm.model.layers[0].output
        h[:] += 0.5
        h[:, -1] *= 2
        h[..., 0] -= h[..., 1]  # a traced operand
        lm.model.layers[1].output[0] += 1  # an int index
        lm.lm_head.output.save()

    with lm.trace(P1):
        body()
        local = lm.lm_head.output.save()
    with tracing.recording() as graph, lm.trace(P1):
        body()
        lm.lm_head.output.save()
    (trace,) = graph.session_ir().traces
    augassigns = [n.id for n in trace.nodes if n.op == "augassign"]
    recording = (graph.recordings or {})[id(trace)]  # what a local run uses: steps made while recording
    steps = [s for steps in recording.by_invoke.values() for s in steps]
    compiled = {s.id for s in steps} | {s.edit.id for s in steps if s.edits}  # (an edit of a read: one step)
    assert len(augassigns) == 4 and set(augassigns) <= compiled and not recording.broken
    program = Program(trace, tensors=graph.tensors)  # no recording: compiled from the IR's JSON alone
    run_programs(lm.local_module, [program], ForwardDriver.for_programs(lm.tokenizer, [program]))
    result = program.result()
    assert result.error is None
    torch.testing.assert_close(local, result.saves[max(result.saves)])


def test_whole_slice_edit_keeps_pythons_meaning(lm: LanguageModel) -> None:
    """`x[:] op= v` runs on x itself: the same values as the view, and a 0-d x still refuses `[:]`."""
    with lm.trace(P1):
        h = lm.model.layers[0].output
        h[:] *= 3
        fast = lm.model.layers[0].output.save()
    with lm.trace(P1):
        h = lm.model.layers[0].output
        h[0:] *= 3  # not the whole-slice path: a view, then the op
        plain = lm.model.layers[0].output.save()
    torch.testing.assert_close(fast, plain)
    with pytest.raises(ExecutionError) as info, lm.trace(P1):
        s = lm.model.layers[0].output.sum()
        s[:] += 1  # @zero-d
    assert "0-dim" in str(info.value) and "s[:] += 1" in str(info.value)


def test_read_and_its_save_fused_in_local_runs_keep_results_and_the_saves_line(lm: LanguageModel) -> None:
    """Without a cap on saved bytes (local runs) a read and the `.save()` of it right after run
    as one step; the saves are those of the same trace with a cap (one step each), in invokes
    and outside them, and a save over the cap still fails at the save's own line."""
    with tracing.recording() as graph, lm.trace() as tracer:
        with tracer.invoke(P1):
            h = lm.model.layers[0].output
            h.save()
            lm.model.layers[1].output.save()
        with tracer.invoke(P2):
            lm.model.layers[1].output.save()
        lm.lm_head.output.save()  # outside the invokes
    (trace,) = graph.session_ir().traces
    saves = [n for n in trace.nodes if n.op == "save"]

    def run(**kw: int) -> tuple[Program, object]:
        program = Program(trace, tensors=graph.tensors, **kw)
        run_programs(lm.local_module, [program], ForwardDriver.for_programs(lm.tokenizer, [program]))
        return program, program.result()

    fused, fused_result = run()
    capped, capped_result = run(max_saved_bytes=2**30)
    assert fused_result.error is None and capped_result.error is None
    n_steps = lambda p: sum(len(t.steps) for t in p.threads)
    assert n_steps(capped) == len(trace.nodes) and n_steps(fused) == len(trace.nodes) - len(saves)
    assert list(fused_result.saves) == list(capped_result.saves) == [s.args[0]["$ref"] for s in saves]
    for i, value in fused_result.saves.items():
        torch.testing.assert_close(value, capped_result.saves[i])

    _, over = run(max_saved_bytes=1)
    assert isinstance(over.error, ExecutionError) and over.error.code == "too_large"
    assert over.error.location == saves[0].loc and saves[0].loc[2] == "h.save()"
