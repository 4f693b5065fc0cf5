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

# How long progress may wait to travel with later news (seconds). The replica sends a request's
# first events this late, and then at most one batch per this interval: every separate event
# costs a store call and a wake-up of each stream that follows the request. A request that ends
# within it reaches a blocking client as its end alone, straight from the replica's answer.
STATUS_HOLD_S = 0.1

# A blocking client's stream (POST's event stream, which starts after RECEIVED) sends status
# alone (QUEUED, RUNNING: the live status line) at most this often, the first time this long after
# RECEIVED; news (LOG, RETRYING) and the end go at once, taking the latest status with them.
# Without it, a session of many short traces sends more bytes of progress than of the values it
# saves.
STATUS_INTERVAL_S = 1.0

# The response header naming the request on a submit's event stream (POST /v1/requests with
# Accept: text/event-stream): it arrives with the status line, before any event, and stands for
# the stream's RECEIVED (whose only data is this id).
REQUEST_ID_HEADER = "X-Raysight-Request-Id"
