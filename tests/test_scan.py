"""Shape errors before model time: traces run on meta tensors before they run or are sent.

The seed tutorial's first cell, verbatim, fails here: it was written for a 80-layer model whose
decoder layers return tuples. Both of its mistakes on a small transformers-5 model — a layer index
out of range, `.output[0]` on a layer that returns a tensor — fail at the user's line without a
forward pass (locally the weights are never even loaded; remotely nothing is sent), the second
with a hint that says what to write instead.
"""

from __future__ import annotations

import pytest
import torch

import client_sdk
from client_sdk import CONFIG, ExecutionError, LanguageModel
from intervention.scan import _PROBES, record_events
from tests.remote_helpers import P1, P2

# -- the seed tutorial's first cell ------------------------------------------------------------


def seed_cell_1(model, remote):
    with model.session(remote=remote) as session:

      with model.trace("The Eiffel Tower is in the city of") as t1:  # the tutorial's indentation
        # capture the hidden state from layer 11 at the last token
        hs_79 = model.model.layers[79].output[0][:, -1, :] # no .save()
        t1_tokens_out = model.lm_head.output.argmax(dim=-1).save()

      with model.trace("Buckingham Palace is in the city of") as t2:
        model.model.layers[1].output[0][:, -1, :] = hs_79[:]
        t2_tokens_out = model.lm_head.output.argmax(dim=-1).save()

    print("\nT1 - Original Prediction: ", model.tokenizer.decode(t1_tokens_out[0][-1]))
    print("T2 - Modified Prediction: ", model.tokenizer.decode(t2_tokens_out[0][-1]))
    return session, t1, t2


def seed_cell_1_last_layer(model, remote):
    """The same cell with its layer index fitted to a 4-layer model (79 -> -1), nothing else."""
    with model.session(remote=remote) as session:

      with model.trace("The Eiffel Tower is in the city of") as t1:
        # capture the hidden state from layer 11 at the last token
        hs_79 = model.model.layers[-1].output[0][:, -1, :] # no .save()
        t1_tokens_out = model.lm_head.output.argmax(dim=-1).save()

      with model.trace("Buckingham Palace is in the city of") as t2:
        model.model.layers[1].output[0][:, -1, :] = hs_79[:]
        t2_tokens_out = model.lm_head.output.argmax(dim=-1).save()

    return session, t1, t2, t1_tokens_out, t2_tokens_out


def seed_cell_1_ported(model, remote):
    """The cell ported as the hint says: no [0] on a layer's output."""
    with model.session(remote=remote):
        with model.trace("The Eiffel Tower is in the city of"):
            hs_79 = model.model.layers[-1].output[:, -1, :]  # no .save()
            t1_tokens_out = model.lm_head.output.argmax(dim=-1).save()
        with model.trace("Buckingham Palace is in the city of"):
            model.model.layers[1].output[:, -1, :] = hs_79[:]
            t2_tokens_out = model.lm_head.output.argmax(dim=-1).save()
    return t1_tokens_out, t2_tokens_out


@pytest.fixture(autouse=True)
def check_local_sessions_too():
    """By default only remote sessions are checked (CONFIG.scan None); these tests check local
    sessions as well, as `CONFIG.scan = True` does."""
    saved, CONFIG.scan = CONFIG.scan, True
    yield
    CONFIG.scan = saved


def test_by_default_a_local_trace_is_left_to_the_model_run(tiny_llama_path) -> None:
    CONFIG.scan = None  # the default (the fixture restores it)
    model = LanguageModel(str(tiny_llama_path))
    with pytest.raises(ExecutionError) as info, model.trace(P1):
        model.lm_head.output[:, 100].save()  # bad index, found by the model run
    assert "IndexError" in str(info.value) and "before running the model" not in str(info.value)
    _at(info.value, "# bad index, found by the model run")
    assert model._module is not None  # the model ran


