"""The scripts in examples/, run as researchers run them: a subprocess against the real cluster.

Each test runs one example on the tiny models (as alice) and checks what it printed against the
same experiment run locally, in this process, with client_sdk on the same model folders. The
printed numbers have 4 decimals: they must agree to that rounding.
"""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import client_sdk
from client_sdk import LanguageModel

ROOT = Path(__file__).resolve().parent.parent
ROUNDING = 5.1e-5  # printed with 4 decimals
P1 = "The Eiffel Tower is in the city of"
P2 = "Buckingham Palace is in the city of"
P3 = "The Colosseum is in the city of"


def run_example(cluster, name: str, *args: str) -> str:
    env = {
        **os.environ,
        "RAYSIGHT_HOST": cluster.url,
        "RAYSIGHT_API_KEY": cluster.keys["alice"],
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def close(printed: float, value: torch.Tensor | float) -> bool:
    return abs(printed - float(value)) <= ROUNDING


@pytest.fixture(scope="module")
def llama(tiny_llama_path: Path) -> LanguageModel:
    return LanguageModel(str(tiny_llama_path))


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_path: Path) -> LanguageModel:
    return LanguageModel(str(tiny_gpt2_path))


def test_steering(cluster, llama: LanguageModel) -> None:
    out = run_example(cluster, "steering", "llama", "1")

    layers = llama.model.layers
    with llama.trace() as tracer:
        with tracer.invoke(" the beach, the sea, the waves"):
            toward = layers[1].output[0, 1:].mean(dim=0).save()
        with tracer.invoke(" the city, the road, the cars"):
            away = layers[1].output[0, 1:].mean(dim=0).save()
    steer = 2.0 * (toward - away)
    with llama.trace() as tracer:
        with tracer.invoke("Yesterday I went to the"):
            plain = llama.lm_head.output[0, -1].softmax(dim=-1).save()
        with tracer.invoke("Yesterday I went to the"):
            layers[1].output[:, 1:] += steer
            steered = llama.lm_head.output[0, -1].softmax(dim=-1).save()

    assert f"layer 1, norm {steer.norm():.2f}" in out
    without, _, with_ = out.partition("with steering:")
    for text, probs in ((without, plain), (with_, steered)):
        rows = re.findall(r"^\s+(\d\.\d{4})\s+.*\(id (\d+)\)$", text, re.MULTILINE)
        assert [int(i) for _, i in rows] == probs.topk(5).indices.tolist(), out
        assert all(close(float(p), probs[int(i)]) for p, i in rows), out
    assert not torch.allclose(plain, steered)


def test_generate_steering(cluster, llama: LanguageModel) -> None:
    out = run_example(cluster, "generate_steering", "llama", "1")

    layers, n = llama.model.layers, 12
    with llama.trace() as tracer:
        with tracer.invoke(" the beach, the sea, the waves"):
            toward = layers[1].output[0, 1:].mean(dim=0).save()
        with tracer.invoke(" the city, the road, the cars"):
            away = layers[1].output[0, 1:].mean(dim=0).save()
    steer = 4.0 * (toward - away)
    confidence = []
    with llama.generate(max_new_tokens=n) as tracer:  # the example's batch: same numbers
        with tracer.invoke("Yesterday I went to the"):
            plain = tracer.result.save()
        with tracer.invoke("Yesterday I went to the"):
            for _ in tracer.all():
                layers[1].output[:, -1] += steer
                confidence.append(llama.lm_head.output[0, -1].softmax(dim=-1).max().save())
            steered = tracer.result.save()

    assert f"layer 1, norm {steer.norm():.2f}" in out
    decode = llama.tokenizer.decode
    assert f"without steering: Yesterday I went to the{decode(plain[0, -n:])!r}" in out
    assert f"with steering:    Yesterday I went to the{decode(steered[0, -n:])!r}" in out
    printed = re.search(r"per step: (.*)$", out, re.MULTILINE).group(1).split()
    assert len(printed) == n and all(close(float(p), c) for p, c in zip(printed, confidence, strict=True))


