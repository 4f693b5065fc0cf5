"""Attribution patching: which positions of one layer matter for the answer, from one gradient.

One request, one trace with two invokes: the clean prompt and a corrupted one (left-padded to one
length, so positions line up from the end). The
metric is the logit difference between the clean answer and the corrupted answer at the last
position of the clean row. `with metric.backward():` backpropagates it to the activations (the
model's weights stay frozen on the server); the attribution of each position of layer LAYER is
`((h_corrupt - h_clean) * h_clean.grad).sum(-1)`: the linear estimate of how much patching that
position from the corrupted run would change the metric. Only the small per-position vector
comes back.

    RAYSIGHT_HOST=http://127.0.0.1:8000 RAYSIGHT_API_KEY=... python examples/attribution_patching.py [MODEL [LAYER]]
"""

import sys

from client_sdk import LanguageModel

model = LanguageModel(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")
layers = model.model.layers
LAYER = int(sys.argv[2]) if len(sys.argv) > 2 else len(layers) // 2
CLEAN, CORRUPT = "The Eiffel Tower is in the city of", "The Colosseum is in the city of"

with model.trace(remote=True) as tracer:
    with tracer.invoke(CLEAN):
        h_clean = layers[LAYER].output
        logits = model.lm_head.output[0, -1]
        clean_answer = logits.argmax().save()
    with tracer.invoke(CORRUPT):
        h_corrupt = layers[LAYER].output
        corrupt_answer = model.lm_head.output[0, -1].argmax().save()
    with tracer.invoke():  # no input: the whole batch, after both invokes
        metric = logits[clean_answer] - logits[corrupt_answer]
        with metric.backward():
            attribution = ((h_corrupt - h_clean) * h_clean.grad).sum(-1)[0].save()
        value = metric.save()

tokens = [model.tokenizer.decode(t) for t in model.tokenizer(CLEAN)["input_ids"]]
print(f"answers: clean {model.tokenizer.decode(clean_answer)!r}, corrupted {model.tokenizer.decode(corrupt_answer)!r}")
print(f"metric (logit difference) {float(value):.4f}; attribution per position of layer {LAYER}:")
for token, a in zip(tokens, attribution[-len(tokens):].tolist()):
    print(f"  {a:+.4f}  {token!r}")
