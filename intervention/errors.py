"""Errors that point at the user's code.

Every error raised while building, validating or executing a trace carries the location of the
statement that caused it, so the message reads like a traceback line of the user's own file.
"""

from __future__ import annotations

from intervention.ir import Location, format_location


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
        loc = self.location
        where = {"file": loc[0], "line": loc[1], "code": loc[2]} if loc else None
        return {"code": self.code, "message": self.message, "location": where}


class ValidationError(InterventionError):
    """The IR is malformed or asks for something not allowed. Raised before any model time."""

    code = "invalid_request"


class ExecutionError(InterventionError):
    """A node failed while the model ran (shape mismatch, bad index, out-of-order read...)."""

    code = "execution_error"
