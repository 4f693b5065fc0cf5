"""The module tree of a model as plain JSON: what a client needs to build envoys.

    {"type": "LlamaForCausalLM", "children": {"model": {...}, "lm_head": {"type": "Linear",
     "children": {}}}}

Children of a ModuleList are named "0", "1", ...; a path is the dotted name PyTorch uses
(`model.layers.3`), and the root is "".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def module_tree(module: torch.nn.Module) -> dict[str, Any]:
    return {
        "type": type(module).__name__,
        "children": {name: module_tree(child) for name, child in module.named_children()},
    }


def module_paths(tree: dict[str, Any], prefix: str = "") -> Iterator[str]:
    yield prefix
    for name, child in tree["children"].items():
        yield from module_paths(child, f"{prefix}.{name}" if prefix else name)
