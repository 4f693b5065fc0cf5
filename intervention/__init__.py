"""The contract between client and cluster: the IR, its wire format, validation, and the engine."""

from intervention.errors import ExecutionError, InterventionError, ValidationError
from intervention.ir import IR_VERSION, Invoke, Node, SessionIR, TraceIR

__all__ = [
    "IR_VERSION",
    "ExecutionError",
    "InterventionError",
    "Invoke",
    "Node",
    "SessionIR",
    "TraceIR",
    "ValidationError",
]
