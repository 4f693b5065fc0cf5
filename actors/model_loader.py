"""Loading a configured model onto the devices Ray gave this replica.

With GPUs, `device_map_for` places the model across all of them: accelerate's balanced map (what
transformers' `device_map="auto"` computes), worked out on the meta device from the model's config
alone before any weight is read, so the placement can be checked without the weights or the GPUs
(tests/test_placement.py does, for the production 70B). Without GPUs the model stays on the CPU.
Always eval mode, no grad: replicas only run inference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from intervention.tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja",
)


# What a replica leaves free on each GPU when placing weights: activations, saved values and
# batches live there too (accelerate's own default keeps 10%).
GPU_HEADROOM = 0.10


def load_model(path: str, dtype: str = "float32") -> tuple[torch.nn.Module, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        # The GPUs Ray gave this replica are the visible ones (CUDA_VISIBLE_DEVICES).
        kwargs["device_map"] = device_map_for(AutoConfig.from_pretrained(path), dtype, gpu_memory())
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    model.requires_grad_(False)
    return model, load_tokenizer(path)


def gpu_memory() -> dict[int | str, int]:
    """Bytes each visible GPU may hold of weights (its free memory less GPU_HEADROOM), and the CPU's
    RAM: accelerate spills to the CPU only when the GPUs cannot hold the model."""
    import psutil

    out: dict[int | str, int] = {}
    for i in range(torch.cuda.device_count()):
        free, _ = torch.cuda.mem_get_info(i)
        out[i] = int(free * (1 - GPU_HEADROOM))
    out["cpu"] = psutil.virtual_memory().available
    return out


def device_map_for(config: Any, dtype: str, max_memory: dict[int | str, int]) -> dict[str, int | str]:
    """Where each block of the model goes: accelerate's balanced map over the GPUs in `max_memory`
    (the same computation as transformers' `device_map="auto"`), on an empty (meta-device) model
    built from `config`, so no weights are read. Decoder layers are never split across GPUs.
    One GPU: everything on it."""
    from accelerate import init_empty_weights
    from accelerate.utils import get_balanced_memory, infer_auto_device_map
    from transformers import AutoModelForCausalLM

    gpus = [k for k in max_memory if isinstance(k, int)]
    if len(gpus) == 1:
        return {"": gpus[0]}
    with init_empty_weights():
        weights = DTYPES[dtype] if dtype != "auto" else getattr(config, "dtype", None) or torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=weights)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # tied weights count once and land together
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    balanced = get_balanced_memory(model, max_memory=dict(max_memory), no_split_module_classes=no_split,
                                   dtype=model.dtype)
    return infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=model.dtype)


def tokenizer_files(path: str) -> dict[str, str]:
    """The tokenizer's files as text, so clients can rebuild it without the Hub."""
    folder = Path(path)
    return {
        name: (folder / name).read_text(encoding="utf-8")
        for name in TOKENIZER_FILES
        if (folder / name).is_file()
    }


def placement(model: torch.nn.Module) -> dict[str, str]:
    """Where each top-level block lives (for the model metadata and operators)."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        return {k: str(v) for k, v in device_map.items()}
    return {"": str(next(model.parameters()).device)}
