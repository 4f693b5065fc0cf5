"""examples/seed_session_local.py, run as a user would, checked against plain PyTorch hooks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "seed_session_local.py"
EIFFEL = "The Eiffel Tower is in the city of"
PALACE = "Buckingham Palace is in the city of"


def expected(model_dir: Path) -> dict:
    """The same experiment, by hand: capture with one hook, patch with another."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    layers = model.model.layers
    kept: dict = {}

    def keep(module, args, output):
        kept["hs"] = output[:, -1, :].clone()

    def patch(module, args, output):
        output[:, -1, :] = kept["hs"]

    with torch.no_grad():
        handle = layers[-1].register_forward_hook(keep)
        eiffel = model(**tok(EIFFEL, return_tensors="pt")).logits[0, -1].argmax()
        handle.remove()
        handle = layers[1].register_forward_hook(patch)
        patched = model(**tok(PALACE, return_tensors="pt")).logits[0, -1].argmax()
        handle.remove()
    return {
        "eiffel": int(eiffel),
        "patched": int(patched),
        "decode": tok.decode,
        "palace_tokens": len(tok(PALACE)["input_ids"]),
        "hidden": model.config.hidden_size,
    }


def test_seed_session_example(tiny_llama_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), str(tiny_llama_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", timeout=120,
        check=False,  # the return code is asserted below, with stderr in the message
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    want = expected(tiny_llama_path)

    # The log comes from inside the forward pass, so it is printed before the results.
    assert lines[0] == f"patched prediction: tensor({want['patched']})"
    assert re.fullmatch(r".*\(token (\d+)\)", lines[1]).group(1) == str(want["eiffel"])
    assert re.fullmatch(r".*\(token (\d+)\)", lines[2]).group(1) == str(want["patched"])
    assert lines[1] == f"{EIFFEL!r} -> {want['decode'](want['eiffel'])!r} (token {want['eiffel']})"
    assert lines[2] == (
        f"{PALACE!r}, patched -> {want['decode'](want['patched'])!r} (token {want['patched']})"
    )
    # The stopped trace: what ran before the stop came back, what came after was never computed.
    shape = (1, want["palace_tokens"], want["hidden"])
    assert lines[3] == f"stopped trace: layer 0 output saved, shape {shape}"
    assert lines[4].startswith("stopped trace: lm_head output not computed")
    assert "never computed" in lines[4]
    assert len(lines) == 5
