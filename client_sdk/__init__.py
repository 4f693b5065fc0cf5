"""What researchers import: nnsight-style tracing that runs locally or on a raysight cluster.

    from client_sdk import LanguageModel, CONFIG
    import client_sdk

    model = LanguageModel("smollm2-135m")
    with model.trace("The Eiffel Tower is in the city of", remote=True):
        logits = model.lm_head.output.save()
"""

from client_sdk.config import CONFIG
from client_sdk.language_model import LanguageModel
from client_sdk.proxy import Proxy, TracingError
from client_sdk.remote import RemoteError
from client_sdk.tracing import Session, Tracer, log, save, session, stop
from intervention.errors import ExecutionError, InterventionError, ValidationError

__all__ = [
    "CONFIG",
    "ExecutionError",
    "InterventionError",
    "LanguageModel",
    "Proxy",
    "RemoteError",
    "Session",
    "Tracer",
    "TracingError",
    "ValidationError",
    "log",
    "save",
    "session",
    "stop",
]
