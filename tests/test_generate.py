"""Generation (issue 10), locally: `model.generate`, per-step interventions (`tracer.iter`,
`tracer.all()`), invokes with generate, an input-less invoke, and `tracer.result` — checked against
nnsight 0.8.1 (tests/nnsight_oracle.py) and against HF `generate` with hand-written hooks.
Remote = local for the same experiments: tests/test_generate_remote.py.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import nnsight_oracle as oracle  # tests/ is on sys.path under pytest; imports nnsight lazily
import pytest
import torch

import client_sdk
from client_sdk import LanguageModel, TracingError

P1 = "The Eiffel Tower is in the city of"
SHORT = "Paris"
N = 5


def same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal up to float reordering: two libraries, two runs of the same weights."""
    return x.shape == y.shape and x.dtype == y.dtype and torch.allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def case(request: pytest.FixtureRequest) -> tuple[str, LanguageModel]:
    path = str(request.getfixturevalue(f"tiny_{request.param}_path"))
    return path, LanguageModel(path)


@pytest.fixture(scope="module")
def llama(tiny_llama_path) -> LanguageModel:
    return LanguageModel(str(tiny_llama_path))


@pytest.fixture(scope="module")
def nnsight_mounted() -> Iterator[None]:
    if importlib.util.find_spec("nnsight") is None:
        pytest.skip("nnsight is not installed")
    with oracle.save_mounted():
        yield


def layers(model: LanguageModel):
    return model.transformer.h if "transformer" in model.module_tree["children"] else model.model.layers


def vector_for(model: LanguageModel) -> torch.Tensor:
    width = model.config.get("hidden_size") or model.config["n_embd"]
    return torch.randn(width, generator=torch.Generator().manual_seed(3)) * 2


def hf_generate(model: LanguageModel, prompts: list[str], n: int, hook=None, **kwargs) -> torch.Tensor:
    """HF generate on left-padded prompts, with an optional forward hook (module, hook)."""
    tok = model.tokenizer
    rows = [tok(p)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    handle = hook[0].register_forward_hook(hook[1]) if hook else None
    try:
        with torch.no_grad():
            return model.local_module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                               pad_token_id=pad, **kwargs)
    finally:
        if handle is not None:
            handle.remove()


# -- 1. generation and tracer.result ---------------------------------------------------------------


def test_greedy_result_is_hf_generate(case) -> None:
    _, model = case
    with model.generate(P1, max_new_tokens=N) as tracer:
        ids = tracer.result.save()
    assert torch.equal(ids, hf_generate(model, [P1], N))
    assert ids.shape[1] == len(model.tokenizer(P1)["input_ids"]) + N


def test_sampling_with_a_seed_is_repeatable_and_matches_hf(llama) -> None:
    with llama.generate(P1, max_new_tokens=8, do_sample=True, seed=11) as tracer:
        a = tracer.result.save()
    with llama.generate(P1, max_new_tokens=8, do_sample=True, seed=11) as tracer:
        b = tracer.result.save()
    torch.manual_seed(11)
    want = hf_generate(llama, [P1], 8, do_sample=True)
    assert torch.equal(a, b) and torch.equal(a, want)
    with llama.generate(P1, max_new_tokens=8, do_sample=True, seed=12) as tracer:
        c = tracer.result.save()
    assert not torch.equal(a, c)  # the seed is what made them equal


def test_generate_inside_a_session_uses_an_earlier_trace(llama) -> None:
    with llama.session():
        with llama.trace(SHORT):
            hs = llama.model.layers[1].output[:, -1]
        with llama.generate(P1, max_new_tokens=3) as tracer:
            llama.model.layers[1].output[:, -1] = hs
            ids = tracer.result.save()

    def patch(module, args, output):
        if output.shape[1] > 1:  # step 0: the prompt
            output[:, -1] = want_hs
        return output

    with llama.trace(SHORT):
        want_hs = llama.model.layers[1].output[:, -1].save()
    assert torch.equal(ids, hf_generate(llama, [P1], 3, hook=(llama.local_module.model.layers[1], patch)))


