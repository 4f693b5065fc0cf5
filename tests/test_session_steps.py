"""Logs and stops directly in a session body (outside any trace), locally and on the cluster.

The seed tutorial's second cell does exactly this: `log("-- Early Stop --"); stop()` in a session.
Session steps travel in the IR (`SessionIR.steps`) and run in the one session loop, between
segments, so local execution and the cluster's session runner give the same order of logs.
"""

from __future__ import annotations

import pytest
import torch

import client_sdk
from client_sdk import LanguageModel, TracingError
from intervention.errors import ValidationError
from intervention.ir import Invoke, Node, SessionIR, SessionStep, TraceIR, session_from_json
from intervention.plan import plan_session
from intervention.session import run_session
from intervention.validate import validate_session
from tests.remote_helpers import P1, P2, Api, record, rewrite

# -- the seed tutorial's second cell, with client_sdk in place of nnsight ----------------------


def seed_cell_2(model, remote):
    with model.session(remote=remote) as session:

      client_sdk.log("-- Early Stop --")  # the tutorial's indentation, verbatim
      client_sdk.stop()

    return session


def seed_cell_2_session_methods(model, remote):
    with model.session(remote=remote) as session:

      session.log("-- Early Stop --")
      session.stop()


@pytest.fixture
def local_llama(tiny_llama_path) -> LanguageModel:
    return LanguageModel(str(tiny_llama_path))


@pytest.fixture(params=["local", "remote"])
def where(request) -> tuple[LanguageModel, bool]:
    """(model, remote): the tiny Llama in this process, or the same model served by the cluster."""
    if request.param == "local":
        return LanguageModel(str(request.getfixturevalue("tiny_llama_path"))), False
    request.getfixturevalue("remote_client")
    return LanguageModel("llama"), True


def test_seed_cell_2_logs_and_stops(where, capsys) -> None:
    model, remote = where
    seed_cell_2(model, remote)
    assert capsys.readouterr().out.splitlines() == ["-- Early Stop --"]
    seed_cell_2_session_methods(model, remote)
    assert capsys.readouterr().out.splitlines() == ["-- Early Stop --"]


def test_session_logs_print_in_program_order(where, capsys) -> None:
    model, remote = where
    with model.session(remote=remote) as session:
        client_sdk.log("first, before any trace")
        with model.trace(P1):
            client_sdk.log("in trace 1")
        session.log("between", 1, "and", 2)
        with model.trace(P2):
            t2 = model.lm_head.output.argmax(dim=-1).save()
            client_sdk.log("in trace 2")
        client_sdk.log("last")
    assert capsys.readouterr().out.splitlines() == [
        "first, before any trace", "in trace 1", "between 1 and 2", "in trace 2", "last",
    ]
    assert t2.shape == (1, len(model.tokenizer(P2)["input_ids"]))


def test_a_session_stop_ends_the_session_there(where, capsys) -> None:
    model, remote = where
    with model.session(remote=remote):
        with model.trace(P1):
            t1 = model.lm_head.output.argmax(dim=-1).save()
        client_sdk.log("stopping")
        client_sdk.stop()
        client_sdk.log("never printed")
        with model.trace(P2):
            t2 = model.lm_head.output.save()
    assert capsys.readouterr().out.splitlines() == ["stopping"]
    assert isinstance(t1, torch.Tensor)  # what ran and was saved came back
    with pytest.raises(TracingError, match="did not run|not run|never"):
        t2.shape  # noqa: B018 - the trace after the stop did not run


def test_a_session_log_of_a_traced_value_says_where_to_log_it(local_llama) -> None:
    with pytest.raises(TracingError) as info, local_llama.session():
        with local_llama.trace(P1):
            hs = local_llama.model.layers[-1].output
        client_sdk.log("hs", hs)
    assert "inside that trace" in str(info.value)
    assert "test_session_steps.py" in str(info.value) and 'client_sdk.log("hs", hs)' in str(info.value)


def test_log_and_stop_outside_any_session_still_refuse(local_llama) -> None:
    with pytest.raises(TracingError, match="inside a trace or a session"):
        client_sdk.log("nowhere")
    with pytest.raises(TracingError, match="inside a trace or a session"):
        client_sdk.stop()


