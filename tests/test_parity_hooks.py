"""Every experiment run through client_sdk locally equals the same experiment hand-written with
PyTorch forward hooks on the same model, on tiny Llama and tiny GPT-2."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import client_sdk
from client_sdk import LanguageModel, TracingError

P1 = "The Eiffel Tower is in the city of"  # 8 tokens
P2 = "Buckingham Palace is in the city of"  # 7 tokens
P3 = "The Kremlin is in the city of"  # 8 tokens, like P1: batching needs no padding
SHORT = "Paris"  # 1 token: batched with P1 it is left-padded by 7


@dataclass
class Arch:
    """One tiny model: the SDK handle and the real module it runs, with per-architecture names."""

    name: str
    lm: LanguageModel

    @property
    def hf(self) -> torch.nn.Module:
        return self.lm.local_module

    def layers(self, root):  # works on envoys and on real modules: the names are the same
        return root.model.layers if self.name == "llama" else root.transformer.h

    def norm(self, root):
        return root.model.norm if self.name == "llama" else root.transformer.ln_f

    def batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded, each row's positions counted from its first token (nnsight's rule), so
        a padded prompt sees what it sees alone."""
        batch = dict(self.lm.tokenizer(prompts, return_tensors="pt", padding=True))
        mask = batch["attention_mask"]
        if not mask.all():
            batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        return batch


@pytest.fixture(scope="module")
def models(tiny_llama_path: Path, tiny_gpt2_path: Path) -> dict[str, Arch]:
    return {
        "llama": Arch("llama", LanguageModel(str(tiny_llama_path))),
        "gpt2": Arch("gpt2", LanguageModel(str(tiny_gpt2_path))),
    }


@pytest.fixture(params=["llama", "gpt2"])
def arch(request: pytest.FixtureRequest, models: dict[str, Arch]) -> Iterator[Arch]:
    yield models[request.param]
    _assert_clean(models.values())


def _assert_clean(archs) -> None:
    """The engine leaves no hooks behind and does not change grad mode."""
    assert torch.is_grad_enabled()
    for a in archs:
        if a.lm._module is None:
            continue
        for name, m in a.hf.named_modules():
            assert not _our_hooks(m), f"hook left on {name!r}"


