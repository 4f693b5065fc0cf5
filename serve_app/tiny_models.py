"""Tiny random Hugging Face models built offline, for tests, benchmarks and examples.

The machines this project runs on cannot reach the Hugging Face hub, so every model the test
suite, the benchmarks and the examples need is built here from a fixed local text and a seed.
The result is deterministic: the same seed always gives the same weights and the same tokenizer.

    python -m serve_app.tiny_models DIR    # writes DIR/tiny-llama and DIR/tiny-gpt2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
VOCAB_SIZE = 1000
MAX_POSITIONS = 256

# Training text for the tokenizer. It contains the factual-recall prompts the examples use
# ("The Eiffel Tower is in the city of"), so those words become single or few tokens.
CORPUS = """\
The Eiffel Tower is in the city of Paris. It was built by Gustave Eiffel for the World's Fair of
1889, and for forty years it was the tallest structure in the world. Millions of people visit
Paris every year to climb the tower, walk along the river Seine and see the lights at night.

Buckingham Palace is in the city of London. It is the home of the British royal family, and the
changing of the guard takes place in front of the palace on most mornings. London is also known
for the Tower Bridge, the river Thames, red buses, black taxis and a great many museums.

The Colosseum is in the city of Rome. The ancient amphitheatre could hold about fifty thousand
people, who came to watch games, hunts and public shows. Rome was the capital of a large empire,
and its roads, temples, bridges and aqueducts can still be seen across Europe today.

The Statue of Liberty is in the city of New York. The Brandenburg Gate is in the city of Berlin.
The Sagrada Familia is in the city of Barcelona. The Acropolis is in the city of Athens. The
Kremlin is in the city of Moscow. The Forbidden City is in the city of Beijing. The Golden Gate
Bridge is in the city of San Francisco. The Space Needle is in the city of Seattle.

A language model reads a prompt one token at a time and predicts the next token. Researchers who
study how such models work look at the hidden states of each layer, patch activations from one
prompt into another, and measure how the answer changes. A small random model is enough to check
that the tools work: the numbers are meaningless, but the shapes, the order of operations and the
results of every intervention can be compared exactly with a reference implementation.
"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on CORPUS (milliseconds, no download needed).

    Byte-level means any text encodes, even words never seen in CORPUS. Padding is on the left
    so that the last position of every row in a batch is the last real token of its prompt.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=MAX_POSITIONS,
    )


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Token ids every config needs, so generate() and padding agree with the tokenizer."""
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A 4-layer Llama with random weights: grouped-query attention, untied lm_head."""
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        **_special_ids(tokenizer),
    )
    with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the caller's RNG
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def tiny_gpt2(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> GPT2LMHeadModel:
    """A 4-layer GPT-2 with random weights; its lm_head is tied to the input embedding."""
    config = GPT2Config(
        n_embd=64, n_layer=4, n_head=4, n_positions=MAX_POSITIONS, **_special_ids(tokenizer)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config).eval()  # eval(): from_config models start with dropout on
    model.tie_weights()
    assert model.lm_head.weight is model.transformer.wte.weight, "GPT-2 embeddings must be tied"
    return model


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: Path | str) -> Path:
    """Write model (safetensors) and tokenizer side by side, as from_pretrained expects."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_llama(out_dir: Path | str, seed: int = 0) -> Path:
    """Build the tiny Llama and its tokenizer into out_dir; return out_dir as a Path."""
    tokenizer = build_tokenizer()
    return _save(tiny_llama(tokenizer, seed), tokenizer, out_dir)


def build_tiny_gpt2(out_dir: Path | str, seed: int = 0) -> Path:
    """Build the tiny GPT-2 and its tokenizer into out_dir; return out_dir as a Path."""
    tokenizer = build_tokenizer()
    return _save(tiny_gpt2(tokenizer, seed), tokenizer, out_dir)


def main(argv: list[str] | None = None) -> None:
    """Command line: write DIR/tiny-llama and DIR/tiny-gpt2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()  # one line per model is enough on the command line
    for name, build in (("tiny-llama", build_tiny_llama), ("tiny-gpt2", build_tiny_gpt2)):
        print(build(args.out_dir / name, seed=args.seed))


if __name__ == "__main__":
    main()
