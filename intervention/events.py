"""What a request goes through, as its event stream and status report it (one definition for the
client, the ingress and the request store).

    RECEIVED -> QUEUED{position} -> RUNNING{trace, of} (LOG{message} any time) -> one terminal:
    COMPLETED | ERROR{code, message, location} | CANCELLED

    RETRYING{reason, attempt}: a service process died mid-request; it runs again from the start
    (once: traces have no side effects).
"""

from __future__ import annotations

RECEIVED = "RECEIVED"
QUEUED = "QUEUED"
RUNNING = "RUNNING"
LOG = "LOG"
COMPLETED = "COMPLETED"
ERROR = "ERROR"
CANCELLED = "CANCELLED"
RETRYING = "RETRYING"

TERMINAL: frozenset[str] = frozenset({COMPLETED, ERROR, CANCELLED})
# Status events describe a state, not news: a newer one makes an older one stale.
STATUS: frozenset[str] = frozenset({QUEUED, RUNNING})