def _our_hooks(module: torch.nn.Module) -> list:
    """Hooks on `module` not installed by transformers itself (it keeps output-capturing hooks
    for output_hidden_states once they are first needed)."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return [h for h in hooks if not getattr(h, "__module__", "").startswith("transformers.")]


@contextmanager
def hooks(*pairs: tuple[torch.nn.Module, Callable]) -> Iterator[None]:
    """Forward hooks for the reference implementation, removed on exit."""
    handles = [m.register_forward_hook(fn) for m, fn in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def forward(a: Arch, prompts: list[str], *pairs: tuple[torch.nn.Module, Callable]) -> torch.Tensor:
    """The reference: logits of a plain forward with hand-written hooks."""
    with hooks(*pairs), torch.no_grad():
        return a.hf(**a.batch(prompts)).logits


def capture(store: dict, key: str) -> Callable:
    def hook(module, args, output):
        store[key] = output.clone()

    return hook


def close(x: torch.Tensor, y: torch.Tensor) -> bool:
    """For results of different batch compositions (kernels may reorder sums); else torch.equal."""
    return x.shape == y.shape and torch.allclose(x, y, rtol=1e-5, atol=1e-6)


# -- reading ---------------------------------------------------------------------------------------


def test_read_layer_output(arch: Arch) -> None:
    with arch.lm.trace(P1):
        h = arch.layers(arch.lm)[2].output.save()
        logits = arch.lm.lm_head.output.save()
    ref: dict = {}
    expected = forward(arch, [P1], (arch.layers(arch.hf)[2], capture(ref, "h")))
    assert isinstance(h, torch.Tensor) and isinstance(logits, torch.Tensor)
    assert torch.equal(h, ref["h"])
    assert torch.equal(logits, expected)
    assert not h.requires_grad


def test_input_and_inputs(arch: Arch) -> None:
    with arch.lm.trace(P1):
        x = arch.layers(arch.lm)[1].input.save()
        prev = arch.layers(arch.lm)[1].inputs.save()
        unsaved = arch.layers(arch.lm)[1].input
    ref: dict = {}

    def pre(module, a, kw):
        ref["args"], ref["kwargs"] = a, kw

    handle = arch.layers(arch.hf)[1].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        forward(arch, [P1])
    finally:
        handle.remove()
    assert torch.equal(x, ref["args"][0])
    assert isinstance(prev, tuple) and len(prev) == 2
    args, kwargs = prev
    assert torch.equal(args[0], ref["args"][0])
    assert set(kwargs) == set(ref["kwargs"])
    for k, v in ref["kwargs"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(kwargs[k], v), k
    assert isinstance(unsaved, client_sdk.Proxy)  # unsaved: stays a proxy


def test_input_equals_previous_output(arch: Arch) -> None:
    with arch.lm.trace(P2):
        out0 = arch.layers(arch.lm)[0].output.save()
        in1 = arch.layers(arch.lm)[1].input.save()
    assert torch.equal(out0, in1)


def test_shape(arch: Arch) -> None:
    with arch.lm.trace(P1):
        out = arch.layers(arch.lm)[0].output
        shape = out.shape.save()
        width = out.shape[-1].save()
        flat = out.view(out.shape[0] * out.shape[1], -1).save()
    assert tuple(shape) == (1, 8, 64)
    assert width == 64
    assert flat.shape == (8, 64)


# -- editing ---------------------------------------------------------------------------------------


def test_patch_slice_with_client_tensor(arch: Arch) -> None:
    patch = torch.randn(64, generator=torch.Generator().manual_seed(3))
    with arch.lm.trace(P1):
        arch.layers(arch.lm)[1].output[:, -1, :] = patch
        logits = arch.lm.lm_head.output.save()

    def edit(module, args, output):
        output[:, -1, :] = patch

    expected = forward(arch, [P1], (arch.layers(arch.hf)[1], edit))
    assert torch.equal(logits, expected)
    assert not torch.equal(logits, forward(arch, [P1]))  # the patch did change something


def test_several_temporary_client_tensors(arch: Arch) -> None:
    """Each temporary tensor is sent as itself, even when Python reuses a freed tensor's id."""
    with arch.lm.trace(P1):
        for i in range(3):
            arch.layers(arch.lm)[i].output[:, -1] = torch.full((64,), float(i + 1))
        logits = arch.lm.lm_head.output.save()

    def edit(i: int) -> Callable:
        def hook(module, args, output):
            output[:, -1] = float(i + 1)

        return hook

    layers = arch.layers(arch.hf)
    assert torch.equal(logits, forward(arch, [P1], *[(layers[i], edit(i)) for i in range(3)]))


def test_replace_input(arch: Arch) -> None:
    with arch.lm.trace(P2):
        layer = arch.layers(arch.lm)[2]
        layer.input = layer.input * 3
        logits = arch.lm.lm_head.output.save()

    def pre(module, args, kwargs):
        return (args[0] * 3, *args[1:]), kwargs

    handle = arch.layers(arch.hf)[2].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        expected = forward(arch, [P2])
    finally:
        handle.remove()
    assert torch.equal(logits, expected)


def test_root_output_is_read_last(arch: Arch) -> None:
    with arch.lm.trace(P1):
        logits = arch.lm.lm_head.output.save()
        out = arch.lm.output.save()
        root_logits = arch.lm.output.logits.save()
    expected = forward(arch, [P1])
    assert torch.equal(logits, expected) and torch.equal(root_logits, expected)
    assert torch.equal(out.logits, expected)


