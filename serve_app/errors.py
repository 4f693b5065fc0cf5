"""HTTP errors in one shape: {"error": {"code", "message", "location"}}."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from intervention.errors import InterventionError

# Validation codes that mean "that thing does not exist" rather than "malformed".
_NOT_FOUND = {"unknown_model"}
_TOO_LARGE = {"too_large"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, location: dict | None = None, headers=None):
        self.status, self.code, self.message, self.location = status, code, message, location
        self.headers = headers
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "location": self.location}}


def from_intervention(err: InterventionError) -> ApiError:
    status = 404 if err.code in _NOT_FOUND else 413 if err.code in _TOO_LARGE else 422
    d = err.to_dict()
    return ApiError(status, d["code"], d["message"], d["location"])


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        body = ApiError(exc.status_code, "http_error", str(exc.detail)).body()
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(422, "invalid_request", str(exc.errors()[:3])).body(), status_code=422)
