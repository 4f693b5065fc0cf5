"""Remote = local: every experiment run on the real local cluster (remote=True) gives the values the
same code gives locally on the same weights, and only saved values come back.

The local side runs with one torch thread: the replicas run with one (Ray gives a `num_cpus: 0`
actor OMP_NUM_THREADS=1), and a different thread count may change the last bit of a float sum.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from remote_helpers import (
    P1,
    P2,
    P3,
    api,
    no_leftover_requests,  # noqa: F401 - a fixture used below
    one_thread,
    record,
    slow_traces,
)

import client_sdk
from client_sdk import LanguageModel, TracingError
from intervention.wire import decode_result

pytestmark = pytest.mark.usefixtures("remote_client", "no_leftover_requests")


@pytest.fixture(scope="module")
def local(tiny_llama_path, tiny_gpt2_path) -> SimpleNamespace:
    return SimpleNamespace(
        llama=LanguageModel(str(tiny_llama_path)),
        gpt2=LanguageModel(str(tiny_gpt2_path)),
        remote=False,
    )


@pytest.fixture(scope="module")
def served(cluster) -> SimpleNamespace:
    """The same models by their served names: tree, config and tokenizer come from the server."""
    return SimpleNamespace(llama=LanguageModel("llama"), gpt2=LanguageModel("gpt2"), remote=True)


def same(a: Any, b: Any, path: str = "") -> None:
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, (
            f"{path}: {a.shape}/{a.dtype} != {b.shape}/{b.dtype}"
        )
        assert torch.equal(a, b), f"{path}: max diff {(a.float() - b.float()).abs().max().item()}"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def parity(
    exp: Callable[[SimpleNamespace], dict], local: SimpleNamespace, served: SimpleNamespace
) -> dict:
    """Run `exp` locally and remotely, check both give the same values; return the remote ones."""
    with one_thread():
        want = exp(local)
    got = exp(served)
    for name, value in got.items():
        if isinstance(want[name], torch.Tensor):
            assert isinstance(value, torch.Tensor), f"{name} came back as {type(value).__name__}"
    same(got, want)
    return got


# -- the experiments -------------------------------------------------------------------------------


def test_read_layer_output(local, served) -> None:
    def exp(m):
        with m.llama.trace(P1, remote=m.remote):
            h = m.llama.model.layers[2].output.save()
            shape = m.llama.model.layers[2].output.shape.save()
            logits = m.llama.lm_head.output.save()
        return {"h": h, "logits": logits, "shape": tuple(shape)}

    got = parity(exp, local, served)
    assert got["h"].shape == (1, 8, 64) and got["shape"] == (1, 8, 64)


def test_read_gpt2(local, served) -> None:
    def exp(m):
        with m.gpt2.trace(P2, remote=m.remote):
            h = m.gpt2.transformer.h[-1].output.save()
            logits = m.gpt2.lm_head.output.save()
        return {"h": h, "logits": logits}

    parity(exp, local, served)


def test_patch_with_a_client_tensor(local, served) -> None:
    patch = torch.randn(64, generator=torch.Generator().manual_seed(3))

    def exp(m):
        with m.llama.trace(P1, remote=m.remote):
            m.llama.model.layers[1].output[:, -1, :] = patch
            logits = m.llama.lm_head.output.save()
        with m.llama.trace(P1, remote=m.remote):
            clean = m.llama.lm_head.output.save()
        return {"logits": logits, "clean": clean}

    got = parity(exp, local, served)
    assert not torch.equal(got["logits"], got["clean"])  # the patch changed something


def test_seed_experiment(local, served) -> None:
    """A value of trace 1 is used by trace 2 without being saved: it never reaches the client."""
    unsaved = {}

    def exp(m):
        lm = m.llama
        with lm.session(remote=m.remote):
            with lm.trace(P1):
                hs = lm.model.layers[-1].output[:, -1, :]
                t1 = lm.lm_head.output.argmax(dim=-1).save()
            with lm.trace(P2):
                lm.model.layers[1].output[:, -1, :] = hs
                logits2 = lm.lm_head.output.save()
                t2 = lm.lm_head.output.argmax(dim=-1).save()
        unsaved[m.remote] = hs
        return {"t1": t1, "t2": t2, "logits2": logits2}

    got = parity(exp, local, served)
    assert got["t1"].dtype == torch.long and got["t2"].shape == (1, 7)
    hs = unsaved[True]
    assert isinstance(hs, client_sdk.Proxy)
    with pytest.raises(TracingError):
        hs.value  # noqa: B018 - not saved: no value on the client


def test_steering_with_a_client_vector(local, served) -> None:
    steer = torch.randn(64, generator=torch.Generator().manual_seed(4)) * 2

    def exp(m):
        with m.llama.trace(P1, remote=m.remote):
            layer = m.llama.model.layers[2]
            layer.output = layer.output + steer
            logits = m.llama.lm_head.output.save()
        with m.llama.trace(P1, remote=m.remote):
            m.llama.model.layers[1].output[:, -1, :] += steer
            added = m.llama.lm_head.output.save()
        return {"logits": logits, "added": added}

    parity(exp, local, served)


def test_in_place_ablation(local, served) -> None:
    k = 7

    def exp(m):
        with m.llama.trace(P1, remote=m.remote):
            m.llama.model.layers[0].output[..., k] = 0
            h0 = m.llama.model.layers[0].output.save()
            logits = m.llama.lm_head.output.save()
        return {"h0": h0, "logits": logits}

    got = parity(exp, local, served)
    assert torch.all(got["h0"][..., k] == 0)


def test_logit_lens_over_all_layers_in_one_trace(local, served) -> None:
    def exp(m):
        lm = m.llama
        with lm.trace(P1, remote=m.remote):
            lens = [lm.lm_head(lm.model.norm(layer.output)).save() for layer in lm.model.layers]
            probs = [F.softmax(x[:, -1], dim=-1).save() for x in lens]
            logits = lm.lm_head.output.save()
        return {"lens": lens, "probs": probs, "logits": logits}

    got = parity(exp, local, served)
    assert len(got["lens"]) == 4
    assert torch.equal(got["lens"][-1], got["logits"])


def test_invokes(local, served) -> None:
    def exp(m):
        lm = m.llama
        with lm.trace(remote=m.remote) as tracer:
            with tracer.invoke(P1):
                h = lm.model.layers[1].output[:, -1, :]
                a = lm.lm_head.output.save()
            with tracer.invoke(P3):
                lm.model.layers[1].output[:, -1, :] = h  # from the other invoke's rows
                b = lm.lm_head.output.save()
            with tracer.invoke("Paris"):  # shorter: left-padded
                c = lm.lm_head.output[:, -1].save()
            everything = lm.lm_head.output.shape.save()
        return {"a": a, "b": b, "c": c, "shape": tuple(everything)}

    got = parity(exp, local, served)
    assert got["a"].shape[0] == got["b"].shape[0] == 1 and got["shape"][0] == 3


def test_trace_on_a_list_of_prompts(local, served) -> None:
    def exp(m):
        lm = m.llama
        with lm.trace([P1, P2, P3], remote=m.remote):
            lm.model.layers[1].output[:, -1, :3] = 0
            logits = lm.lm_head.output.save()
            last = lm.lm_head.output[:, -1].argmax(dim=-1).save()
        return {"logits": logits, "last": last}

    got = parity(exp, local, served)
    assert got["logits"].shape[0] == 3


def test_tracer_stop(local, served) -> None:
    after = {}

    def exp(m):
        lm = m.llama
        with lm.trace(P1, remote=m.remote) as tracer:
            h0 = lm.model.layers[0].output.save()
            tracer.stop()
            logits = lm.lm_head.output.save()
        after[m.remote] = logits
        return {"h0": h0}

    parity(exp, local, served)
    with pytest.raises(TracingError, match="stopped before reaching it"):
        after[True].value  # noqa: B018


def test_session_stop(local, served) -> None:
    after = {}

    def exp(m):
        lm = m.llama
        with lm.session(remote=m.remote) as session:
            with lm.trace(P1):
                first = lm.lm_head.output.save()
            with lm.trace(P2):
                h = lm.model.layers[0].output.save()
                session.stop()
                never = lm.lm_head.output.save()
            with lm.trace(P3):
                third = lm.lm_head.output.save()
        after[m.remote] = (never, third)
        return {"first": first, "h": h}

    parity(exp, local, served)
    never, third = after[True]
    assert isinstance(never, client_sdk.Proxy) and isinstance(third, client_sdk.Proxy)
    with pytest.raises(TracingError):
        third.value  # noqa: B018


def test_cross_model_session(local, served) -> None:
    """A hidden state of the llama deployment patched into the gpt2 deployment (both 64 wide)."""

    def exp(m):
        with client_sdk.session(remote=m.remote):
            with m.llama.trace(P1):
                hs = m.llama.model.layers[-1].output[:, -1, :]
                scale = m.llama.lm_head.output[0, -1].softmax(dim=-1).max()
            with m.gpt2.trace(P2):
                m.gpt2.transformer.h[1].output[:, -1, :] = hs * scale
                logits = m.gpt2.lm_head.output.save()
            with m.gpt2.trace(P2):
                clean = m.gpt2.lm_head.output.save()
        return {"logits": logits, "clean": clean}

    got = parity(exp, local, served)
    assert not torch.equal(got["logits"], got["clean"])


# -- logs ------------------------------------------------------------------------------------------


def test_logs_print_in_order_before_the_block_ends(local, served, capsys) -> None:
    def exp(m):
        lm = m.llama
        with lm.session(remote=m.remote):
            with lm.trace(P1):
                client_sdk.log("start")
                h = lm.model.layers[0].output
                client_sdk.log("layer0", h[0, -1, 0])
                t = lm.lm_head.output[0, -1].argmax().save()
                client_sdk.log("token", t, "of", 803)
            with lm.trace(P2):
                client_sdk.log("second trace")
            print("end of the session block")
        print("after")
        return {"t": t}

    with one_thread():
        exp(local)
    want = capsys.readouterr().out.splitlines()
    exp(served)
    got = capsys.readouterr().out.splitlines()
    assert want[0] == "end of the session block" and want[-1] == "after" and len(want) == 6
    assert got == want


def test_log_events_arrive_in_order_before_completed(served, remote_client) -> None:
    lm = served.llama

    def body():
        with lm.trace(P1):
            client_sdk.log("one")
            client_sdk.log("two", lm.model.layers[0].output[0, -1, 0])
            client_sdk.log("three")
        with lm.trace(P2):
            client_sdk.log("four")

    with api(remote_client.url, remote_client.keys["alice"]) as a:
        rid = a.submit(record(body))
        events = list(a.events(rid))
    kinds = [k for k, _ in events]
    assert kinds[0] == "RECEIVED" and kinds[-1] == "COMPLETED", kinds
    logs = [d["message"] for k, d in events if k == "LOG"]
    assert [m.split()[0] for m in logs] == ["one", "two", "three", "four"]
    running = [i for i, (k, _) in enumerate(events) if k == "RUNNING"]
    assert [events[i][1]["trace"] for i in running] == [1, 2] and events[running[0]][1]["of"] == 2
    log_at = [i for i, (k, _) in enumerate(events) if k == "LOG"]
    assert running[0] < log_at[0] < log_at[2] < running[1] < log_at[3] < len(events) - 1


# -- non-blocking ----------------------------------------------------------------------------------


def test_non_blocking_session_result_rebinds_names(local, served) -> None:
    lm = served.llama
    with lm.session(remote=True, blocking=False) as session:
        with lm.trace(P1):
            hs = lm.model.layers[-1].output[:, -1, :]
            t1 = lm.lm_head.output.argmax(dim=-1).save()
        with lm.trace(P2):
            lm.model.layers[1].output[:, -1, :] = hs
            logits = lm.lm_head.output.save()
    assert isinstance(session.id, str) and session.id
    assert isinstance(t1, client_sdk.Proxy)  # no value before result()
    status = session.status()
    assert status["id"] == session.id and status["traces"] == 2
    assert status["state"] in ("RECEIVED", "QUEUED", "RUNNING", "COMPLETED")
    session.result()
    assert isinstance(t1, torch.Tensor) and isinstance(logits, torch.Tensor)
    assert session.status()["state"] == "COMPLETED"

    with one_thread(), local.llama.session():
        with local.llama.trace(P1):
            lhs = local.llama.model.layers[-1].output[:, -1, :]
            lt1 = local.llama.lm_head.output.argmax(dim=-1).save()
        with local.llama.trace(P2):
            local.llama.model.layers[1].output[:, -1, :] = lhs
            llogits = local.llama.lm_head.output.save()
    same([t1, logits], [lt1, llogits])


def test_non_blocking_trace(served) -> None:
    lm = served.gpt2
    with lm.trace(P1, remote=True, blocking=False) as tracer:
        logits = lm.lm_head.output.save()
    values = tracer.result()
    assert isinstance(logits, torch.Tensor) and logits.shape[:2] == (1, 8)
    assert any(torch.equal(v, logits) for v in values.values() if isinstance(v, torch.Tensor))


def test_non_blocking_cancel(served, remote_client) -> None:
    lm = served.llama
    with lm.session(remote=True, blocking=False) as session:
        slow_traces(lm, 60)
        with lm.trace(P1):
            last = lm.lm_head.output.save()
    with api(remote_client.url, remote_client.keys["alice"]) as a:
        a.wait_for(session.id, lambda k, d: k == "RUNNING")
        session.cancel()
        assert a.end(session.id)[0] == "CANCELLED"
    assert session.status()["state"] == "CANCELLED"
    with pytest.raises(client_sdk.InterventionError, match="cancelled"):
        session.result()
    assert isinstance(last, client_sdk.Proxy)
    # the replica keeps serving
    with lm.trace(P1, remote=True):
        ok = lm.lm_head.output.save()
    assert isinstance(ok, torch.Tensor)


def test_result_download_is_the_saved_values_only(served, remote_client) -> None:
    """RemoteRequest.fetch downloads a safetensors file of the saves: decode it by hand."""
    lm = served.llama
    with lm.trace(P1, remote=True, blocking=False) as tracer:
        x = lm.model.layers[0].output[0, -1].save()
    with api(remote_client.url, remote_client.keys["alice"]) as a:
        assert a.end(tracer.id)[0] == "COMPLETED"
        r = a.result(tracer.id)
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        values, _ = decode_result(r.content)
    assert [v.shape for v in values.values()] == [(64,)]
    tracer.result()  # the client can still fetch it (kept for a grace period after a fetch)
    assert torch.equal(x, next(iter(values.values())))