def test_seed_experiment(arch: Arch) -> None:
    lm = arch.lm
    with lm.session():
        with lm.trace(P1):
            hs = arch.layers(lm)[-1].output[:, -1, :]
            t1 = lm.lm_head.output.argmax(dim=-1).save()
        with lm.trace(P2):
            arch.layers(lm)[1].output[:, -1, :] = hs
            logits2 = lm.lm_head.output.save()
            t2 = lm.lm_head.output.argmax(dim=-1).save()

    ref: dict = {}
    logits1 = forward(arch, [P1], (arch.layers(arch.hf)[-1], capture(ref, "hs")))

    def edit(module, args, output):
        output[:, -1, :] = ref["hs"][:, -1, :]

    expected2 = forward(arch, [P2], (arch.layers(arch.hf)[1], edit))
    assert torch.equal(t1, logits1.argmax(dim=-1))
    assert torch.equal(logits2, expected2)
    assert torch.equal(t2, expected2.argmax(dim=-1))
    assert isinstance(hs, client_sdk.Proxy)  # not saved: it never came back to the client


def test_steering_by_replacing_the_output(arch: Arch) -> None:
    steer = torch.randn(64, generator=torch.Generator().manual_seed(4)) * 2
    with arch.lm.trace(P1):
        layer = arch.layers(arch.lm)[2]
        layer.output = layer.output + steer
        logits = arch.lm.lm_head.output.save()
    expected = forward(arch, [P1], (arch.layers(arch.hf)[2], lambda m, a, o: o + steer))
    assert torch.equal(logits, expected)


def test_replace_output_with_a_function_of_it(arch: Arch) -> None:
    with arch.lm.trace(P2):
        layer = arch.layers(arch.lm)[1]
        layer.output = layer.output * 0.5 - 1
        after = arch.layers(arch.lm)[2].input.save()
        logits = arch.lm.lm_head.output.save()
    ref: dict = {}
    expected = forward(
        arch, [P2], (arch.layers(arch.hf)[1], lambda m, a, o: o * 0.5 - 1),
    )
    forward(arch, [P2], (arch.layers(arch.hf)[1], lambda m, a, o: o * 0.5 - 1),
            (arch.layers(arch.hf)[1], capture(ref, "after")))
    assert torch.equal(logits, expected)
    assert torch.equal(after, ref["after"])


def test_iadd_on_a_slice(arch: Arch) -> None:
    steer = torch.randn(64, generator=torch.Generator().manual_seed(5))
    with arch.lm.trace(P1):
        arch.layers(arch.lm)[1].output[:, -1, :] += steer
        arch.layers(arch.lm)[2].output[:, :3] *= 2
        logits = arch.lm.lm_head.output.save()

    def add(module, args, output):
        output[:, -1, :] += steer

    def mul(module, args, output):
        output[:, :3] *= 2

    expected = forward(arch, [P1], (arch.layers(arch.hf)[1], add), (arch.layers(arch.hf)[2], mul))
    assert torch.equal(logits, expected)


def test_ablation_in_place(arch: Arch) -> None:
    k = 7
    with arch.lm.trace(P1):
        arch.layers(arch.lm)[0].output[..., k] = 0
        h0 = arch.layers(arch.lm)[0].output.save()
        logits = arch.lm.lm_head.output.save()

    def ablate(module, args, output):
        output[..., k] = 0

    expected = forward(arch, [P1], (arch.layers(arch.hf)[0], ablate))
    assert torch.equal(logits, expected)
    assert torch.all(h0[..., k] == 0)


def test_logit_lens(arch: Arch) -> None:
    lm = arch.lm
    with lm.trace(P1):
        lens = [lm.lm_head(arch.norm(lm)(layer.output)).save() for layer in arch.layers(lm)]
        probs = [F.softmax(x[:, -1], dim=-1).save() for x in lens]
        logits = lm.lm_head.output.save()

    ref: dict = {}
    layers = arch.layers(arch.hf)
    expected = forward(arch, [P1], *[(layer, capture(ref, str(i))) for i, layer in enumerate(layers)])
    assert len(lens) == len(layers) == 4
    with torch.no_grad():
        for i in range(len(layers)):
            want = arch.hf.lm_head(arch.norm(arch.hf)(ref[str(i)]))
            assert torch.equal(lens[i], want), i
            assert torch.equal(probs[i], F.softmax(want[:, -1], dim=-1)), i
    # Calling lm_head on a value did not count as lm_head's own call in the forward pass.
    assert torch.equal(logits, expected)
    assert torch.equal(lens[-1], expected)  # both models apply the final norm then lm_head


