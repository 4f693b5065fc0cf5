"""Non-blocking: submit a trace, keep working, collect the result later.

With blocking=False the block returns as soon as the server accepted the request; the tracer is
then a handle: `.id`, `.status()`, `.result()` (waits, then the saved names hold their values),
`.cancel()`.

    RAYSIGHT_HOST=http://127.0.0.1:8000 RAYSIGHT_API_KEY=... python examples/nonblocking.py [MODEL]
"""

import sys

from client_sdk import LanguageModel

model = LanguageModel(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")
PROMPT = "The Colosseum is in the city of"

with model.trace(PROMPT, remote=True, blocking=False) as tracer:
    top = model.lm_head.output[0, -1].softmax(dim=-1).max(dim=-1)
    p, token = top.values.save(), top.indices.save()

print(f"submitted request {tracer.id}")
print(f"status: {tracer.status()['state']}")  # RECEIVED, QUEUED, RUNNING or already COMPLETED
tracer.result()  # waits for the end; `p` and `token` are tensors from here on
print(f"status: {tracer.status()['state']}")
print(f"{PROMPT!r} -> {model.tokenizer.decode(token)!r} (id {token.item()}, p = {p.item():.4f})")