def test_attribution_patching(cluster, llama: LanguageModel, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """Remote prints what the same script prints run locally on the same weights."""
    out = run_example(cluster, "attribution_patching", "llama", "1")
    local_script = tmp_path / "attribution_patching_local.py"
    source = (ROOT / "examples" / "attribution_patching.py").read_text()
    local_script.write_text(source.replace("remote=True", "remote=False"))
    argv = sys.argv
    sys.argv = [str(local_script), str(llama.name), "1"]
    try:
        capsys.readouterr()
        runpy.run_path(str(local_script), run_name="__main__")
    finally:
        sys.argv = argv
    local = capsys.readouterr().out
    assert "attribution per position of layer 1:" in out
    numbers = [float(x) for x in re.findall(r"[-+]\d+\.\d{4}", out)]
    want = [float(x) for x in re.findall(r"[-+]\d+\.\d{4}", local)]
    assert len(numbers) == len(want) > 1 and all(abs(a - b) <= 2 * ROUNDING for a, b in zip(numbers, want, strict=True))


def test_logit_lens(cluster, llama: LanguageModel) -> None:
    out = run_example(cluster, "logit_lens", "llama")

    with llama.trace(P1):
        probs = [
            llama.lm_head(llama.model.norm(layer.output[0, -1])).softmax(dim=-1).save()
            for layer in llama.model.layers
        ]
        final = llama.lm_head.output[0, -1].softmax(dim=-1).save()

    rows = re.findall(r"layer\s+(\d+)\s+(\d\.\d{4})\s+.*\(id (\d+)\)$", out, re.MULTILINE)
    assert [int(n) for n, _, _ in rows] == list(range(len(probs))), out
    for (_, p, token), local in zip(rows, probs):
        assert int(token) == local.argmax().item() and close(float(p), local.max()), out
    assert torch.allclose(probs[-1], final, atol=1e-6)  # the last layer's lens is the model's answer


def test_patching_sweep(cluster, llama: LanguageModel) -> None:
    out = run_example(cluster, "patching_sweep", "llama")

    layers = llama.model.layers
    with llama.session():
        with llama.trace(P1):
            states = [layer.output[:, -1, :] for layer in layers]
            answer = llama.lm_head.output[0, -1].argmax().save()
            clean_p = llama.lm_head.output[0, -1].softmax(dim=-1)[answer].save()
        with llama.trace(P3):
            corrupt_p = llama.lm_head.output[0, -1].softmax(dim=-1)[answer].save()
        patched = []
        for layer, state in zip(layers, states):
            with llama.trace(P3):
                layer.output[:, -1, :] = state
                patched.append(llama.lm_head.output[0, -1].softmax(dim=-1)[answer].save())

    head = re.search(r"\(id (\d+)\): p = (\d\.\d{4}) on the clean prompt, (\d\.\d{4}) on the corrupted", out)
    assert head, out
    assert int(head[1]) == answer.item()
    assert close(float(head[2]), clean_p) and close(float(head[3]), corrupt_p), out
    rows = re.findall(r"layer\s+(\d+)\s+p = (\d\.\d{4})", out)
    assert len(rows) == len(layers) == len(patched)
    assert all(close(float(p), local) for (_, p), local in zip(rows, patched)), out
    assert close(float(rows[-1][1]), clean_p)  # the last layer's state carries the whole answer


def test_patch_answer(cluster, llama: LanguageModel) -> None:
    out = run_example(cluster, "patch_answer", "llama", "2")

    with llama.session():
        with llama.trace(P1):
            state = llama.model.layers[2].output[:, -1, :]
        with llama.trace(P3):
            plain = llama.lm_head.output[0, -1].softmax(dim=-1).save()
        with llama.trace(P3):
            llama.model.layers[2].output[:, -1, :] = state
            patched = llama.lm_head.output[0, -1].softmax(dim=-1).save()

    first = re.search(rf"^'{P3}' -> .*\(id (\d+), p = (\d\.\d{{4}})\)$", out, re.MULTILINE)
    second = re.search(rf"^the same, with layer 2's last-token state from '{P1}' -> .*\(id (\d+), p = (\d\.\d{{4}})\)$",
                       out, re.MULTILINE)
    assert first and second, out
    for found, local in ((first, plain), (second, patched)):
        assert int(found[1]) == local.argmax().item() and close(float(found[2]), local.max()), out
    assert not torch.equal(plain, patched)


def test_cross_model(cluster, llama: LanguageModel, gpt2: LanguageModel) -> None:
    out = run_example(cluster, "cross_model", "llama", "gpt2")  # Llama and GPT-2 module trees

    la, lb = len(llama.model.layers) * 4 // 5, len(gpt2.transformer.h) * 4 // 5
    with client_sdk.session():
        with llama.trace(P1):
            state = llama.model.layers[la].output[:, -1, :]
            a_top = llama.lm_head.output[0, -1].argmax().save()
        with gpt2.trace(P2):
            b_top = gpt2.lm_head.output[0, -1].argmax().save()
            b_p = gpt2.lm_head.output[0, -1].softmax(dim=-1)[a_top].save()
        with gpt2.trace(P2):
            gpt2.transformer.h[lb].output[:, -1, :] = state
            patched_top = gpt2.lm_head.output[0, -1].argmax().save()
            patched_p = gpt2.lm_head.output[0, -1].softmax(dim=-1)[a_top].save()

    ids = [int(i) for i in re.findall(r"(?<!p)\(id (\d+)\)", out)]
    assert ids == [a_top.item(), b_top.item(), patched_top.item()], out
    probs = [float(p) for p in re.findall(r"p\(id \d+\) = (\d\.\d{4})", out)]
    assert len(probs) == 2 and close(probs[0], b_p) and close(probs[1], patched_p), out
    assert f"layer {la} state patched into its layer {lb}" in out


def test_nonblocking(cluster, llama: LanguageModel) -> None:
    out = run_example(cluster, "nonblocking", "llama")

    with llama.trace(P3):
        probs = llama.lm_head.output[0, -1].softmax(dim=-1).save()

    assert re.search(r"^submitted request [0-9a-f]{32}$", out, re.MULTILINE), out
    states = re.findall(r"^status: (\w+)$", out, re.MULTILINE)
    assert states[0] in ("RECEIVED", "QUEUED", "RUNNING", "COMPLETED") and states[1] == "COMPLETED", out
    last = re.search(r"\(id (\d+), p = (\d\.\d{4})\)$", out, re.MULTILINE)
    assert last and int(last[1]) == probs.argmax().item() and close(float(last[2]), probs.max()), out


def test_raw_http(cluster, llama: LanguageModel) -> None:
    out = run_example(cluster, "raw_http", "llama")  # no client_sdk in the script: HTTP + safetensors

    with llama.trace(P1):
        token = llama.lm_head.output[0, -1].argmax().save()

    assert out.startswith("202 {'id': "), out
    events = re.findall(r"event: (\w+)", out)
    assert events[0] == "RECEIVED" and "RUNNING" in events and events[-2:] == ["LOG", "COMPLETED"], out
    assert f"predicted token id tensor({token.item()})" in out
    assert f"tensors: {{'r0': tensor({token.item()})}}" in out, out
