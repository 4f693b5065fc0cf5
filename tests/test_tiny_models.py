"""The tiny models must reload offline, bit for bit, or every parity test built on them lies."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fixtures.tiny_models import build_tokenizer, tiny_gpt2, tiny_llama

PROMPT = "The Eiffel Tower is in the city of"
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(params=sorted(BUILDERS))
def model_case(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """Each saved tiny model, by name, so every check runs on both architectures."""
    return request.param, request.getfixturevalue(f"tiny_{request.param}_path")


def test_reload_offline_gives_identical_logits(model_case: tuple[str, Path]) -> None:
    name, path = model_case
    assert (path / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    in_memory = BUILDERS[name](build_tokenizer(), seed=0)  # same seed as the fixture
    assert not reloaded.training and not in_memory.training
    batch = tokenizer([PROMPT, "Paris"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = in_memory(**batch).logits
        actual = reloaded(**batch).logits
    assert actual.shape == (2, batch.input_ids.shape[1], len(tokenizer))
    assert torch.equal(actual, expected)


def test_seed_changes_weights() -> None:
    tokenizer = build_tokenizer()
    a, b = tiny_llama(tokenizer, seed=0), tiny_llama(tokenizer, seed=1)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_gpt2_embeddings_stay_tied_after_reload(tiny_gpt2_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_llama_lm_head_is_untied(tiny_llama_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_round_trips_and_matches_fresh_build(model_case: tuple[str, Path]) -> None:
    _, path = model_case
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(PROMPT).input_ids
    assert tokenizer.decode(ids) == PROMPT
    assert ids == build_tokenizer()(PROMPT).input_ids  # training is deterministic
    assert len(ids) <= 10  # the corpus makes the prompt's words whole tokens


def test_left_padding_is_configured(model_case: tuple[str, Path]) -> None:
    _, path = model_case
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None and tokenizer.bos_token and tokenizer.eos_token
    batch = tokenizer([PROMPT, "Rome"], padding=True)
    short_ids, short_mask = batch.input_ids[1], batch.attention_mask[1]
    assert short_ids[0] == tokenizer.pad_token_id and short_mask[0] == 0
    assert short_mask[-1] == 1  # the last position is a real token in every row


def test_hub_is_offline() -> None:
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # conftest must set it before huggingface_hub is imported
