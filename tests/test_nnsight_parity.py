"""raysight gives nnsight 0.8.1's answers: the same experiments on the same tiny models.

The nnsight side lives in `nnsight_oracle.py` (nnsight re-reads the source of its `with` blocks,
so it must be a real file). Both load the same folder, so the weights are identical.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import nnsight_oracle as oracle  # tests/ is on sys.path under pytest; imports nnsight lazily
import pytest
import torch

import client_sdk
from client_sdk import LanguageModel

if importlib.util.find_spec("nnsight") is None:  # checked without importing it (see the oracle)
    pytest.skip("nnsight is not installed", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _nnsight_mount() -> Iterator[None]:
    with oracle.save_mounted():
        yield

P1 = "The Eiffel Tower is in the city of"
P2 = "Buckingham Palace is in the city of"
SHORT = "Paris"


def same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal up to float reordering: two libraries, two forward passes of the same weights."""
    return x.shape == y.shape and x.dtype == y.dtype and torch.allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def case(request: pytest.FixtureRequest) -> tuple[str, LanguageModel]:
    path = str(request.getfixturevalue(f"tiny_{request.param}_path"))
    return path, LanguageModel(path)


def layers(model: LanguageModel):
    """Decoder layers of Llama (`model.layers`) or GPT-2 (`transformer.h`)."""
    return model.transformer.h if "transformer" in model.module_tree["children"] else model.model.layers


def norm(model: LanguageModel):
    return model.transformer.ln_f if "transformer" in model.module_tree["children"] else model.model.norm


def test_seed_experiment(case) -> None:
    path, model = case
    with model.session():
        with model.trace(P1):
            hs = layers(model)[-1].output[:, -1, :]
            t1 = model.lm_head.output.argmax(dim=-1).save()
        with model.trace(P2):
            layers(model)[1].output[:, -1, :] = hs
            logits2 = model.lm_head.output.save()
    want_t1, want_logits2 = oracle.seed_experiment(path, P1, P2)
    assert torch.equal(t1, want_t1)
    assert same(logits2, want_logits2)
    assert torch.equal(logits2.argmax(dim=-1), want_logits2.argmax(dim=-1))


def test_steering(case) -> None:
    path, model = case
    vector = torch.randn(64, generator=torch.Generator().manual_seed(7)) * 3
    with model.trace(P1):
        block = layers(model)[2]
        block.output = block.output + vector
        logits = model.lm_head.output.save()
    assert same(logits, oracle.steering(path, P1, 2, vector))


def test_invokes_with_padding_and_an_edit(case) -> None:
    path, model = case
    saved = []
    with model.trace() as tracer:
        for i, prompt in enumerate([P1, SHORT, P2]):
            with tracer.invoke(prompt):
                if i == 0:
                    layers(model)[1].output[:, -1, :] = 0
                saved.append((layers(model)[1].output.save(), model.lm_head.output.save()))
    want = oracle.invokes(path, [P1, SHORT, P2], 1)
    assert len(saved) == len(want) == 3
    for (h, logits), (want_h, want_logits) in zip(saved, want, strict=True):
        assert same(h, want_h) and same(logits, want_logits)


def test_logit_lens(case) -> None:
    path, model = case
    with model.trace(P2):
        lens = [model.lm_head(norm(model)(block.output)).save() for block in layers(model)]
    want = oracle.logit_lens(path, P2)
    assert len(lens) == len(want) == 4
    for got, expected in zip(lens, want, strict=True):
        assert same(got, expected)


def test_logs_match_nnsight_prints(case, capsys: pytest.CaptureFixture) -> None:
    """nnsight has no log(); raysight's log prints what print() would inside an nnsight trace."""
    path, model = case
    with model.trace(P1):
        client_sdk.log("top", model.lm_head.output[0, -1].argmax())
    want_t1, _ = oracle.seed_experiment(path, P1, P2)
    assert capsys.readouterr().out == f"top {want_t1[0, -1]!s}\n"  # print("top", x) in nnsight