# -- torch functions -------------------------------------------------------------------------------


def test_torch_functions(arch: Arch) -> None:
    with arch.lm.trace(P1):
        h = arch.layers(arch.lm)[1].output
        zeros = torch.zeros_like(h).save()
        both = torch.cat([h[:, :2], h[:, -2:]], dim=1).save()
        probs = F.softmax(arch.lm.lm_head.output, dim=-1).save()
        top = torch.topk(probs[0, -1], 3).indices.save()
        best = h.max(dim=-1).values.save()
        norm = torch.linalg.vector_norm(h, dim=-1).save()
    ref: dict = {}
    logits = forward(arch, [P1], (arch.layers(arch.hf)[1], capture(ref, "h")))
    assert torch.equal(zeros, torch.zeros_like(ref["h"]))
    assert torch.equal(both, torch.cat([ref["h"][:, :2], ref["h"][:, -2:]], dim=1))
    assert torch.equal(probs, F.softmax(logits, dim=-1))
    assert torch.equal(top, torch.topk(F.softmax(logits, dim=-1)[0, -1], 3).indices)
    assert torch.equal(best, ref["h"].max(dim=-1).values)
    assert torch.equal(norm, torch.linalg.vector_norm(ref["h"], dim=-1))


def test_operators_with_client_tensors_on_either_side(arch: Arch) -> None:
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(6)) / 8
    v = torch.randn(64, generator=torch.Generator().manual_seed(8))
    with arch.lm.trace(P1):
        h = arch.layers(arch.lm)[1].output
        results = [
            (v - h).save(), (h - v).save(), (1 - h).save(), (h @ w).save(), (w @ h[0, -1]).save(),
            (2 ** h.clamp(-1, 1)).save(), (-h / 3).save(), (h > 0).save(), abs(h).save(),
            h.to(torch.float16).save(),
        ]
    ref: dict = {}
    forward(arch, [P1], (arch.layers(arch.hf)[1], capture(ref, "h")))
    x = ref["h"]
    expected = [
        v - x, x - v, 1 - x, x @ w, w @ x[0, -1], 2 ** x.clamp(-1, 1), -x / 3, x > 0, abs(x),
        x.to(torch.float16),
    ]
    for i, (got, want) in enumerate(zip(results, expected, strict=True)):
        assert got.dtype == want.dtype and torch.equal(got, want), i


def test_traced_indices_and_masks(arch: Arch) -> None:
    with arch.lm.trace(P1):
        h = arch.layers(arch.lm)[1].output
        top = h[0, -1].argmax()
        picked = h[0, :, top].save()
        h[h < 0] = 0  # ReLU in place, with a traced mask
        logits = arch.lm.lm_head.output.save()
        best = logits[0, -1, logits[0, -1].argmax()].save()
    ref: dict = {}

    def edit(module, args, output):
        ref["picked"] = output[0, :, output[0, -1].argmax()]  # a view, as in the trace
        output[output < 0] = 0

    expected = forward(arch, [P1], (arch.layers(arch.hf)[1], edit))
    assert torch.equal(picked, ref["picked"])
    assert torch.equal(logits, expected)
    assert torch.equal(best, expected[0, -1].max())


def test_forward_kwargs_and_model_output_fields(arch: Arch) -> None:
    with arch.lm.trace(P2, output_hidden_states=True):
        hidden = arch.lm.output.hidden_states
        states = [hidden[i].save() for i in range(5)]
    ref: dict = {}
    layers = arch.layers(arch.hf)
    forward(arch, [P2], *[(layer, capture(ref, str(i))) for i, layer in enumerate(layers)])
    for i in range(3):  # the last entry is normed by both models
        assert torch.equal(states[i + 1], ref[str(i)]), i


def test_hidden_states_show_edits_on_every_run(arch: Arch) -> None:
    """transformers keeps output-capturing hooks once output_hidden_states was used; edits must
    show in `hidden_states` on every run, not only the run that installed those hooks."""
    for _ in range(2):
        with arch.lm.trace(P1, output_hidden_states=True):
            layer = arch.layers(arch.lm)[1]
            layer.output = layer.output * 0 + 1
            received = arch.layers(arch.lm)[2].input.save()
            state = arch.lm.output.hidden_states[2].save()
        assert torch.equal(received, torch.ones_like(received))
        assert torch.equal(state, received)


