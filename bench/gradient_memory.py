"""Gradient memory: peak memory of a gradient trace / of the same forward trace, on SmolLM2-135M.

    .venv/bin/python bench/gradient_memory.py [--reps 3] [--write]

Each variant runs in a fresh process that loads the model the way a replica does (float32, weights
frozen) and runs its trace `--reps` times with the shared engine (what a replica runs); the figure
is the process's peak resident memory (ru_maxrss), which includes the weights:

- forward:  read layer 15's output, save the last position's logits.
- gradient: the same, then `with logit.backward(): h.grad.save()` (the gradient of the top logit
            w.r.t. layer 15's output).

`gradient_peak_memory_ratio` = peak(gradient) / peak(forward), median over reps of fresh process
pairs; it stays near 1 because no weight gradients are computed or kept (0.5 GB of them for this
model). Also printed: the peaks above the loaded model. `--write` merges it into bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The Eiffel Tower is in the city of"


def child(variant: str, reps: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import torch

    from client_sdk import LanguageModel
    from serve_app.model_store import fetch_model

    torch.set_num_threads(1)
    model = LanguageModel(str(fetch_model("smollm2-135m")), dtype=torch.float32)
    model.local_module  # noqa: B018 - load now
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(reps):
        with model.trace(PROMPT):
            h = model.model.layers[15].output
            logits = model.lm_head.output[0, -1]
            top = logits.save()
            if variant == "gradient":
                with logits.max().backward():
                    g = h.grad.save()
        assert top.shape[-1] > 0 and (variant == "forward" or g.shape[-1] == 576)
        assert all(p.grad is None for p in model.local_module.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"loaded_kb": loaded, "peak_kb": peak}))


def run(variant: str, reps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--reps", str(reps)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--child", choices=["forward", "gradient"])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.reps)
        return None
    pairs = [(run("forward", args.reps), run("gradient", args.reps)) for _ in range(args.pairs)]
    ratios = [g["peak_kb"] / f["peak_kb"] for f, g in pairs]
    above = [(g["peak_kb"] - g["loaded_kb"]) / 1024 for _, g in pairs], [(f["peak_kb"] - f["loaded_kb"]) / 1024 for f, _ in pairs]
    figure = {
        "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios),
        "unit": "x", "model": "SmolLM2-135M",
        "what": "peak memory of a process running a gradient trace / the same forward trace, weights frozen "
                "(bench/gradient_memory.py)",
        "bar": "<= 1.5", "meets_bar": statistics.median(ratios) <= 1.5,
        "peak_mb": {"forward": statistics.median(f["peak_kb"] for f, _ in pairs) / 1024,
                    "gradient": statistics.median(g["peak_kb"] for _, g in pairs) / 1024},
        "above_loaded_mb": {"gradient": statistics.median(above[0]), "forward": statistics.median(above[1])},
    }
    print(f"gradient_peak_memory_ratio: {figure['median']:.3f} [{figure['min']:.3f}, {figure['max']:.3f}]; "
          f"peak MB forward {figure['peak_mb']['forward']:.0f}, gradient {figure['peak_mb']['gradient']:.0f}; "
          f"above the loaded model: forward {figure['above_loaded_mb']['forward']:.0f} MB, "
          f"gradient {figure['above_loaded_mb']['gradient']:.0f} MB")
    if args.write:
        path = ROOT / "bench" / "results.json"
        results = json.loads(path.read_text())
        results["gradient_peak_memory_ratio"] = figure
        path.write_text(json.dumps(results, indent=2) + "\n")
    return figure


if __name__ == "__main__":
    main(sys.argv[1:])