def test_the_model_run_gives_the_tuple_habit_hint_too(tiny_llama_path) -> None:
    CONFIG.scan = None  # the default: a local trace is not checked; the engine says it at run time
    model = LanguageModel(str(tiny_llama_path))
    with pytest.raises(ExecutionError) as info, model.trace(P1):
        h = model.model.layers[-1].output[0][:, -1, :].save()  # tuple habit, found by the run
    text = str(info.value)
    assert "IndexError" in text and "before running the model" not in text
    assert "write .output[:, -1, :] rather than .output[0][:, -1, :]" in text
    _at(info.value, "# tuple habit, found by the run")
    assert model._module is not None and h is not None  # the model ran


@pytest.fixture(params=["local", "remote"])
def where(request) -> tuple[LanguageModel, bool]:
    """(a fresh model, remote): the tiny Llama in this process, or the same model served."""
    if request.param == "local":
        return LanguageModel(str(request.getfixturevalue("tiny_llama_path"))), False
    request.getfixturevalue("remote_client")
    return LanguageModel("llama"), True


def _all_request_ids() -> set[str]:
    """Every request the cluster's store has seen (the test process is the Ray driver)."""
    import ray

    from actors.request_store import NAMESPACE, STORE_NAME

    def ids(store) -> list[str]:
        return [r for (r,) in store.db.db.execute("SELECT id FROM requests").fetchall()]

    return set(ray.get(ray.get_actor(STORE_NAME, namespace=NAMESPACE).__ray_call__.remote(ids)))


def _no_model_time(model: LanguageModel, remote: bool):
    """A check that nothing ran: locally the weights were never loaded, remotely nothing was sent."""
    before = _all_request_ids() if remote else None

    def check() -> None:
        if remote:
            assert _all_request_ids() == before, "a request was sent"
        else:
            assert model._module is None, "the model's weights were loaded"

    return check


def _at(err: BaseException, snippet: str) -> None:
    text = str(err)
    assert "test_scan.py" in text and snippet in text, text


def test_seed_cell_1_verbatim_fails_at_the_out_of_range_layer(where) -> None:
    model, remote = where
    nothing_ran = _no_model_time(model, remote)
    with pytest.raises(IndexError) as info:
        seed_cell_1(model, remote)
    assert "has 4 modules; index 79 is out of range" in str(info.value)
    _at(info.value, "hs_79 = model.model.layers[79].output[0][:, -1, :]")
    nothing_ran()


def test_seed_cell_1_tuple_habit_fails_before_model_time_with_a_hint(where) -> None:
    model, remote = where
    nothing_ran = _no_model_time(model, remote)
    with pytest.raises(ExecutionError) as info:
        seed_cell_1_last_layer(model, remote)
    text = str(info.value)
    assert "too many indices for tensor of dimension 2" in text and "before running the model" in text
    assert "is a tensor, not a tuple" in text
    assert "write .output[:, -1, :] rather than .output[0][:, -1, :]" in text
    assert info.value.code == "shape_error"
    _at(info.value, "hs_79 = model.model.layers[-1].output[0][:, -1, :]")
    nothing_ran()


def test_seed_cell_1_ported_runs_and_remote_equals_local(cluster, remote_client, tiny_llama_path) -> None:
    local = seed_cell_1_ported(LanguageModel(str(tiny_llama_path)), False)
    remote = seed_cell_1_ported(LanguageModel("llama"), True)
    for a, b in zip(local, remote, strict=True):
        assert torch.equal(a, b)


# -- what the check finds, and what it must not -------------------------------------------------


@pytest.fixture
def local_model(tiny_llama_path) -> LanguageModel:
    return LanguageModel(str(tiny_llama_path))


def test_a_shape_mismatch_in_an_edit_fails_at_its_line(local_model) -> None:
    nothing_ran = _no_model_time(local_model, False)
    with pytest.raises(ExecutionError) as info, local_model.trace(P1):
        h = local_model.model.layers[0].output
        h[:, -1, :] = h[:, :, :3]  # shape mismatch
    assert "must match" in str(info.value) and "hint" not in str(info.value)
    _at(info.value, "h[:, -1, :] = h[:, :, :3]  # shape mismatch")
    nothing_ran()


