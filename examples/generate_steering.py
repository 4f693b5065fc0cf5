"""Steering a generation: add a vector to one layer's output at every step while the model writes.

Request 1 saves the mean hidden state of two contrasting texts at one layer (two invokes, one
forward); their scaled difference is the steering vector, a torch.Tensor on the client. Request 2
is one greedy generation of the same prompt twice (two invokes, one batch): as is, and with the
vector added to the layer's last position at every step (`for step in tracer.all():`). It also
saves, per step, the probability the steered model gives its chosen token, and the token ids
(`tracer.result`).

    RAYSIGHT_HOST=http://127.0.0.1:8000 RAYSIGHT_API_KEY=... python examples/generate_steering.py [MODEL [LAYER]]
"""

import sys

from client_sdk import LanguageModel

model = LanguageModel(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")
layers = model.model.layers
LAYER = int(sys.argv[2]) if len(sys.argv) > 2 else len(layers) // 5
TOWARD, AWAY = " the beach, the sea, the waves", " the city, the road, the cars"
PROMPT = "Yesterday I went to the"
SCALE = 4.0
NEW_TOKENS = 12

with model.trace(remote=True) as tracer:
    with tracer.invoke(TOWARD):
        toward = layers[LAYER].output[0, 1:].mean(dim=0).save()
    with tracer.invoke(AWAY):
        away = layers[LAYER].output[0, 1:].mean(dim=0).save()

steer = SCALE * (toward - away)  # computed here, on the client; sent with the next request

confidence = []
with model.generate(max_new_tokens=NEW_TOKENS, remote=True) as tracer:
    with tracer.invoke(PROMPT):
        pass  # the baseline: this row is generated as is
    with tracer.invoke(PROMPT):
        for step in tracer.all():
            layers[LAYER].output[:, -1] += steer
            confidence.append(model.lm_head.output[0, -1].softmax(dim=-1).max().save())
    with tracer.invoke():  # no input: sees the whole batch
        ids = tracer.result.save()

new = ids[:, -NEW_TOKENS:]
print(f"steering vector: layer {LAYER}, norm {steer.norm():.2f} = {SCALE} x ({TOWARD!r} - {AWAY!r})")
print(f"without steering: {PROMPT}{model.tokenizer.decode(new[0])!r}")
print(f"with steering:    {PROMPT}{model.tokenizer.decode(new[1])!r}")
print("steered confidence per step: " + " ".join(f"{float(p):.4f}" for p in confidence))
