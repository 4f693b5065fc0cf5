"""Activation patching changes an answer: the Colosseum's city becomes Paris. One session, one request.

Trace 1 reads the hidden state of "The Eiffel Tower is in the city of" at one layer, last token
(unsaved: it stays in the cluster). Trace 2 runs "The Colosseum is in the city of" as is. Trace 3
runs it again with trace 1's state written into the same layer at the last token.

On SmolLM2-135M in float32 (what `make demo` serves) the answer moves from ' Rome' to ' Paris' at
layer 23 (the default) and at layers 27-29; at most other layers it stays ' Rome':
examples/patching_sweep.py shows every layer.

    RAYSIGHT_HOST=http://127.0.0.1:8000 RAYSIGHT_API_KEY=... python examples/patch_answer.py [MODEL [LAYER]]
"""

import sys

from client_sdk import LanguageModel

model = LanguageModel(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")
LAYER = int(sys.argv[2]) if len(sys.argv) > 2 else 23
SOURCE = "The Eiffel Tower is in the city of"
TARGET = "The Colosseum is in the city of"

with model.session(remote=True):
    with model.trace(SOURCE):
        state = model.model.layers[LAYER].output[:, -1, :]  # not saved: stays in the cluster
    with model.trace(TARGET):
        plain = model.lm_head.output[0, -1].softmax(dim=-1).save()
    with model.trace(TARGET):
        model.model.layers[LAYER].output[:, -1, :] = state  # the patch
        patched = model.lm_head.output[0, -1].softmax(dim=-1).save()


def answer(probs) -> str:
    token = probs.argmax()
    return f"{model.tokenizer.decode(token)!r} (id {token.item()}, p = {probs[token].item():.4f})"


print(f"{TARGET!r} -> {answer(plain)}")
print(f"the same, with layer {LAYER}'s last-token state from {SOURCE!r} -> {answer(patched)}")
