"""The engine's default bounds, one definition each (plain numbers: importing this costs nothing,
so the server's config can name them without importing torch).

`MAX_NEW_ELEMENTS`: the most elements one operation may create (ops.check_output), 1 GiB of
float32. `MAX_TRACE_BYTES`: what the tensors one trace computes may hold in all on a server (the
default of `limits.max_trace_bytes`, passed to each Program; local runs are not budgeted). `MAX_LOG_CHARS`: a `log` message's length on a
server (`limits.max_log_chars`); longer ones are cut, with a marker saying how much went.
`DEFAULT_MAX_NEW_TOKENS`: a served model's cap on generation length (its `max_new_tokens`).
`MAX_SAVED_BYTES`: what the values one request saves may hold in all, on a server (the result it
sends back; local runs are not capped).
"""

MAX_NEW_ELEMENTS = 2**28
MAX_TRACE_BYTES = 2**30
MAX_LOG_CHARS = 4096
MAX_SAVED_BYTES = 2**29  # what one request's saved values may hold in all (limits.max_saved_bytes)
DEFAULT_MAX_NEW_TOKENS = 256  # a model's cap on `generate`'s max_new_tokens unless its config says otherwise


def cap_log(message: str, limit: int = MAX_LOG_CHARS) -> str:
    """`message` cut to `limit` characters, ending with a marker of what was dropped."""
    if len(message) <= limit:
        return message
    dropped = len(message) - limit
    return f"{message[:limit]}… [log message cut: {dropped:,} more characters]"