def test_token_id_inputs(arch: Arch) -> None:
    ids = arch.lm.tokenizer(P1)["input_ids"]
    with arch.lm.trace(ids):
        from_list = arch.lm.lm_head.output.save()
    with arch.lm.trace(torch.tensor([ids])):
        from_tensor = arch.lm.lm_head.output.save()
    expected = forward(arch, [P1])
    assert torch.equal(from_list, expected) and torch.equal(from_tensor, expected)


def test_an_invoke_with_several_prompts(arch: Arch) -> None:
    with arch.lm.trace() as tracer:
        with tracer.invoke([P1, SHORT]):
            arch.layers(arch.lm)[0].output[:, -1] = 0
            first = arch.lm.lm_head.output.save()
        with tracer.invoke(P2):
            second = arch.lm.lm_head.output.save()

    def edit(module, args, output):
        output[:2, -1] = 0

    expected = forward(arch, [P1, SHORT, P2], (arch.layers(arch.hf)[0], edit))
    assert torch.equal(first, expected[:2]) and torch.equal(second, expected[2:])


# -- batching --------------------------------------------------------------------------------------


def test_invokes_equal_single_runs(arch: Arch) -> None:
    lm = arch.lm
    with lm.trace() as tracer:
        with tracer.invoke(P1):
            h1 = arch.layers(lm)[2].output.save()
            l1 = lm.lm_head.output.save()
        with tracer.invoke(P3):
            h3 = arch.layers(lm)[2].output.save()
            l3 = lm.lm_head.output.save()
    for prompt, h, logits in ((P1, h1, l1), (P3, h3, l3)):
        ref: dict = {}
        single = forward(arch, [prompt], (arch.layers(arch.hf)[2], capture(ref, "h")))
        assert h.shape == (1, 8, 64) and logits.shape == single.shape
        assert close(h, ref["h"]) and close(logits, single), prompt


def test_an_edit_in_one_invoke_stays_in_its_rows(arch: Arch) -> None:
    lm = arch.lm
    with lm.trace() as tracer:
        with tracer.invoke(P1):
            arch.layers(lm)[1].output[:, -1, :] = 0
            l1 = lm.lm_head.output.save()
        with tracer.invoke(P3):
            l3 = lm.lm_head.output.save()

    def zero_row0(module, args, output):
        output[0, -1, :] = 0

    batched = forward(arch, [P1, P3], (arch.layers(arch.hf)[1], zero_row0))
    assert torch.equal(l1, batched[:1]) and torch.equal(l3, batched[1:])
    assert close(l3, forward(arch, [P3]))  # untouched by the other invoke's edit
    assert not close(l1, forward(arch, [P1]))


def test_patch_from_one_invoke_into_another(arch: Arch) -> None:
    lm = arch.lm
    with lm.trace() as tracer:
        with tracer.invoke(P1):
            h = arch.layers(lm)[1].output[:, -1, :]
        with tracer.invoke(P3):
            arch.layers(lm)[1].output[:, -1, :] = h
        logits = lm.lm_head.output.save()

    def edit(module, args, output):
        output[1, -1, :] = output[0, -1, :]

    assert torch.equal(logits, forward(arch, [P1, P3], (arch.layers(arch.hf)[1], edit)))


