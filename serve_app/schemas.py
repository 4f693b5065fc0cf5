"""Response models of the HTTP API (they document the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class Accepted(BaseModel):
    id: str


class ModelSummary(BaseModel):
    name: str
    replicas: int  # RUNNING replicas, from Serve (autoscaling changes it)
    state: str  # Serve's deployment status (HEALTHY, UPSCALING, DOWNSCALING, ...)
    queue_length: int  # requests waiting in the model's replicas, summed over all of them
    running: int  # requests running on them now
    nodes: list[str]  # the Ray node id each replica runs on (one entry per replica that answered)


class ModelInfo(BaseModel):
    name: str
    module_tree: dict[str, Any]
    config: dict[str, Any]
    tokenizer_files: dict[str, str]
    dtype: str
    placement: dict[str, str]
    module_order: list[list[str]]


class RequestStatus(BaseModel):
    id: str
    state: str
    created: float
    finished: float | None
    traces: int
    queue_position: int | None
    running: dict[str, Any] | None
    result_available: bool
    error: dict[str, Any] | None


class ErrorDetail(BaseModel):
    code: str
    message: str
    location: dict[str, Any] | None


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: {"error": {"code", "message", "location"}}."""

    error: ErrorDetail


class CancelAnswer(BaseModel):
    id: str
    state: str
    cancel_requested: bool
