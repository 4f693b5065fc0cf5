"""`LanguageModel`: the researcher's handle on a model, local or served.

Locally it is a path (or HF id): the module tree comes from the config on the meta device (no
weights), and the weights load on the first local run. Remotely it is a served model's name: the
module tree, config and tokenizer come from the server, and no weights ever reach the client.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from client_sdk.envoy import Envoy
from client_sdk.location import user_location
from client_sdk.proxy import TracingError
from client_sdk.remote import fetch_model_info, tokenizer_dir
from client_sdk.tracing import Session, Tracer
from intervention.module_tree import module_tree
from intervention.tokenizer import load_tokenizer


class LanguageModel:
    def __init__(self, name_or_path: str, *, dtype: torch.dtype | str | None = None, device_map: Any = None):
        self.name = str(name_or_path)
        self.dtype = dtype
        self.device_map = device_map
        self._tree: dict | None = None
        self._root: Envoy | None = None
        self._module: torch.nn.Module | None = None
        self._tokenizer = None
        self._remote_info: dict | None = None
        self._order: list | None = None

    # -- tracing -------------------------------------------------------------------------------

    def trace(
        self, input: Any = None, *, remote: bool = False, blocking: bool = True, scan: bool | None = None, **kwargs: Any
    ) -> Tracer:
        """One forward pass on `input` (a prompt, prompts, or token ids); `**kwargs` go to forward.
        `scan`: check shapes on meta tensors before it runs (default: when remote; see CONFIG.scan)."""
        tracer = Tracer(self, input, remote, blocking, kwargs)
        tracer.scan = scan
        return tracer

    def generate(
        self,
        input: Any = None,
        *,
        max_new_tokens: int = 20,
        remote: bool = False,
        blocking: bool = True,
        seed: int | None = None,
        scan: bool | None = None,
        **kwargs: Any,
    ) -> Tracer:
        """One HF `generate` on `input`: the block's reads and edits bind to step 0 (the prompt's
        forward) unless a `for step in tracer.iter[...]` loop binds them to other steps;
        `tracer.result` is the generated token ids. `**kwargs` go to `generate` (do_sample,
        temperature, top_k, top_p, ...); `seed` seeds sampling, so a run is repeatable."""
        if type(max_new_tokens) is not int or max_new_tokens < 1:
            raise TracingError(f"max_new_tokens must be an integer >= 1, not {max_new_tokens!r}", user_location())
        kwargs["max_new_tokens"] = max_new_tokens
        if seed is not None:
            kwargs["seed"] = seed
        tracer = Tracer(self, input, remote, blocking, kwargs, kind="generate")
        tracer.scan = scan
        return tracer

    def session(self, remote: bool = False, blocking: bool = True, scan: bool | None = None) -> Session:
        return Session(remote=remote, blocking=blocking, scan=scan)

    # -- the module tree -----------------------------------------------------------------------

    @property
    def envoy(self) -> Envoy:
        if self._root is None:
            self._root = Envoy(self, self.module_tree, "")
        return self._root

    @property
    def module_tree(self) -> dict:
        if self._tree is None:
            self._tree = self._local_tree() if self.is_local else self.remote_info["module_tree"]
        return self._tree

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.envoy, name)

    @property
    def output(self):
        return self.envoy.output

    @output.setter
    def output(self, value):
        self.envoy.output = value

    @property
    def input(self):
        return self.envoy.input

    @property
    def inputs(self):
        return self.envoy.inputs

    def __call__(self, *args, **kwargs):
        return self.envoy(*args, **kwargs)

    @property
    def is_local(self) -> bool:
        """A folder on disk is run locally; anything else is taken as a served model name."""
        return os.path.isdir(self.name) or self._module is not None

    # -- local model ---------------------------------------------------------------------------

    def _local_tree(self) -> dict:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        if self._module is not None:
            return module_tree(self._module)
        config = AutoConfig.from_pretrained(self.name)
        with init_empty_weights():
            meta = AutoModelForCausalLM.from_config(config)
        return module_tree(meta)

    @property
    def local_module(self) -> torch.nn.Module:
        """The real model, loaded on first use (eval mode, no grad)."""
        if self._module is None:
            from transformers import AutoModelForCausalLM

            kwargs = {"dtype": self.dtype or "auto"}
            if self.device_map is not None:
                kwargs["device_map"] = self.device_map
            self._module = AutoModelForCausalLM.from_pretrained(self.name, **kwargs).eval()
            self._module.requires_grad_(False)
        return self._module

    @property
    def known_module_order(self) -> list[tuple[str, str]] | None:
        """`module_order` if it has been recorded (or fetched) already, else None."""
        return self._order

    @property
    def module_order(self) -> list[tuple[str, str]]:
        """The order module events fire in (recorded once), to reject out-of-order reads early."""
        if self._order is None:
            if self.is_local:
                from intervention.order import record_order

                self._order = record_order(self.local_module, self.tokenizer)
            else:
                self._order = [tuple(e) for e in self.remote_info.get("module_order", [])]
        return self._order

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    def _load_tokenizer(self):
        if self.is_local:
            return load_tokenizer(self.name)
        return load_tokenizer(tokenizer_dir(self.name, self.remote_info["tokenizer_files"]))

    @property
    def config(self) -> dict:
        if self.is_local:
            return self.local_module.config.to_dict()
        return self.remote_info["config"]

    @property
    def remote_info(self) -> dict:
        if self._remote_info is None:
            self._remote_info = fetch_model_info(self.name)
        return self._remote_info

    def __repr__(self) -> str:
        return f"LanguageModel({self.name!r})"
