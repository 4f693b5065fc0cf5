"""Errors that point at the user's code.

Every error raised while building, validating or executing a trace carries the location of the
statement that caused it, so the message reads like a traceback line of the user's own file. On the
wire a location is `{"file", "line", "code"}` (`location_dict` / `location_from_dict`, the one
definition both sides use).
"""

from __future__ import annotations

from typing import Any

from intervention.ir import Location, format_location


def location_dict(loc: Location | None) -> dict[str, Any] | None:
    """A location as JSON: what error bodies and ERROR events carry."""
    if not loc:
        return None
    return {"file": loc[0], "line": loc[1], "code": loc[2]}


def location_from_dict(where: dict[str, Any] | None) -> Location | None:
    if not where:
        return None
    return (where["file"], where["line"], where.get("code", ""))


class InterventionError(Exception):
    """Something about an intervention is wrong. `code` is stable and machine-readable."""

    code = "intervention_error"

    def __init__(self, message: str, location: Location | None = None, code: str | None = None):
        self.message = message
        self.location = tuple(location) if location else None
        if code:
            self.code = code
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if not self.location:
            return self.message
        return f"{self.message}\n  {format_location(self.location)}"

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "location": location_dict(self.location)}


class ValidationError(InterventionError):
    """The IR is malformed or asks for something not allowed. Raised before any model time."""

    code = "invalid_request"


class ExecutionError(InterventionError):
    """A node failed while the model ran (shape mismatch, bad index, out-of-order read...)."""

    code = "execution_error"


class Cancelled(InterventionError):
    """The request was cancelled (or ran out of time) while its program was running."""

    code = "cancelled"

    def __init__(self, message: str = "the request was cancelled"):
        super().__init__(message)
