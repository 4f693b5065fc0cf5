"""Logit lens: decode every layer's hidden state with the model's own final norm and head.

One trace reads each decoder layer's output at the last token and runs it through
`model.model.norm` and `model.lm_head` (calling an envoy runs that module on a value), keeping
only the top token and its probability per layer: a few numbers come back, not the logits.

    RAYSIGHT_HOST=http://127.0.0.1:8000 RAYSIGHT_API_KEY=... python examples/logit_lens.py [MODEL [PROMPT]]
"""

import sys

from client_sdk import LanguageModel

model = LanguageModel(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")
prompt = sys.argv[2] if len(sys.argv) > 2 else "The Eiffel Tower is in the city of"

with model.trace(prompt, remote=True):
    tops = []
    for layer in model.model.layers:
        logits = model.lm_head(model.model.norm(layer.output[0, -1]))
        top = logits.softmax(dim=-1).max(dim=-1)
        tops.append((top.indices.save(), top.values.save()))

print(f"logit lens of {prompt!r}: the top next token after each layer")
for i, (token, p) in enumerate(tops):
    print(f"  layer {i:2d}  {p.item():.4f}  {model.tokenizer.decode(token)!r:<14} (id {token.item()})")