# -- 2. per-step interventions ---------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*was never reached")  # nnsight's open-ended loop ends so
def test_steps_match_nnsight(case, nnsight_mounted) -> None:
    path, model = case
    vector = vector_for(model)
    reads, steered = [], []
    with model.generate(P1, max_new_tokens=N) as tracer:
        first = layers(model)[0].output.save()
        for step in tracer.iter[0:N]:
            if step < 3:
                reads.append(layers(model)[1].output[:, -1].save())
            layers(model)[1].output[:, -1] += vector
            steered.append(model.lm_head.output[:, -1].argmax(dim=-1).save())
        ids = tracer.result.save()
    every = []
    with model.generate(P1, max_new_tokens=N) as tracer:
        for _ in tracer.all():
            every.append(model.lm_head.output[:, -1].save())
    want = oracle.generate_steps(path, P1, N, 1, vector)
    assert same(first, want["first"])
    assert len(reads) == 3 and all(same(a, b) for a, b in zip(reads, want["reads"], strict=True))
    assert len(steered) == N and all(torch.equal(a, b) for a, b in zip(steered, want["steered"], strict=True))
    assert torch.equal(ids, want["ids"])
    assert len(every) == N and all(same(a, b) for a, b in zip(every, want["every"], strict=True))


def test_steering_every_step_is_hf_generate_with_a_hook(case) -> None:
    _, model = case
    vector = vector_for(model)
    with model.generate(P1, max_new_tokens=N) as tracer:
        for _ in tracer.all():
            layers(model)[2].output[:, -1] += vector
        ids = tracer.result.save()

    def steer(module, args, output):
        output[:, -1] += vector
        return output

    block = dict(model.local_module.named_modules())[_path(model, 2)]
    assert torch.equal(ids, hf_generate(model, [P1], N, hook=(block, steer)))


def _path(model: LanguageModel, layer: int) -> str:
    return f"transformer.h.{layer}" if "transformer" in model.module_tree["children"] else f"model.layers.{layer}"


def test_picked_steps_match_nnsight(case, nnsight_mounted) -> None:
    path, model = case
    with model.generate(P1, max_new_tokens=N) as tracer:
        for _ in tracer.iter[[0, 2]]:
            layers(model)[1].output[:] = 0
        for _ in tracer.iter[3]:
            late = model.lm_head.output.save()
        ids = tracer.result.save()
    want = oracle.generate_picked_steps(path, P1, N, 1)
    assert same(late, want["late"]) and torch.equal(ids, want["ids"])


def test_the_whole_model_per_step(llama) -> None:
    """The root module's output at each step (generate calls the wrapped root forward)."""
    logits = []
    with llama.generate(P1, max_new_tokens=3) as tracer:
        for _ in tracer.all():
            logits.append(llama.output.logits[0, -1].save())
        ids = tracer.result.save()
    assert [int(x.argmax()) for x in logits] == ids[0, -3:].tolist()


def test_saves_into_lists_and_dicts_come_back_as_tensors(llama) -> None:
    by_step: dict[int, torch.Tensor] = {}
    tokens = []
    with llama.generate(P1, max_new_tokens=4) as tracer:
        for step in tracer.all():
            by_step[step] = llama.model.layers[0].output[0, -1].save()
            tokens.append(llama.lm_head.output[0, -1].argmax().save())
        ids = tracer.result.save()
    assert sorted(by_step) == [0, 1, 2, 3] and all(type(v) is torch.Tensor for v in by_step.values())
    assert [int(t) for t in tokens] == ids[0, -4:].tolist()  # step k predicts new token k


def test_logs_arrive_in_step_order(llama, capsys: pytest.CaptureFixture) -> None:
    with llama.generate(P1, max_new_tokens=3) as tracer:
        for step in tracer.all():
            client_sdk.log("step", step, llama.lm_head.output[0, -1].argmax())
        ids = tracer.result.save()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"step {k} {ids[0, -3 + k]!s}" for k in range(3)]


def test_stop_inside_a_step_ends_the_generation(llama) -> None:
    seen = []
    with llama.generate(P1, max_new_tokens=6) as tracer:
        for step in tracer.all():
            seen.append(llama.lm_head.output[0, -1].save())
            if step == 1:
                tracer.stop()
    # The loop is recorded to its end; what comes after the stop does not run and has no value.
    assert [type(v) is torch.Tensor for v in seen] == [True, True, False, False, False, False]
    with pytest.raises(TracingError, match="stopped before reaching it"):
        _ = seen[2].value