# -- the IR: the planner and the loop honour steps whoever drives them ------------------------


def _trace(model: str, first_id: int) -> TraceIR:
    out = Node(first_id, "module.output", ["lm_head", 0])
    return TraceIR(model=model, invokes=[Invoke(P1)], nodes=[out, Node(first_id + 1, "save", [{"$ref": first_id}])])


def test_steps_split_segments_and_a_stop_step_ends_the_loop(local_llama, capsys) -> None:
    session = SessionIR(
        traces=[_trace("m", 0), _trace("m", 2), _trace("m", 4)],
        steps=[SessionStep("log", 1, ["after", {"$tuple": [1]}]), SessionStep("stop", 2)],
    )
    plan = plan_session(session)
    assert [(s.first, len(s.traces)) for s in plan.segments] == [(0, 1), (1, 1), (2, 1)]
    loaded = []

    def load(name):
        loaded.append(name)
        return local_llama.local_module, local_llama.tokenizer

    outcome = run_session(plan, {}, load, on_log=print)
    assert outcome.traces_run == 2 and outcome.stopped == "session" and outcome.error is None
    assert set(outcome.saves) == {0, 2}
    assert capsys.readouterr().out.splitlines() == ["after (1,)"]


def test_steps_round_trip_the_wire(local_llama) -> None:
    from intervention.ir import session_to_json

    session = SessionIR(traces=[_trace("m", 0)], steps=[SessionStep("log", 0, ["x"], ("f.py", 3, "log('x')"))])
    assert session_from_json(session_to_json(session)) == session


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([SessionStep("log", 2)], "after trace 2 of 1"),
        ([SessionStep("log", 1), SessionStep("log", 0)], "out of program order"),
        ([SessionStep("log", 1, [{"$ref": 0}])], "inside that trace"),
        ([SessionStep("stop", 1, ["x"])], "takes no arguments"),
        ([SessionStep("log", 1, [{"$tensor": "nope"}])], "missing"),
        ([SessionStep("log", 1, [{"$eval": "x"}])], "malformed argument"),
    ],
)
def test_bad_steps_are_refused_at_their_line(steps, message) -> None:
    for step in steps:
        step.loc = ("user.py", 7, "client_sdk.log(...)")
    session = SessionIR(traces=[_trace("m", 0)], steps=steps)
    with pytest.raises(ValidationError, match=message) as info:
        validate_session(session, {}, {"m": {"lm_head"}})
    assert info.value.location == ("user.py", 7, "client_sdk.log(...)")


def test_a_session_of_steps_only_is_valid_and_unknown_step_ops_are_malformed() -> None:
    validate_session(SessionIR(steps=[SessionStep("log", 0, ["hi"])]), {}, {})
    with pytest.raises(ValidationError, match="no traces"):
        validate_session(SessionIR(), {}, {})
    bad = '{"version": 1, "traces": [], "steps": [{"op": "exec", "at": 0}]}'
    with pytest.raises(ValueError):
        session_from_json(bad)


# -- the cluster's session runner honours a stop step in IR it receives ---------------------------


def test_the_runner_stops_at_a_stop_step_and_sends_step_logs_in_order(remote_client) -> None:
    model = LanguageModel("llama")

    def body():
        with model.trace(P1):
            client_sdk.log("trace 1")
        with model.trace(P2):
            client_sdk.log("trace 2")

    # A client that sends every trace, with a stop between them (client_sdk itself sends only
    # the traces before a stop): the runner must not run trace 2.
    raw = rewrite(record(body), lambda s: s.__setitem__(
        "steps", [{"op": "log", "at": 1, "args": ["step"]}, {"op": "stop", "at": 1, "args": []}]
    ))
    api = Api(remote_client.url, remote_client.keys["alice"])
    try:
        request_id = api.submit(raw)
        events = list(api.events(request_id))
    finally:
        api.close()
    logs = [d["message"] for e, d in events if e == "LOG"]
    assert logs == ["trace 1", "step"]
    assert events[-1][0] == "COMPLETED" and events[-1][1]["traces_run"] == 1
