"""The seed experiment, run locally: patch one prompt's hidden state into another's forward pass.

    python examples/seed_session_local.py MODEL_DIR

MODEL_DIR is a Hugging Face causal-LM folder (config, weights, tokenizer), e.g. the tiny Llama that
`python -m fixtures.tiny_models /tmp/models` writes to /tmp/models/tiny-llama (its predictions are
random tokens; a real model such as SmolLM2 answers " Paris" to the first prompt).

One session, three traces, run in order when the session block ends:
1. "The Eiffel Tower is in the city of": the last layer's hidden state at the last token is kept
   for trace 2 without being saved (it never leaves the engine), and the prediction is saved.
2. "Buckingham Palace is in the city of", with that hidden state written into layer 1's output at
   the last token; the patched prediction is saved and logged from inside the forward pass.
3. The same prompt again, stopped right after layer 0: what was saved before the stop comes back,
   what comes after it is never computed.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder needs no hub: fail fast without one

import client_sdk
from client_sdk import LanguageModel, TracingError

EIFFEL = "The Eiffel Tower is in the city of"
PALACE = "Buckingham Palace is in the city of"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a Hugging Face causal-LM folder")
    args = parser.parse_args(argv)
    model = LanguageModel(args.model_dir)

    with model.session():
        with model.trace(EIFFEL):
            hs = model.model.layers[-1].output[:, -1, :]  # not saved: flows to the next trace
            t1 = model.lm_head.output.argmax(dim=-1).save()
        with model.trace(PALACE):
            model.model.layers[1].output[:, -1, :] = hs
            t2 = model.lm_head.output.argmax(dim=-1).save()
            client_sdk.log("patched prediction:", t2[0, -1])  # printed while the model runs
        with model.trace(PALACE) as tracer:
            early = model.model.layers[0].output.save()
            tracer.stop()  # the rest of this forward pass does not run
            late = model.lm_head.output.save()

    # After the session block, saved names hold real tensors.
    eiffel, patched = int(t1[0, -1]), int(t2[0, -1])
    print(f"{EIFFEL!r} -> {model.tokenizer.decode(eiffel)!r} (token {eiffel})")
    print(f"{PALACE!r}, patched -> {model.tokenizer.decode(patched)!r} (token {patched})")
    print(f"stopped trace: layer 0 output saved, shape {tuple(early.shape)}")
    try:
        late.shape  # noqa: B018 - touching it is the point: it raises
    except TracingError as err:
        print(f"stopped trace: lm_head output not computed ({str(err).splitlines()[0]})")


if __name__ == "__main__":
    main()
