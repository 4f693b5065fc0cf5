"""Cross-model session: move a hidden state from one deployment into another.

Model A reads a late layer's hidden state at the last token of one prompt; it never leaves the
cluster. Model B runs another prompt twice: as is, and with that state patched into the same
relative depth of its own layers (4/5 of the way: where examples/patching_sweep.py shows
SmolLM2's answer has moved to the last token). The two deployments may differ in dtype (the demo
serves SmolLM2 in float32 and in bfloat16) or in architecture (Llama-style `model.layers` or GPT-2
`transformer.h`), as long as their hidden sizes match.

    RAYSIGHT_HOST=http://127.0.0.1:8000 RAYSIGHT_API_KEY=... python examples/cross_model.py [MODEL_A MODEL_B]
"""

import sys

import client_sdk
from client_sdk import LanguageModel

a = LanguageModel(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")
b = LanguageModel(sys.argv[2] if len(sys.argv) > 2 else "smollm2-135m-bf16")
SOURCE = "The Eiffel Tower is in the city of"
TARGET = "Buckingham Palace is in the city of"


def decoder_layers(model):
    """The decoder layers, wherever the architecture keeps them (Llama-style or GPT-2)."""
    return model.model.layers if "model" in model.module_tree["children"] else model.transformer.h


layers_a, layers_b = decoder_layers(a), decoder_layers(b)
la, lb = len(layers_a) * 4 // 5, len(layers_b) * 4 // 5

with client_sdk.session(remote=True):
    with a.trace(SOURCE):
        state = layers_a[la].output[:, -1, :]  # stays in the cluster, moves between deployments
        a_top = a.lm_head.output[0, -1].argmax().save()
    with b.trace(TARGET):
        b_top = b.lm_head.output[0, -1].argmax().save()
        b_p = b.lm_head.output[0, -1].softmax(dim=-1)[a_top].save()
    with b.trace(TARGET):
        layers_b[lb].output[:, -1, :] = state
        patched_top = b.lm_head.output[0, -1].argmax().save()
        patched_p = b.lm_head.output[0, -1].softmax(dim=-1)[a_top].save()

print(f"{a.name} on {SOURCE!r}: {a.tokenizer.decode(a_top)!r} (id {a_top.item()})")
print(f"{b.name} on {TARGET!r}: {b.tokenizer.decode(b_top)!r} (id {b_top.item()}); "
      f"p(id {a_top.item()}) = {b_p.item():.4f}")
print(f"{b.name} with {a.name}'s layer {la} state patched into its layer {lb}: "
      f"{b.tokenizer.decode(patched_top)!r} (id {patched_top.item()}); "
      f"p(id {a_top.item()}) = {patched_p.item():.4f}")