def test_a_generation_ended_by_eos_keeps_the_steps_that_ran(llama) -> None:
    """As in nnsight: a step loop longer than the generation ends with the last step that ran,
    keeping what it saved; no error. (EOS is forced at step 1 by an edit.)"""
    eos = llama.local_module.generation_config.eos_token_id
    seen = []
    with llama.generate(P1, max_new_tokens=6) as tracer:
        for step in tracer.all():
            logits = llama.lm_head.output
            if step == 1:
                logits[:, -1, eos] = 1e4
            seen.append(logits[0, -1].argmax().save())
    ran = [v for v in seen if type(v) is torch.Tensor]
    assert len(ran) == 2 and int(ran[-1]) == eos  # steps 2-5 never happened: no values, no error


# -- 3. invokes with generate ---------------------------------------------------------------------


def test_invokes_and_an_inputless_invoke_match_nnsight(case, nnsight_mounted) -> None:
    path, model = case
    vector = vector_for(model)
    n = 4
    out = {}
    with model.generate(max_new_tokens=n) as tracer:
        with tracer.invoke(P1):
            for _ in tracer.iter[0:n]:
                layers(model)[1].output[:, -1] += vector
        with tracer.invoke(SHORT):
            out["second"] = layers(model)[1].output.save()
        with tracer.invoke():
            out["all"] = model.lm_head.output.save()
            out["ids"] = tracer.result.save()
    want = oracle.generate_invokes(path, [P1, SHORT], n, 1, vector)
    assert same(out["second"], want["second"]) and same(out["all"], want["all"])
    assert torch.equal(out["ids"], want["ids"])
    assert out["ids"].shape[0] == 2  # the input-less invoke saw the whole batch


def test_each_invoke_edits_only_its_rows(llama) -> None:
    vector = vector_for(llama)
    with llama.generate(max_new_tokens=N) as tracer:
        with tracer.invoke(SHORT):
            for _ in tracer.all():
                llama.model.layers[2].output[:, -1] += vector
        with tracer.invoke(P1):
            pass
        with tracer.invoke():
            ids = tracer.result.save()

    def steer_row0(module, args, output):
        output[0, -1] += vector
        return output

    block = llama.local_module.model.layers[2]
    want = hf_generate(llama, [SHORT, P1], N, hook=(block, steer_row0))
    assert torch.equal(ids, want)
    alone = hf_generate(llama, [SHORT, P1], N)
    assert torch.equal(ids[1], alone[1]) and not torch.equal(ids[0], alone[0])


def test_inputless_invoke_in_a_trace_sees_the_whole_batch(llama) -> None:
    with llama.trace() as tracer:
        with tracer.invoke(P1):
            a = llama.lm_head.output.save()
        with tracer.invoke(SHORT):
            b = llama.lm_head.output.save()
        with tracer.invoke():
            both = llama.lm_head.output.save()
    assert both.shape[0] == 2 and torch.equal(both[0], a[0]) and torch.equal(both[1], b[0])


# -- 4. tracer.result of a trace -------------------------------------------------------------------


def test_trace_result_matches_nnsight(case, nnsight_mounted) -> None:
    path, model = case
    with model.trace(SHORT) as tracer:
        logits = tracer.result.logits.save()
        last = tracer.result.logits[:, -1].argmax(dim=-1).save()
    want = oracle.trace_result(path, SHORT)
    assert same(logits, want["logits"]) and torch.equal(last, want["last"])


# -- 6. errors before model time -------------------------------------------------------------------


def test_iter_outside_generate_names_the_line(llama) -> None:
    with pytest.raises(TracingError, match="tracer.iter") as info, llama.trace(P1) as tracer:
        for _ in tracer.iter[0:2]:  # the line
            pass
    assert info.value.location[2].strip() == "for _ in tracer.iter[0:2]:  # the line"


def test_a_step_past_max_new_tokens_names_the_line(llama) -> None:
    with pytest.raises(TracingError, match="max_new_tokens=3") as info, llama.generate(P1, max_new_tokens=3) as tracer:
        for _ in tracer.iter[[1, 5]]:  # the line
            pass
    assert info.value.location[2].strip() == "for _ in tracer.iter[[1, 5]]:  # the line"


