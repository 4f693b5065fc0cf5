"""The application config: the `args` of the Serve app, also the file `raysight serve` reads.

A Serve config YAML is the source of truth:

    applications:
    - name: raysight
      route_prefix: /
      import_path: serve_app.app:build_app
      args:
        models:
        - name: smollm2-135m
          path: ~/.cache/raysight/models/smollm2-135m
          dtype: float32
          gpus_per_replica: 0
          num_replicas: 1            # or autoscaling_config: {min_replicas: 1, max_replicas: 4}
        auth:
          api_keys:
          - user: alice
            key_sha256: 5e88...      # `raysight keys hash` prints it; plain keys never stored
        limits: {max_request_bytes: 67108864, request_timeout_s: 300, max_concurrent_per_user: 4}
        result_ttl_s: 3600
        state_dir: ~/.raysight/state   # request state and results (see docs/operator.md)
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actors.state_db import DEFAULT_STATE_DIR
from intervention.batching import BATCH_WAIT_MS, MAX_BATCH_SIZE, MAX_BATCH_TOKENS
from intervention.limits import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_LOG_CHARS,
    MAX_SAVED_BYTES,
    MAX_TRACE_BYTES,
)


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    path: str  # a local folder, or a Hub id `org/name` (see is_hub_id)
    dtype: str = "float32"
    gpus_per_replica: float = 0
    cpus_per_replica: float = 0
    num_replicas: int | None = None
    autoscaling_config: dict[str, Any] | None = None
    # Calls one replica accepts at once; more wait in Serve's router (FIFO, outside the fair
    # queue): keep it above the requests all users may have running (a full batch at least).
    max_ongoing_requests: int = Field(default=256, ge=1)
    # Cross-request batching (docs/operator.md): a forward holds at most max_batch_size rows and
    # max_batch_tokens (rows x the longest prompt); an idle replica waits up to batch_wait_ms for
    # more traces before it starts a batch.
    max_batch_size: int = Field(default=MAX_BATCH_SIZE, ge=1)
    max_batch_tokens: int = Field(default=MAX_BATCH_TOKENS, ge=1)
    batch_wait_ms: float = Field(default=BATCH_WAIT_MS, ge=0, le=1000)
    # Ray custom resources each replica asks for (on top of its GPUs and CPUs), e.g. {"a100": 1}
    # where the worker nodes are started with `--resources='{"a100": 8}'`: pins the model to the
    # nodes that have them. Ray's own resource names go in gpus_per_replica / cpus_per_replica.
    resources: dict[str, float] = Field(default_factory=dict)
    # How long a replica Serve stops (scale-down, redeploy) may take to finish the requests it
    # holds before it is killed: None means the request time limit (limits.request_timeout_s), so
    # that a replica stopping never cuts a request short that would otherwise have finished.
    graceful_shutdown_timeout_s: float | None = Field(default=None, gt=0)
    # The longest generation one trace may ask for (model.generate's max_new_tokens).
    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in ("float32", "float16", "bfloat16", "auto"):
            raise ValueError("dtype must be float32, float16, bfloat16 or auto")
        return v

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if name in RAY_OWN_RESOURCES:
                raise ValueError(f"resources: {name!r} is Ray's own resource; use {RAY_OWN_RESOURCES[name]} instead")
            if not _RESOURCE_NAME.match(name):
                raise ValueError(f"resources: {name!r} is not a resource name (letters, digits, and _ - . : /)")
            if not 0 < amount < float("inf"):  # nan fails too
                raise ValueError(f"resources: {name!r} must ask for a positive, finite amount, got {amount!r}")
            if amount > 1 and amount != int(amount):
                raise ValueError(f"resources: {name!r} above 1 must be a whole number (Ray's rule), got {amount!r}")
        return v

    @model_validator(mode="after")
    def _replicas(self) -> ModelConfig:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("give num_replicas or autoscaling_config, not both")
        if self.autoscaling_config is not None:
            _check_autoscaling(self.autoscaling_config)
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least max_batch_size "
                             f"({self.max_batch_size}): a replica batches only the calls it has accepted")
        return self

    def resolved_path(self) -> str:
        """A Hub id as written; a folder absolute (`~` expanded), so a replica whose working
        directory differs from the launcher's finds the same folder."""
        return self.path if is_hub_id(self.path) else str(Path(self.path).expanduser().absolute())


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_keys: list[ApiKey] = Field(default_factory=list)


class LimitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_request_bytes: int = 64 * 2**20
    request_timeout_s: float = 300.0
    max_concurrent_per_user: int = 4
    max_traces: int = 64
    max_nodes: int = 20_000
    # What one trace's computed tensors may hold in all, on its replica (a user error beyond).
    max_trace_bytes: int = Field(default=MAX_TRACE_BYTES, gt=0)
    # What the values one request saves may hold in all (its result); beyond, the request ends in
    # ERROR `too_large` at the save that crossed it.
    max_saved_bytes: int = Field(default=MAX_SAVED_BYTES, gt=0)
    # Longer `log` messages are cut, with a marker saying how much was dropped.
    max_log_chars: int = Field(default=MAX_LOG_CHARS, gt=0)
    # Event streams (GET .../events, and POST with Accept: text/event-stream) one user may hold
    # open at once, per ingress replica; one more is a 429.
    max_streams_per_user: int = Field(default=16, gt=0)
    # Quotas on what a user's requests hold in the request store: unfetched result bytes (until
    # fetched or expired) and log bytes (until the request expires). At the limit, submitting is 429.
    max_result_bytes_per_user: int = Field(default=1 << 30, gt=0)
    max_log_bytes_per_user: int = Field(default=64 << 20, gt=0)


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig]
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    result_ttl_s: float = 3600.0
    # Request state (SQLite) and result files: survive any process death and a restart of
    # `raysight serve` with the same folder. On a cluster: a folder on the head node.
    state_dir: str = DEFAULT_STATE_DIR

    def resolved_state_dir(self) -> str:
        return str(Path(self.state_dir).expanduser().absolute())

    @model_validator(mode="after")
    def _unique(self) -> AppConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique")
        if not names:
            raise ValueError("configure at least one model")
        return self


def _check_autoscaling(cfg: dict[str, Any]) -> None:
    """Serve ignores unknown autoscaling keys; a typo there must not pass silently."""
    from ray.serve.config import AutoscalingConfig

    unknown = set(cfg) - set(AutoscalingConfig.model_fields)
    if unknown:
        raise ValueError(f"unknown autoscaling_config keys: {sorted(unknown)}")
    AutoscalingConfig(**cfg)


# Resources a model must not name in `resources`: Ray's own, each with its config field.
RAY_OWN_RESOURCES = {"CPU": "cpus_per_replica", "GPU": "gpus_per_replica", "memory": "a Ray memory option",
                     "object_store_memory": "a Ray memory option"}
_RESOURCE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}$")


# Hugging Face repo ids: `org/name`, letters, digits and `._-`, no `--` or `..` (the Hub's rule).
_HUB_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def is_hub_id(path: str) -> bool:
    """Whether a model `path` means a Hugging Face Hub id rather than a local folder.

    The rule (docs/operator.md): a value that exists on disk, or starts with `/`, `~` or `.`, is
    a folder; otherwise it is a Hub id if it has the form `org/name` (exactly one `/`), and a
    folder relative to the working directory if not (so a bare `gpt2` is a folder: write the
    Hub's `openai-community/gpt2`)."""
    if path.startswith(("/", "~", ".")) or os.path.exists(path):
        return False
    return bool(_HUB_ID.match(path))


def hash_key(key: str) -> str:
    """API keys are stored and compared as SHA-256 hex digests, never in plain text."""
    return hashlib.sha256(key.encode()).hexdigest()
