"""What the shape check (client_sdk/scan.py) costs the client, per trace.

    .venv/bin/python bench/scan_cost.py [--json bench/results.json] [--rounds 30]

The experiment is the seed session (trace 1 reads the last layer's hidden state at the last token
and saves the prediction; trace 2 patches that state into layer 1 of another prompt), recorded
once and checked `--rounds` times; the figure is this process's CPU time per trace (median, min,
max over rounds), beside the CPU time of recording the same two traces (tracing them in `with`
blocks), so the check's cost reads as a ratio too. Models:

- tiny: the tiny random Llama of the tests (4 layers, hidden 64), built into a temp folder;
- SmolLM2-135M, if the benchmark's model cache (~/.cache/raysight/models/smollm2-135m) has it;
- 70B: a Llama-3-70B-sized module tree (80 layers, hidden 8192) from a LlamaConfig alone, on the
  meta device: no weights exist, which is all the check needs.

`first_use_s` is the check's one-time cost per model and process (wall clock): building its
meta-device copy and recording its module events (two meta forwards of a two-layer copy where the
decoder layers are all alike). Writes `scan_cpu_ms_tiny`, `scan_cpu_ms_smollm2`,
`scan_cpu_ms_70b_meta` into the results JSON (other keys are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from client_sdk import LanguageModel
from client_sdk import scan as client_scan
from client_sdk.tracing import recording

ROOT = Path(__file__).resolve().parent.parent
SMOL = Path.home() / ".cache" / "raysight" / "models" / "smollm2-135m"
P1, P2 = "The Eiffel Tower is in the city of", "Buckingham Palace is in the city of"


def seed(model: LanguageModel) -> None:
    with model.trace(P1):
        hs = model.model.layers[-1].output[:, -1, :]
        model.lm_head.output.argmax(dim=-1).save()
    with model.trace(P2):
        model.model.layers[1].output[:, -1, :] = hs
        model.lm_head.output.argmax(dim=-1).save()


def measure(model: LanguageModel, rounds: int) -> dict:
    with recording() as graph:  # first use of the model (its module tree, tokenizer): not the check's
        seed(model)
    session = graph.session_ir()
    t = time.perf_counter()
    client_scan.scan(session, graph.tensors, graph.models, set())  # first use: probe the model
    first_use = time.perf_counter() - t
    assert model in client_scan._MODELS and client_scan._MODELS[model] is not None, "not checked"
    n = len(session.traces)
    scan_ms, record_ms = [], []
    for _ in range(rounds):
        c = time.process_time()
        with recording() as graph:
            seed(model)
        record_ms.append((time.process_time() - c) * 1000 / n)
        session = graph.session_ir()
        c = time.process_time()
        client_scan.scan(session, graph.tensors, graph.models, set())
        scan_ms.append((time.process_time() - c) * 1000 / n)
    med, rec = statistics.median(scan_ms), statistics.median(record_ms)
    return {
        "median": round(med, 3), "min": round(min(scan_ms), 3), "max": round(max(scan_ms), 3),
        "unit": "ms CPU per trace", "recording_ms_per_trace": round(rec, 3),
        "ratio_to_recording": round(med / rec, 2), "first_use_s": round(first_use, 2), "rounds": rounds,
    }


def model_70b(folder: Path, tokenizer_from: Path) -> LanguageModel:
    from transformers import AutoTokenizer, LlamaConfig

    LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        dtype="bfloat16",
    ).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    return LanguageModel(str(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from fixtures.tiny_models import build_tiny_llama

    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_llama(Path(tmp) / "tiny-llama", seed=0)
        out["scan_cpu_ms_tiny"] = {**measure(LanguageModel(str(tiny)), args.rounds), "model": "tiny Llama"}
        if (SMOL / "config.json").exists():
            out["scan_cpu_ms_smollm2"] = {**measure(LanguageModel(str(SMOL)), args.rounds), "model": "SmolLM2-135M"}
        big = model_70b(Path(tmp) / "llama-70b-meta", tiny)
        out["scan_cpu_ms_70b_meta"] = {
            **measure(big, max(5, args.rounds // 3)), "model": "Llama-70B-sized tree on the meta device",
        }
    for key, value in out.items():
        print(f"{key}: {value}")
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    results.update(out)
    results.setdefault("commands", {})["scan"] = "python bench/scan_cost.py"
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
