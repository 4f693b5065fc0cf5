"""The client's shape check: a session's traces run on meta tensors before they are sent or run
(`intervention/scan.py`), so a bad index or a shape mismatch fails at the user's line without a
forward pass.

Each model gets a meta-device copy built from its config (no weights), and its module events are
recorded once; after that a trace costs only its own nodes on meta tensors. Opt out with
`CONFIG.scan = False`, or `scan=False` on a trace or session; local sessions are checked only
with `scan=True` (or `CONFIG.scan = True`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import weakref
from typing import Any

import torch

from client_sdk.config import CONFIG
from intervention.ir import SessionIR, TraceIR
from intervention.scan import ModelEvents, expand_layers, record_events, scan_session

# LanguageModel -> (meta module, its recorded events), or None when its architecture cannot be
# built or probed on the meta device (its traces are then not checked).
_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# The same by (config, dtype): a notebook or a test suite makes many LanguageModels of one model.
_BY_CONFIG: dict[str, tuple[torch.nn.Module, ModelEvents] | None] = {}
_LOCK = threading.RLock()


def scan(session: SessionIR, tensors: dict[str, torch.Tensor], models: dict[str, Any], skip: set[int]) -> None:
    """Check `session` on meta tensors; `skip`: ids of TraceIRs recorded with scan=False."""
    if CONFIG.scan is False:
        return

    def model_for(trace: TraceIR) -> tuple[torch.nn.Module, Any, ModelEvents] | None:
        if id(trace) in skip:
            return None
        lm = models[trace.model]
        if lm not in _MODELS:
            _MODELS[lm] = _probe(lm)
        found = _MODELS[lm]
        return None if found is None else (found[0], lm.tokenizer, found[1])

    with _LOCK:  # a scan wraps the meta modules' forwards for its run: one scan at a time
        scan_session(session, tensors, model_for)


def _probe(lm: Any) -> tuple[torch.nn.Module, ModelEvents] | None:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        if lm.is_local:
            config = AutoConfig.from_pretrained(lm.name)
            dtype = lm.dtype if lm.dtype not in (None, "auto") else getattr(config, "dtype", None)
        else:
            info = lm.remote_info
            fields = dict(info["config"])
            config = AutoConfig.for_model(fields.pop("model_type"), **fields)
            dtype = info.get("dtype")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        kwargs = {"dtype": dtype} if isinstance(dtype, torch.dtype) else {}
        key = hashlib.sha256(json.dumps([config.to_dict(), str(dtype)], sort_keys=True, default=str).encode()).hexdigest()
        if key not in _BY_CONFIG:
            _BY_CONFIG[key] = None  # if probing fails, it fails once
            with torch.device("meta"):
                meta = AutoModelForCausalLM.from_config(config, **kwargs)
            meta.eval().requires_grad_(False)
            _BY_CONFIG[key] = meta, _events(meta, config, kwargs)
        return _BY_CONFIG[key]
    except Exception:  # noqa: BLE001 - an architecture the meta device cannot run: no check, no harm
        return None


def _events(meta: torch.nn.Module, config: Any, kwargs: dict) -> ModelEvents:
    """The model's recorded events; for a deep stack of identical decoder layers, recorded on a
    two-layer copy and extended (seconds saved on a 70B-sized model, see `expand_layers`)."""
    from transformers import AutoModelForCausalLM

    n = getattr(config, "num_hidden_layers", None)
    blocks = _uniform_blocks(meta, config, n)
    if blocks is None:
        return record_events(meta)
    short_config = copy.deepcopy(config)
    short_config.num_hidden_layers = 2
    with torch.device("meta"):
        short = AutoModelForCausalLM.from_config(short_config, **kwargs)
    try:
        return expand_layers(record_events(short.eval()), blocks, n)
    except ValueError:
        return record_events(meta)


def _uniform_blocks(meta: torch.nn.Module, config: Any, n: Any) -> str | None:
    """The path of the model's decoder layers if there are more than two, all alike after the
    first (same module types, same parameter shapes) and nothing in the config is per layer."""
    if not isinstance(n, int) or n <= 2:
        return None
    if any(isinstance(v, (list, tuple)) and len(v) == n for v in config.to_dict().values()):
        return None  # e.g. `layer_types`: layers differ by index
    for path, module in meta.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            shape = _layout(module[1])
            if all(_layout(module[k]) == shape for k in range(2, n)):
                return path
            return None
    return None


def _layout(module: torch.nn.Module) -> list:
    return [(name, type(m).__name__, [tuple(p.shape) for p in m.parameters(recurse=False)])
            for name, m in module.named_modules()]
