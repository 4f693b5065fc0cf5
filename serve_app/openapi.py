"""The OpenAPI schema's account of what the routes can answer besides success: their error
statuses (one body shape, `ErrorBody`), the bearer-key security scheme, the raw safetensors
request body and the event-stream answers. Kept in one table here, applied to the schema FastAPI
builds from the routes, so the routes stay short and the schema stays true (the schemathesis run
in tests/test_openapi_fuzz.py checks every answer against it).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from serve_app.schemas import CancelAnswer, ErrorBody

_WHY = {
    401: "Missing or invalid API key",
    404: "No such model or request (a request is visible to its owner only)",
    409: "The request has no result (not finished, failed or cancelled)",
    410: "The result was fetched already and has expired",
    413: "The body or a quota is over its limit",
    422: "Malformed request (body, header or parameter)",
    429: "Over a per-user limit (concurrent requests, open streams, quotas)",
    503: "The request store is unavailable; retry shortly",
}
_REQUEST = (401, 404, 422, 503)  # every route on one request: auth, ownership, bad id/header, store
ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("get", "/v1/models"): (401,),
    ("get", "/v1/models/{name}"): (401, 404, 422),
    ("post", "/v1/requests"): (401, 404, 413, 422, 429, 503),
    ("get", "/v1/requests/{request_id}"): _REQUEST,
    ("get", "/v1/requests/{request_id}/events"): (*_REQUEST, 429),
    ("get", "/v1/requests/{request_id}/result"): (*_REQUEST, 409, 410),
    ("delete", "/v1/requests/{request_id}"): _REQUEST,
}
_EVENTS = {"text/event-stream": {"schema": {"type": "string"}}}


def install(app: FastAPI) -> None:
    """Make `app`'s /openapi.json carry the table above (built once, on the first call)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            _document(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # FastAPI's documented way to customise the schema


def _document(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for model in (ErrorBody, CancelAnswer):
        defs = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in defs.pop("$defs", {}).items():
            schemas.setdefault(name, sub)
        schemas[model.__name__] = defs
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for (method, path), statuses in ERRORS.items():
        op = schema["paths"][path][method]
        op["security"] = [{"bearer": []}]
        responses = op["responses"]
        for status in statuses:
            responses[str(status)] = {"description": _WHY[status], "content": error}
    paths = schema["paths"]
    submit = paths["/v1/requests"]["post"]
    submit["requestBody"] = {
        "required": True,
        "description": "A safetensors file whose metadata holds the session IR as JSON",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
    submit["parameters"] = [
        {"name": "X-Raysight-Timeout", "in": "header", "required": False,
         "description": "Seconds, capped by the server's limit", "schema": {"type": "number", "exclusiveMinimum": 0}},
    ]
    submit["responses"]["202"]["content"].update(_EVENTS)  # with `Accept: text/event-stream`
    events = paths["/v1/requests/{request_id}/events"]["get"]
    events["responses"]["200"]["content"] = _EVENTS
    events.setdefault("parameters", []).append(
        {"name": "Last-Event-ID", "in": "header", "required": False,
         "description": "Resume after this event id", "schema": {"type": "integer", "minimum": 0}},
    )
    paths["/v1/requests/{request_id}"]["delete"]["responses"]["202"]["content"] = {
        "application/json": {"schema": {"$ref": "#/components/schemas/CancelAnswer"}}}
