"""Generation overhead: what a local raysight generation costs over bare HF `generate`, beside nnsight.

    .venv/bin/python bench/generate_overhead.py [--rounds N] [--write]

The same experiment on the same tiny random Llama (4 layers, hidden 64), in this one process,
interleaved round by round so drift hits all three alike:

- bare:     `model.generate(**ids, max_new_tokens=16)` (greedy) under torch.no_grad().
- raysight: `with model.generate(PROMPT, max_new_tokens=16) as tracer:` and, in
            `for step in tracer.all():`, one read (`layers[1].output[:, -1].save()`) and one edit
            (`layers[2].output[:, -1] += 0.5`) per step; `tracer.result.save()`.
- nnsight:  the same code with nnsight 0.8.1 (`tracer.iter[0:16]`, so the block ends normally).

`generate_overhead_ratio_vs_nnsight` = (raysight - bare) / (nnsight - bare): the ratio of the
median overheads over rounds; min and max over 5 blocks of rounds. Each configuration's time per
round is the fastest of `--inner` calls (other processes only add time), on this process's CPU
clock, with torch.set_num_threads(1). Both sides must generate the same tokens (checked first).
`--write` merges the figure into bench/results.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The Eiffel Tower is in the city of"
N = 16
EDIT = 0.5
BLOCKS = 5


def rs_generate(model):
    reads = []
    with model.generate(PROMPT, max_new_tokens=N) as tracer:
        for _step in tracer.all():
            reads.append(model.model.layers[1].output[:, -1].save())
            model.model.layers[2].output[:, -1] += EDIT
        ids = tracer.result.save()
    return ids, reads


def nn_generate(model):  # callers hold torch.no_grad()
    reads = []
    with model.generate(PROMPT, max_new_tokens=N) as tracer:
        for _step in tracer.iter[0:N]:
            reads.append(model.model.layers[1].output[:, -1].save())
            model.model.layers[2].output[:, -1] += EDIT
        ids = tracer.result.save()
    return ids, reads


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="merge the figure into bench/results.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from nnsight.modeling.transformers import TransformersModel
    from transformers.utils import logging as hf_logging

    from client_sdk import LanguageModel
    from fixtures.tiny_models import build_tiny_llama

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_llama(Path(tmp) / "tiny-llama", seed=0)
        rs = LanguageModel(str(folder))
        module = rs.local_module
        nn = TransformersModel(str(folder), task="text-generation", device_map="cpu", dispatch=True)
        ids = dict(rs.tokenizer(PROMPT, return_tensors="pt"))
        pad = rs.tokenizer.pad_token_id if rs.tokenizer.pad_token_id is not None else rs.tokenizer.eos_token_id

        def bare():
            with torch.no_grad():
                return module.generate(**ids, max_new_tokens=N, pad_token_id=pad)

        def nnsight():
            with torch.no_grad():
                return nn_generate(nn)

        calls = {"bare": bare, "raysight": lambda: rs_generate(rs), "nnsight": nnsight}
        rs_ids, rs_reads = calls["raysight"]()
        nn_ids, nn_reads = calls["nnsight"]()
        assert torch.equal(rs_ids, nn_ids) and rs_ids.shape[1] == ids["input_ids"].shape[1] + N
        for a, b in zip(rs_reads, nn_reads, strict=True):
            torch.testing.assert_close(a, b)
        assert not torch.equal(rs_ids, bare()), "the edits changed nothing"
        for fn in calls.values():
            fn()
        per_round = []
        for _ in range(args.rounds):
            gc.collect()
            best = dict.fromkeys(calls, float("inf"))
            for _ in range(args.inner):
                for name, fn in calls.items():
                    t0 = time.process_time()
                    fn()
                    best[name] = min(best[name], time.process_time() - t0)
            per_round.append(best)
    rs_over = [r["raysight"] - r["bare"] for r in per_round]
    nn_over = [r["nnsight"] - r["bare"] for r in per_round]
    size = max(1, len(per_round) // BLOCKS)
    blocks = [statistics.median(rs_over[i:i + size]) / statistics.median(nn_over[i:i + size])
              for i in range(0, size * (len(per_round) // size), size)]
    ms = {k: statistics.median(r[k] for r in per_round) * 1e3 for k in calls}
    figure = {
        "median": statistics.median(rs_over) / statistics.median(nn_over),
        "min": min(blocks), "max": max(blocks), "n": len(per_round), "unit": "x", "model": "tiny Llama",
        "what": "16-token greedy generation, one read + one edit per step: raysight's overhead over bare "
                "HF generate / nnsight 0.8.1's (bench/generate_overhead.py)",
        "bar": "<= 1", "goal": "≤ 0.5",
        "configs_ms": ms,
    }
    figure["meets_bar"] = figure["median"] <= 1
    print(f"bare generate {ms['bare']:.2f} ms, raysight {ms['raysight']:.2f} ms, nnsight {ms['nnsight']:.2f} ms "
          f"(median of {len(per_round)} rounds, CPU clock)")
    print(f"generate_overhead_ratio_vs_nnsight: {figure['median']:.3f} [{figure['min']:.3f}, {figure['max']:.3f}]")
    if args.write:
        path = ROOT / "bench" / "results.json"
        results = json.loads(path.read_text())
        results["generate_overhead_ratio_vs_nnsight"] = figure
        path.write_text(json.dumps(results, indent=2) + "\n")
    return figure


if __name__ == "__main__":
    main(sys.argv[1:])
