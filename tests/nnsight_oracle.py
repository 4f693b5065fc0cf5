"""The same experiments written with nnsight 0.8.1: the oracle for raysight's semantics.

nnsight re-reads the source of each `with` block, so this code must live in a real file. Each
function takes the folder of a tiny model and returns plain tensors. Traces run under
`torch.no_grad()`: nnsight leaves autograd on, raysight runs without it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch


@contextmanager
def save_mounted() -> Iterator[None]:
    """nnsight, at import, mounts `.save()` onto `object` for the whole process. Left in place,
    every object of the test session has a `save` attribute (Ray Serve replicas started later
    fail: anyio refuses the unannotated attribute), so mount it only while the oracle runs."""
    import nnsight
    from nnsight._c import mount, unmount

    if not hasattr(object, "save"):
        mount(nnsight.save, "save")
    try:
        yield
    finally:
        unmount("save")


@cache
def load(path: str) -> Any:
    """An nnsight model for `path`, loaded once per test session."""
    from nnsight.modeling.transformers import TransformersModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformersModel(path, task="text-generation", device_map="cpu", dispatch=True)


def layers(model: Any) -> Any:
    """Decoder layers of Llama (`model.layers`) or GPT-2 (`transformer.h`)."""
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def seed_experiment(path: str, p1: str, p2: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Last layer of p1 at the last token, patched into layer 1 of p2."""
    model = load(path)
    with torch.no_grad(), model.session():
        with model.trace(p1):
            hs = layers(model)[-1].output[:, -1, :]
            t1 = model.lm_head.output.argmax(dim=-1).save()
        with model.trace(p2):
            layers(model)[1].output[:, -1, :] = hs
            logits2 = model.lm_head.output.save()
    return t1, logits2


def steering(path: str, prompt: str, layer: int, vector: torch.Tensor) -> torch.Tensor:
    model = load(path)
    with torch.no_grad(), model.trace(prompt):
        block = layers(model)[layer]
        block.output = block.output + vector
        logits = model.lm_head.output.save()
    return logits


def invokes(path: str, prompts: list[str], layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One trace, one invoke per prompt; the first invoke zeroes `layer` at its last token."""
    model = load(path)
    saved = []
    with torch.no_grad(), model.trace() as tracer:
        for i, prompt in enumerate(prompts):
            with tracer.invoke(prompt):
                if i == 0:
                    layers(model)[layer].output[:, -1, :] = 0
                hidden = layers(model)[layer].output.save()
                logits = model.lm_head.output.save()
                saved.append((hidden, logits))
    return [(h, lg) for h, lg in saved]


def logit_lens(path: str, prompt: str) -> list[torch.Tensor]:
    model = load(path)
    norm = model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm
    lens = []
    with torch.no_grad(), model.trace(prompt):
        for block in layers(model):
            lens.append(model.lm_head(norm(block.output)).save())
    return lens


# -- generation (issue 10) -------------------------------------------------------------------


def generate_steps(path: str, prompt: str, n: int, layer: int, vector: torch.Tensor) -> dict[str, Any]:
    """Greedy generation: layer `layer`'s last position read at steps 0-2, `vector` added to it at
    every step, the prediction saved per step; the token ids. (nnsight: code after an open-ended
    `tracer.all()` loop never runs, so the ids come from a loop with a named end.)"""
    model = load(path)
    reads, steered = [], []
    with torch.no_grad(), model.generate(prompt, max_new_tokens=n, do_sample=False) as tracer:
        first = layers(model)[0].output.save()
        for step in tracer.iter[0:n]:
            if step < 3:
                reads.append(layers(model)[layer].output[:, -1].save())
            layers(model)[layer].output[:, -1] += vector
            steered.append(model.lm_head.output[:, -1].argmax(dim=-1).save())
        ids = tracer.result.save()
    every = []
    with torch.no_grad(), model.generate(prompt, max_new_tokens=n) as tracer:
        for _step in tracer.all():
            every.append(model.lm_head.output[:, -1].save())
    return {"first": first, "reads": list(reads), "steered": list(steered), "ids": ids, "every": list(every)}


def generate_picked_steps(path: str, prompt: str, n: int, layer: int) -> dict[str, Any]:
    """`tracer.iter[i]` and `tracer.iter[[0, 2]]`: zero the layer's output at those steps."""
    model = load(path)
    with torch.no_grad(), model.generate(prompt, max_new_tokens=n) as tracer:
        for _step in tracer.iter[[0, 2]]:
            layers(model)[layer].output[:] = 0
        for _step in tracer.iter[3]:
            late = model.lm_head.output.save()
        ids = tracer.result.save()
    return {"late": late, "ids": ids}


def generate_invokes(path: str, prompts: list[str], n: int, layer: int, vector: torch.Tensor) -> dict[str, Any]:
    """Prompts of different lengths in one generation; the first invoke steers every step; an
    input-less invoke reads the whole batch."""
    model = load(path)
    out: dict[str, Any] = {}
    with torch.no_grad(), model.generate(max_new_tokens=n) as tracer:
        with tracer.invoke(prompts[0]):
            for _step in tracer.iter[0:n]:
                layers(model)[layer].output[:, -1] += vector
        with tracer.invoke(prompts[1]):
            out["second"] = layers(model)[layer].output.save()
        with tracer.invoke():
            out["all"] = model.lm_head.output.save()
            out["ids"] = tracer.result.save()
    return out


def trace_result(path: str, prompt: str) -> dict[str, Any]:
    """`tracer.result` of a trace: the model's output object."""
    model = load(path)
    with torch.no_grad(), model.trace(prompt) as tracer:
        logits = tracer.result.logits.save()
        last = tracer.result.logits[:, -1].argmax(dim=-1).save()
    return {"logits": logits, "last": last}


# -- gradients (issue 10) --------------------------------------------------------------------------


def attribution(path: str, prompt: str, layer: int) -> dict[str, Any]:
    """Gradient of the top logit at the last position w.r.t. a layer's output and the MLP output
    of the next layer; attribution patching's `(h * h.grad).sum(-1)`. Autograd on (no no_grad):
    nnsight needs it, and its weights require grad (raysight's are frozen: same activation grads)."""
    model = load(path)
    blocks = layers(model)
    with model.trace(prompt):
        h = blocks[layer].output
        m = blocks[layer + 1].mlp.output
        logits = model.lm_head.output
        loss = logits[0, -1].max()
        with loss.backward():
            g_m = m.grad.save()
            g_h = h.grad.save()
        attr = (h * g_h).sum(-1).save()
    return {"g_h": g_h, "g_m": g_m, "attr": attr}


def skip(path: str, prompt: str, layer: int) -> torch.Tensor:
    """Skip a decoder layer, passing its input through as its output."""
    model = load(path)
    block = layers(model)[layer]
    with torch.no_grad(), model.trace(prompt):
        block.skip(block.input)
        logits = model.lm_head.output.save()
    return logits


def cache(path: str, prompt: str, layer: int) -> dict[str, Any]:
    """tracer.cache() of two modules, with an edit before them (values after interventions)."""
    model = load(path)
    blocks = layers(model)
    with torch.no_grad(), model.trace(prompt) as tracer:
        c = tracer.cache(modules=[blocks[layer], model.lm_head], include_inputs=True)
        blocks[layer].output[:, -1] = 0
    name = "model.transformer.h" if hasattr(model, "transformer") else "model.model.layers"
    return {
        "block": c[f"{name}.{layer}"].output,
        "block_input": c[f"{name}.{layer}"].input,
        "head": c["model.lm_head"].output,
    }
