"""Generation on the real local cluster (issue 10): remote = local, value for value and token for
token — greedy and seeded sampling, per-step reads and edits, invokes of different lengths, an
input-less invoke, `tracer.result` of traces and generations, logs in step order, and the
per-model max_new_tokens cap refused at the user's line before any model time.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from remote_helpers import P1, no_leftover_requests, one_thread  # noqa: F401 - a fixture

import client_sdk
from client_sdk import LanguageModel

pytestmark = pytest.mark.usefixtures("remote_client", "no_leftover_requests")

SHORT = "Paris"


@pytest.fixture(scope="module")
def local(tiny_llama_path) -> SimpleNamespace:
    return SimpleNamespace(llama=LanguageModel(str(tiny_llama_path)), remote=False)


@pytest.fixture(scope="module")
def served(cluster) -> SimpleNamespace:
    return SimpleNamespace(llama=LanguageModel("llama"), remote=True)


def same(a: Any, b: Any, path: str = "") -> None:
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def parity(exp, local: SimpleNamespace, served: SimpleNamespace) -> dict:
    with one_thread():
        want = exp(local)
    got = exp(served)
    same(got, want)
    return got


def test_greedy_and_per_step_reads_and_edits(local, served) -> None:
    vector = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 2

    def exp(m: SimpleNamespace) -> dict:
        llama = m.llama
        reads, tokens = [], {}
        with llama.generate(P1, max_new_tokens=6, remote=m.remote) as tracer:
            first = llama.model.layers[0].output.save()
            for step in tracer.all():
                if step < 3:
                    reads.append(llama.model.layers[1].output[:, -1].save())
                llama.model.layers[1].output[:, -1] += vector
                tokens[step] = llama.lm_head.output[0, -1].argmax().save()
            ids = tracer.result.save()
        return {"first": first, "reads": reads, "tokens": tokens, "ids": ids}

    got = parity(exp, local, served)
    assert len(got["reads"]) == 3 and sorted(got["tokens"]) == list(range(6))
    assert [int(t) for t in got["tokens"].values()] == got["ids"][0, -6:].tolist()


def test_sampling_with_a_seed(local, served) -> None:
    def exp(m: SimpleNamespace) -> dict:
        with m.llama.generate(P1, max_new_tokens=8, do_sample=True, top_k=50, seed=21, remote=m.remote) as tracer:
            ids = tracer.result.save()
        return {"ids": ids}

    parity(exp, local, served)


def test_invokes_of_different_lengths_and_an_inputless_invoke(local, served) -> None:
    vector = torch.randn(64, generator=torch.Generator().manual_seed(6)) * 2

    def exp(m: SimpleNamespace) -> dict:
        llama = m.llama
        with llama.generate(max_new_tokens=4, remote=m.remote) as tracer:
            with tracer.invoke(SHORT):
                for _ in tracer.all():
                    llama.model.layers[2].output[:, -1] += vector
            with tracer.invoke(P1):
                second = llama.model.layers[2].output.save()
            with tracer.invoke():
                everything = llama.lm_head.output.save()
                ids = tracer.result.save()
        return {"second": second, "all": everything, "ids": ids}

    got = parity(exp, local, served)
    assert got["ids"].shape[0] == 2 and got["all"].shape[0] == 2


def test_generate_in_a_session_and_trace_result(local, served) -> None:
    def exp(m: SimpleNamespace) -> dict:
        llama = m.llama
        with llama.session(remote=m.remote):
            with llama.trace(SHORT) as tracer:
                hs = llama.model.layers[1].output[:, -1]
                out = tracer.result.save()
                last = tracer.result.logits[:, -1].argmax(dim=-1).save()
            with llama.generate(P1, max_new_tokens=3) as tracer:
                llama.model.layers[1].output[:, -1] = hs
                ids = tracer.result.save()
        return {"logits": out.logits, "type": type(out).__name__, "last": last, "ids": ids}

    got = parity(exp, local, served)
    assert got["type"] == "CausalLMOutputWithPast"


def test_logs_in_step_order(local, served, capsys: pytest.CaptureFixture) -> None:
    def exp(m: SimpleNamespace) -> dict:
        with m.llama.generate(P1, max_new_tokens=3, remote=m.remote) as tracer:
            for step in tracer.all():
                client_sdk.log("step", step, m.llama.lm_head.output[0, -1].argmax())
        return {"out": capsys.readouterr().out.splitlines()}

    got = parity(exp, local, served)
    assert [line.split()[:2] for line in got["out"]] == [["step", str(k)] for k in range(3)]


def test_max_new_tokens_over_the_cap_is_refused_at_the_line(served) -> None:
    def too_long() -> None:
        with served.llama.generate(P1, max_new_tokens=300, remote=True) as tracer:  # the line
            tracer.result.save()

    with pytest.raises(client_sdk.InterventionError, match="max_new_tokens=300 exceeds") as info:
        too_long()
    assert info.value.code == "too_large"
    assert "# the line" in info.value.location[2]


def test_gradients_and_attribution_patching(local, served) -> None:
    def exp(m: SimpleNamespace) -> dict:
        llama = m.llama
        with llama.session(remote=m.remote):
            with llama.trace() as tracer:
                with tracer.invoke(P1):
                    h = llama.model.layers[1].output
                with tracer.invoke(SHORT):
                    pass
                with tracer.invoke():
                    loss = llama.lm_head.output[:, -1].max(dim=-1).values.sum()
                    with loss.backward():
                        grad = h.grad.save()
                        attr = (h * h.grad).sum(-1).save()
                        direction = h.grad[0, -1]  # stays in the cluster for the next trace
            with llama.trace(SHORT):
                llama.model.layers[1].output[0, -1] += direction
                steered = llama.lm_head.output[0, -1].save()
        return {"grad": grad, "attr": attr, "steered": steered}

    got = parity(exp, local, served)
    assert got["grad"].shape == (1, len(local.llama.tokenizer(P1)["input_ids"]), 64)


def test_skip(local, served) -> None:
    def exp(m: SimpleNamespace) -> dict:
        block = m.llama.model.layers[2]
        with m.llama.trace(P1, remote=m.remote):
            block.skip(block.input * 0.5)
            logits = m.llama.lm_head.output.save()
        return {"logits": logits}

    parity(exp, local, served)


def test_cache(local, served) -> None:
    def exp(m: SimpleNamespace) -> dict:
        llama = m.llama
        with llama.generate(P1, max_new_tokens=2, remote=m.remote) as tracer:
            cache = tracer.cache(modules=[llama.model.layers[1], llama.lm_head])
            llama.model.layers[1].output[:, -1] *= 2
        return {"layer": cache.model.layers[1].output, "head": cache["lm_head"].output}

    got = parity(exp, local, served)
    assert len(got["layer"]) == 2 and len(got["head"]) == 2
