"""Every decoding strategy, over every language-model family: cached generation equals uncached generation token for
token, and every forward `generate` runs equals a full, cache-free forward (1e-5)."""

from __future__ import annotations

import functools

import pytest
import torch
from generation_checks import assert_forwards_match_full_forwards, record_forwards
from model_testers import LM_FAMILIES, PAD_TOKEN_ID, build_model, interleaved_batch, open_gates

COMMON = dict(max_new_tokens=6, min_new_tokens=6, pad_token_id=PAD_TOKEN_ID, eos_token_id=None)

# name -> (generate arguments, whether the strategy needs a batch of one, whether it can run without a cache)
STRATEGIES = {
    "greedy": ({}, False, True),
    "beams": ({"num_beams": 3}, False, True),
    "beams-nrs2": ({"num_beams": 3, "num_return_sequences": 2}, False, True),
    "sampling-nrs2": ({"do_sample": True, "num_return_sequences": 2, "top_k": 0}, False, True),
    "prompt-lookup": ({"prompt_lookup_num_tokens": 2}, True, False),
    "assisted": ({}, True, False),  # the assistant is another Flamingo (different weights), see `_settings`
    "static": ({"cache_implementation": "static"}, False, False),
}


@functools.cache
def _model(family: str, only_attend_immediate_media: bool = True, seed: int = 0):
    model = build_model(family, seed=seed, only_attend_immediate_media=only_attend_immediate_media)
    open_gates(model, seed=seed + 1)
    return model


def _inputs(batch_of_one: bool) -> dict[str, torch.Tensor]:
    batch = interleaved_batch()
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.pixel_values}
    return {name: value[:1] for name, value in inputs.items()} if batch_of_one else inputs


def _settings(strategy: str, family: str, immediate: bool) -> dict:
    settings = dict(STRATEGIES[strategy][0])
    if strategy == "assisted":
        settings["assistant_model"] = _model(family, immediate, seed=5)
    return settings


def _check(family: str, strategy: str, immediate: bool = True) -> None:
    model = _model(family, immediate)
    settings, batch_of_one, runs_uncached = STRATEGIES[strategy]
    inputs = _inputs(batch_of_one)
    with record_forwards(model) as forwards:
        torch.manual_seed(0)
        cached = model.generate(**inputs, use_cache=True, **_settings(strategy, family, immediate), **COMMON)
    # The reference: the same decoding without a cache (every step a full forward), or plain greedy decoding for
    # the strategies that need a cache (assisted and prompt-lookup decoding are exact under greedy decoding).
    torch.manual_seed(0)
    uncached = model.generate(**inputs, use_cache=False, **(settings if runs_uncached else {}), **COMMON)
    assert cached.tolist() == uncached.tolist()
    assert_forwards_match_full_forwards(model, forwards, inputs["pixel_values"], inputs["input_ids"])


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("family", LM_FAMILIES)
def test_cached_generation_equals_uncached_and_full_forwards(family, strategy):
    _check(family, strategy)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_attending_to_all_previous_images(strategy):
    """`only_attend_immediate_media=False`: continuing tokens attend to every image of their prompt."""
    _check("llama", strategy, immediate=False)