def test_padded_invokes_equal_hooks_on_the_padded_batch(arch: Arch) -> None:
    lm = arch.lm
    steer = torch.ones(64)
    with lm.trace() as tracer:
        with tracer.invoke(P1):
            a = lm.lm_head.output.save()
        with tracer.invoke(SHORT):
            arch.layers(lm)[0].output[:, -1] += steer
            h = arch.layers(lm)[0].output.save()
            b = lm.lm_head.output.save()
    ref: dict = {}

    def edit(module, args, output):
        output[1, -1] += steer
        ref["h"] = output[1:].clone()

    batch = arch.batch([P1, SHORT])
    assert batch["attention_mask"][1].tolist() == [0] * 7 + [1]  # left-padded, as the SDK pads
    expected = forward(arch, [P1, SHORT], (arch.layers(arch.hf)[0], edit))
    assert a.shape == b.shape == (1, 8, expected.shape[-1])  # each invoke sees the padded width
    assert torch.equal(a, expected[:1]) and torch.equal(b, expected[1:])
    assert torch.equal(h, ref["h"])
    # Padding changes nothing the prompt sees: its last position matches a run on its own (up
    # to float error from the masked keys; with shifted positions GPT-2 is off by ~0.5).
    assert close(a, forward(arch, [P1]))
    alone = forward(arch, [SHORT], (arch.layers(arch.hf)[0], lambda m, a, o: o + steer))
    assert torch.allclose(b[:, -1], alone[:, -1], rtol=1e-4, atol=1e-4)


def test_trace_on_a_list_of_prompts(arch: Arch) -> None:
    with arch.lm.trace([P1, P2, SHORT]):
        arch.layers(arch.lm)[1].output[:, -1, :3] = 0
        logits = arch.lm.lm_head.output.save()
        last = arch.lm.lm_head.output[:, -1].argmax(dim=-1).save()

    def edit(module, args, output):
        output[:, -1, :3] = 0

    expected = forward(arch, [P1, P2, SHORT], (arch.layers(arch.hf)[1], edit))
    assert logits.shape[0] == 3
    assert torch.equal(logits, expected)
    assert torch.equal(last, expected[:, -1].argmax(dim=-1))


def test_code_outside_invokes_sees_the_whole_batch(arch: Arch) -> None:
    lm = arch.lm
    with lm.trace() as tracer:
        with tracer.invoke(P1):
            pass
        with tracer.invoke(P3):
            pass
        logits = lm.lm_head.output.save()
    assert torch.equal(logits, forward(arch, [P1, P3]))


# -- sessions --------------------------------------------------------------------------------------


def test_cross_model_session(models: dict[str, Arch]) -> None:
    llama, gpt2 = models["llama"], models["gpt2"]
    with client_sdk.session():
        with llama.lm.trace(P1):
            hs = llama.lm.model.layers[-1].output[:, -1, :]
            scale = llama.lm.lm_head.output[0, -1].softmax(dim=-1).max()
        with gpt2.lm.trace(P2):
            gpt2.lm.transformer.h[1].output[:, -1, :] = hs * scale
            logits = gpt2.lm.lm_head.output.save()

    ref: dict = {}
    llama_logits = forward(llama, [P1], (llama.hf.model.layers[-1], capture(ref, "hs")))
    patch = ref["hs"][:, -1, :] * llama_logits[0, -1].softmax(dim=-1).max()

    def edit(module, args, output):
        output[:, -1, :] = patch

    assert torch.equal(logits, forward(gpt2, [P2], (gpt2.hf.transformer.h[1], edit)))
    _assert_clean(models.values())


def test_values_flow_between_three_traces(arch: Arch) -> None:
    lm = arch.lm
    with lm.session():
        with lm.trace(P1):
            a = arch.layers(lm)[0].output[:, -1]
        with lm.trace(P2):
            b = arch.layers(lm)[0].output[:, -1] + a
        with lm.trace(P3):
            arch.layers(lm)[0].output[:, -1] = b
            logits = lm.lm_head.output.save()
    ref: dict = {}
    forward(arch, [P1], (arch.layers(arch.hf)[0], capture(ref, "a")))
    forward(arch, [P2], (arch.layers(arch.hf)[0], capture(ref, "b")))

    def edit(module, args, output):
        output[:, -1] = ref["b"][:, -1] + ref["a"][:, -1]

    assert torch.equal(logits, forward(arch, [P3], (arch.layers(arch.hf)[0], edit)))


# -- early stop and logs ---------------------------------------------------------------------------


@contextmanager
def counting(module: torch.nn.Module) -> Iterator[list]:
    calls: list = []
    with hooks((module, lambda m, a, o: calls.append(1))):
        yield calls


