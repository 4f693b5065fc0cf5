"""Loading a configured model onto the devices Ray gave this replica.

With GPUs, accelerate places the model across all of them (`device_map="auto"`, balanced); without,
it stays on the CPU. Always eval mode, no grad: replicas only run inference.
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


def load_model(path: str, dtype: str = "float32") -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        kwargs["device_map"] = "auto" if torch.cuda.device_count() > 1 else "cuda:0"
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    model.requires_grad_(False)
    return model, load_tokenizer(path)


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
