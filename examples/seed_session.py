"""The seed experiment, remotely: read a hidden state in one trace, patch it into another.

Trace 1 reads the last layer's hidden state at the last token of a prompt about the Eiffel Tower
(without saving it: it stays in the cluster) and saves the model's prediction. Trace 2 patches
that hidden state into layer 1 of a prompt about Buckingham Palace and saves its prediction.
Trace 3 shows an early stop: it saves layer 0's output, then stops; the rest of that forward
pass never runs.

    RAYSIGHT_HOST=http://127.0.0.1:8000 RAYSIGHT_API_KEY=... python examples/seed_session.py [MODEL]

`make demo` starts a local server with the default model and runs this against it.
"""

import sys

import client_sdk
from client_sdk import LanguageModel

model = LanguageModel(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")

with model.session(remote=True) as session:
    with model.trace("The Eiffel Tower is in the city of"):
        hs = model.model.layers[-1].output[:, -1, :]  # no .save(): stays in the cluster
        t1 = model.lm_head.output.argmax(dim=-1).save()
        client_sdk.log("trace 1 ran: the hidden state stays in the cluster")
    with model.trace("Buckingham Palace is in the city of"):
        model.model.layers[1].output[:, -1, :] = hs  # patch with trace 1's value
        t2 = model.lm_head.output.argmax(dim=-1).save()
        client_sdk.log("trace 2 ran: patched prediction token id", t2[0, -1])
    with model.trace("Buckingham Palace is in the city of") as tracer:
        first_layer = model.model.layers[0].output.save()
        tracer.stop()  # early stop: nothing after this point runs

print(f"T1 (Eiffel Tower):            {model.tokenizer.decode(t1[0, -1])!r}")
print(f"T2 (Buckingham, patched):     {model.tokenizer.decode(t2[0, -1])!r}")
print(f"T3 (stopped after layer 0):   layer 0 output {tuple(first_layer.shape)}")