def test_a_patch_of_the_wrong_width_from_another_trace_fails_at_its_line(local_model) -> None:
    nothing_ran = _no_model_time(local_model, False)
    with pytest.raises(ExecutionError) as info, local_model.session():
        with local_model.trace(P1):
            hs = local_model.model.layers[-1].output[:, -1, :8]
        with local_model.trace(P2):
            local_model.model.layers[1].output[:, -1, :] = hs  # too narrow
    _at(info.value, "= hs  # too narrow")
    nothing_ran()


def test_bad_index_with_a_client_tensor_and_invokes(local_model) -> None:
    steer = torch.ones(64)
    with pytest.raises(ExecutionError) as info, local_model.trace() as tracer:
        with tracer.invoke(P1):
            local_model.model.layers[0].output[:, -1] += steer
        with tracer.invoke([P2, P1]):
            local_model.model.layers[2].output[:, :, 64] = 0  # out of range
    _at(info.value, "output[:, :, 64] = 0  # out of range")


def test_valid_traces_pass_and_give_the_unchecked_answer(local_model) -> None:
    """Nothing valid is refused: the same values with and without the check."""

    def experiment(scan: bool) -> list:
        with local_model.session(scan=scan):
            with local_model.trace() as tracer:
                with tracer.invoke(P1):
                    h = local_model.model.layers[1].output
                    h[:, -1, :] = h[:, -1, :] * 2 + torch.ones(64)
                    inp = local_model.model.layers[2].input.save()  # an input: not described
                with tracer.invoke([P2, P1]):
                    norm = local_model.model.norm.output
                    lens = local_model.lm_head(norm[:, -1]).softmax(-1).topk(3).indices.save()
                logits = local_model.lm_head.output.save()
                client_sdk.log("shape check passes")
            with local_model.trace(P2):
                local_model.model.layers[0].output[:, -1, :] = norm[0, -1]
                top = local_model.lm_head.output[0, -1].argmax().save()
        return [inp, lens, logits, top]

    with_check, without = experiment(True), experiment(False)
    for a, b in zip(with_check, without, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("how", ["trace", "session", "config"])
def test_opting_out_leaves_the_error_to_the_model_run(local_model, how) -> None:
    saved = CONFIG.scan
    try:
        if how == "config":
            CONFIG.scan = False
        with pytest.raises(ExecutionError) as info:
            if how == "session":
                with local_model.session(scan=False), local_model.trace(P1):
                    local_model.lm_head.output[:, 100].save()  # bad index
            else:
                with local_model.trace(P1, scan=how != "trace"):
                    local_model.lm_head.output[:, 100].save()  # bad index
    finally:
        CONFIG.scan = saved
    assert "IndexError" in str(info.value) and "before running the model" not in str(info.value)
    _at(info.value, "# bad index")
    assert local_model._module is not None  # the model ran


def test_recorded_events_describe_batch_and_length(local_model) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(local_model.name))
    events = dict(record_events(meta.eval()).events)
    assert events[("model.layers.0", "output", 0)].dims == ("B", "T", 64)
    assert events[("lm_head", "output", 0)].dims == ("B", "T", 803)
    assert len({b for b, _ in _PROBES}) == 2 and len({t for _, t in _PROBES}) == 2


@pytest.mark.parametrize("which", ["tiny_llama_path", "tiny_gpt2_path"])
def test_events_recorded_on_two_layers_equal_a_full_recording(request, which) -> None:
    """The first-use shortcut for deep models (record two layers, extend) changes nothing."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from client_sdk.scan import _events

    config = AutoConfig.from_pretrained(request.getfixturevalue(which))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config).eval()
    full = record_events(meta)
    short = _events(meta, config, {})
    assert len(short.events) == len(full.events) and short.events == full.events
    assert short.tensor_kinds == full.tensor_kinds and short.positions == full.positions