def test_tracer_stop(arch: Arch) -> None:
    lm_head, layer1 = arch.hf.lm_head, arch.layers(arch.hf)[1]
    with counting(lm_head) as lm_head_calls, counting(layer1) as l1_calls, arch.lm.trace(P1) as tracer:
        h0 = arch.layers(arch.lm)[0].output.save()
        tracer.stop()
        logits = arch.lm.lm_head.output.save()
    assert len(l1_calls) == 0 and len(lm_head_calls) == 0  # the forward really stopped
    ref: dict = {}
    forward(arch, [P1], (arch.layers(arch.hf)[0], capture(ref, "h0")))
    assert torch.equal(h0, ref["h0"])
    assert isinstance(logits, client_sdk.Proxy)
    with pytest.raises(TracingError, match="stopped before reaching it"):
        _ = logits.value
    with pytest.raises(TracingError, match="stopped before reaching it"):
        logits + 1


def test_client_sdk_stop_inside_an_invoke(arch: Arch) -> None:
    with arch.lm.trace() as tracer, tracer.invoke(P1):
        h = arch.layers(arch.lm)[1].output.save()
        client_sdk.stop()
        later = arch.layers(arch.lm)[2].output.save()
    assert isinstance(h, torch.Tensor) and isinstance(later, client_sdk.Proxy)


def test_tracer_stop_in_a_session_stops_only_its_trace(arch: Arch) -> None:
    lm = arch.lm
    with lm.session():
        with lm.trace(P1) as tracer:
            h = arch.layers(lm)[-1].output[:, -1]
            tracer.stop()
        with lm.trace(P2):
            arch.layers(lm)[1].output[:, -1] = h  # a value of the stopped trace, computed before
            logits = lm.lm_head.output.save()
    ref: dict = {}
    forward(arch, [P1], (arch.layers(arch.hf)[-1], capture(ref, "h")))

    def edit(module, args, output):
        output[:, -1] = ref["h"][:, -1]

    assert torch.equal(logits, forward(arch, [P2], (arch.layers(arch.hf)[1], edit)))


def test_session_stop_between_traces(arch: Arch) -> None:
    lm = arch.lm
    with counting(arch.hf.lm_head) as calls, lm.session() as session:
        with lm.trace(P1):
            first = lm.lm_head.output.save()
        session.stop()
        with lm.trace(P2):
            second = lm.lm_head.output.save()
    assert len(calls) == 1  # the second trace never ran
    assert torch.equal(first, forward(arch, [P1]))
    with pytest.raises(TracingError, match="never computed"):
        _ = second.value


def test_session_stop_inside_a_trace(arch: Arch) -> None:
    lm = arch.lm
    with counting(arch.hf.lm_head) as calls, lm.session() as session:
        with lm.trace(P1):
            h = arch.layers(lm)[0].output.save()
            session.stop()
        with lm.trace(P2):
            second = lm.lm_head.output.save()
    assert len(calls) == 0
    assert isinstance(h, torch.Tensor) and isinstance(second, client_sdk.Proxy)


def test_logs_in_program_order_before_the_block_ends(arch: Arch, capsys: pytest.CaptureFixture) -> None:
    lm = arch.lm
    with lm.session():
        with lm.trace(P1):
            client_sdk.log("start")
            h = arch.layers(lm)[0].output
            client_sdk.log("layer0", h[0, -1, 0])
            t = lm.lm_head.output[0, -1].argmax().save()
            client_sdk.log("token", t, "of", 803)
        print("between traces (recorded, not run)")
        with lm.trace(P2):
            client_sdk.log("second trace")
        print("end of the session block")
    print("after")
    out = capsys.readouterr().out.splitlines()
    ref: dict = {}
    logits = forward(arch, [P1], (arch.layers(arch.hf)[0], capture(ref, "h")))
    assert out == [
        "between traces (recorded, not run)",
        "end of the session block",
        "start",
        f"layer0 {ref['h'][0, -1, 0]!s}",  # as print() would show it
        f"token {logits[0, -1].argmax()!s} of 803",
        "second trace",
        "after",
    ]