def test_unsupported_generate_argument_is_refused(llama) -> None:
    with pytest.raises(client_sdk.InterventionError, match="num_beams"), \
            llama.generate(P1, max_new_tokens=3, num_beams=2) as tracer:
        tracer.result.save()


def test_eos_token_id_must_be_token_ids(llama) -> None:
    for bad in ("2", -1, [], [1, "x"], 1.5):
        with pytest.raises(client_sdk.InterventionError, match="eos_token_id must be a token id"), \
                llama.generate(P1, max_new_tokens=3, eos_token_id=bad) as tracer:
            tracer.result.save()
    with llama.generate(P1, max_new_tokens=3, eos_token_id=[0, 1]) as tracer:  # a list is fine
        out = tracer.result.save()
    assert out.shape[0] == 1


# -- 5. gradients ----------------------------------------------------------------------------------


def test_gradients_and_attribution_match_nnsight(case, nnsight_mounted) -> None:
    path, model = case
    blocks = layers(model)
    with model.trace(P1):
        h = blocks[1].output
        m = blocks[2].mlp.output
        loss = model.lm_head.output[0, -1].max()
        with loss.backward():
            g_m = m.grad.save()
            g_h = h.grad.save()
        attr = (h * g_h).sum(-1).save()
    want = oracle.attribution(path, P1, 1)
    assert same(g_h, want["g_h"]) and same(g_m, want["g_m"]) and same(attr, want["attr"].detach())
    assert not g_h.requires_grad and not attr.requires_grad  # plain tensors come back
    assert all(p.grad is None for p in model.local_module.parameters())  # no weight gradients


def test_gradient_is_what_autograd_gives_with_hooks(llama) -> None:
    with llama.trace(P1):
        h = llama.model.layers[2].output
        h.requires_grad_()  # accepted (gradients of read values need no flag)
        loss = llama.lm_head.output[0, -1].softmax(dim=-1)[42]
        with loss.backward():
            g = h.grad.save()

    kept = {}

    def keep(module, args, output):
        output = output.detach().requires_grad_()
        kept["h"] = output
        return output

    module = llama.local_module
    handle = module.model.layers[2].register_forward_hook(keep)
    try:
        with torch.enable_grad():
            out = module(**llama.tokenizer(P1, return_tensors="pt"))
            out.logits[0, -1].softmax(dim=-1)[42].backward()
    finally:
        handle.remove()
    assert torch.allclose(g, kept["h"].grad, atol=1e-7)


def test_gradient_per_invoke_and_in_a_session(llama) -> None:
    with llama.session():
        with llama.trace() as tracer:
            with tracer.invoke(P1):
                h1 = llama.model.layers[1].output
            with tracer.invoke(SHORT):
                h2 = llama.model.layers[1].output
            with tracer.invoke():
                loss = llama.lm_head.output[:, -1].max(dim=-1).values.sum()
                with loss.backward():
                    g1, g2 = h1.grad.save(), h2.grad.save()
                    direction = h1.grad[0, -1]  # not saved: used by the next trace
        with llama.trace(SHORT):
            llama.model.layers[1].output[0, -1] += direction
            steered = llama.lm_head.output[0, -1].save()
    assert g1.shape[0] == 1 and g2.shape[0] == 1 and not torch.equal(g1, g2)
    with llama.trace(SHORT):
        plain = llama.lm_head.output[0, -1].save()
    assert not torch.equal(steered, plain)


def test_gradient_errors_name_the_line(llama) -> None:
    with pytest.raises(TracingError, match="inside `with loss.backward") as info, llama.trace(P1):
        llama.model.layers[1].output.grad.save()  # the line
    assert info.value.location[2].endswith("# the line")
    with pytest.raises(TracingError, match="not in a generation"), llama.generate(P1, max_new_tokens=2):
        llama.lm_head.output.sum().backward()
    with pytest.raises(client_sdk.ExecutionError, match="has no gradient") as info, llama.trace(P1):
        early = llama.model.layers[0].output
        late = llama.model.layers[1].output
        loss = early.sum()
        with loss.backward():
            early.grad.save()
            late.grad.save()  # the line: the loss does not depend on it
    assert info.value.code == "no_gradient"
    assert info.value.location[2].endswith("# the line: the loss does not depend on it")
    with pytest.raises(client_sdk.ExecutionError, match="nothing to backpropagate"), llama.trace(P1):
        early = llama.model.layers[0].output
        late = llama.model.layers[1].output
        with early.sum().backward():  # frozen weights, no tracked value before it: no graph
            late.grad.save()


