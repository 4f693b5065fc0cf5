"""Activation patching sweep: which layer carries the answer? One session, one request.

Trace 1 runs the clean prompt and keeps every layer's hidden state at the last token (unsaved:
they stay in the cluster) and its answer. Trace 2 runs the corrupted prompt as is. Then one trace
per layer runs the corrupted prompt with that layer's last-token hidden state replaced by the
clean one, and saves only the probability of the clean answer.

    RAYSIGHT_HOST=http://127.0.0.1:8000 RAYSIGHT_API_KEY=... python examples/patching_sweep.py [MODEL]
"""

import sys

from client_sdk import LanguageModel

model = LanguageModel(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")
layers = model.model.layers
CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"

with model.session(remote=True):
    with model.trace(CLEAN):
        clean_states = [layer.output[:, -1, :] for layer in layers]  # no .save(): stay in the cluster
        answer = model.lm_head.output[0, -1].argmax().save()
        clean_p = model.lm_head.output[0, -1].softmax(dim=-1)[answer].save()
    with model.trace(CORRUPT):
        corrupt_p = model.lm_head.output[0, -1].softmax(dim=-1)[answer].save()
    patched_p = []
    for layer, state in zip(layers, clean_states):
        with model.trace(CORRUPT):
            layer.output[:, -1, :] = state
            patched_p.append(model.lm_head.output[0, -1].softmax(dim=-1)[answer].save())

print(f"clean answer {model.tokenizer.decode(answer)!r} (id {answer.item()}): "
      f"p = {clean_p.item():.4f} on the clean prompt, {corrupt_p.item():.4f} on the corrupted one")
print(f"patching the clean last-token state into {CORRUPT!r}:")
for i, p in enumerate(patched_p):
    print(f"  layer {i:2d}  p = {p.item():.4f}  {'#' * round(40 * p.item())}")
