"""Steering: add a vector made on the client to one layer's output; compare the predictions.

Request 1 saves the mean hidden state (every position but the first) of two contrasting texts at
one layer, in one batched forward (two invokes). Their difference, scaled, is the steering vector:
a torch.Tensor on the client. Request 2 runs the prompt twice in one batched forward: as is, and
with the vector added to that layer's output. Each invoke sees only its own row, so the first one
is the unsteered baseline.

    RAYSIGHT_HOST=http://127.0.0.1:8000 RAYSIGHT_API_KEY=... python examples/steering.py [MODEL [LAYER]]
"""

import sys

from client_sdk import LanguageModel

model = LanguageModel(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")
layers = model.model.layers
LAYER = int(sys.argv[2]) if len(sys.argv) > 2 else len(layers) // 5
TOWARD, AWAY = " the beach, the sea, the waves", " the city, the road, the cars"
PROMPT = "Yesterday I went to the"
SCALE = 2.0

with model.trace(remote=True) as tracer:
    with tracer.invoke(TOWARD):
        toward = layers[LAYER].output[0, 1:].mean(dim=0).save()
    with tracer.invoke(AWAY):
        away = layers[LAYER].output[0, 1:].mean(dim=0).save()

steer = SCALE * (toward - away)  # computed here, on the client; sent with the next request

with model.trace(remote=True) as tracer:
    with tracer.invoke(PROMPT):
        top = model.lm_head.output[0, -1].softmax(dim=-1).topk(5)
        plain_p, plain_ids = top.values.save(), top.indices.save()
    with tracer.invoke(PROMPT):
        layers[LAYER].output[:, 1:] += steer
        top = model.lm_head.output[0, -1].softmax(dim=-1).topk(5)
        steered_p, steered_ids = top.values.save(), top.indices.save()

print(f"steering vector: layer {LAYER}, norm {steer.norm():.2f} = {SCALE} x ({TOWARD!r} - {AWAY!r})")
for title, probs, ids in (("without", plain_p, plain_ids), ("with", steered_p, steered_ids)):
    print(f"{PROMPT!r} {title} steering:")
    for p, i in zip(probs.tolist(), ids.tolist()):
        print(f"  {p:.4f}  {model.tokenizer.decode(i)!r:<14} (id {i})")