# -- module.skip -----------------------------------------------------------------------------------


def test_skip_matches_nnsight(case, nnsight_mounted) -> None:
    path, model = case
    block = layers(model)[1]
    with model.trace(P1):
        block.skip(block.input)
        logits = model.lm_head.output.save()
    with model.trace(P1):
        plain = model.lm_head.output.save()
    assert same(logits, oracle.skip(path, P1, 1)) and not torch.equal(logits, plain)


def test_skip_in_one_invoke_touches_only_its_rows(llama) -> None:
    block = llama.model.layers[1]
    with llama.trace() as tracer:
        with tracer.invoke(P1):
            block.skip(block.input)
            skipped = llama.lm_head.output.save()
        with tracer.invoke(P1):
            kept = llama.lm_head.output.save()
    with llama.trace(P1):
        block.skip(block.input)
        alone = llama.lm_head.output.save()
    with llama.trace(P1):
        plain = llama.lm_head.output.save()
    assert torch.allclose(skipped, alone, atol=1e-6) and torch.allclose(kept, plain, atol=1e-6)


# -- tracer.cache ----------------------------------------------------------------------------------


def test_cache_matches_nnsight(case, nnsight_mounted) -> None:
    path, model = case
    blocks = layers(model)
    with model.trace(P1) as tracer:
        cache = tracer.cache(modules=[blocks[1], model.lm_head], include_inputs=True)
        blocks[1].output[:, -1] = 0
    want = oracle.cache(path, P1, 1)
    name = _path(model, 1)
    assert same(cache[name].output, want["block"]) and same(cache[name].input, want["block_input"])
    assert same(cache["lm_head"].output, want["head"])
    assert bool((cache[name].output[:, -1] == 0).all())  # after the edit


def test_cache_everything_and_per_step(llama) -> None:
    with llama.trace(P1) as tracer:
        cache = tracer.cache()
        logits = llama.lm_head.output.save()
    assert "model.layers.3.mlp" in cache and torch.equal(cache.lm_head.output, logits)
    assert torch.equal(cache.model.layers[0].output, cache["model.layers.0"].output)
    with llama.generate(P1, max_new_tokens=3) as tracer:
        steps = tracer.cache(modules=["lm_head"])
        ids = tracer.result.save()
    assert len(steps["lm_head"]) == 3
    assert [int(o[0, -1].argmax()) for o in steps["lm_head"].output] == ids[0, -3:].tolist()


def test_a_step_read_after_a_later_step_is_refused_before_model_time(llama) -> None:
    refused = pytest.raises(client_sdk.ValidationError, match="step 0 is accessed after step 2")
    with refused as info, llama.generate(P1, max_new_tokens=3) as tracer:
        for _ in tracer.all():
            llama.lm_head.output.save()
        llama.model.layers[0].output.save()  # the line: binds to step 0
    assert info.value.code == "out_of_order" and info.value.location[2].endswith("# the line: binds to step 0")


def test_cancel_stops_a_generation_within_a_step(llama) -> None:
    """The cancel flag is checked at every decoder layer, in every step."""
    import threading

    from intervention.engine import run_trace
    from intervention.errors import Cancelled

    with client_sdk.tracing.recording() as graph, llama.generate(P1, max_new_tokens=50) as tracer:
        for step in tracer.all():
            client_sdk.log(step)
    trace, cancel, logged = graph.session_ir().traces[0], threading.Event(), []

    def on_log(message: str) -> None:
        logged.append(message)
        if message == "2":
            cancel.set()

    with pytest.raises(Cancelled):
        run_trace(llama.local_module, trace, llama.tokenizer, on_log=on_log, cancel=cancel)
    assert logged == ["0", "1", "2"]
