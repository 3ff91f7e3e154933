"""The name under which transformers passes and returns the key/value cache, for the installed release.

transformers 5.24 renamed the cache from `past_key_values` to `cache`: `GenerationMixin` passes it to `forward` as
`cache=`, reads it back only from `outputs.cache`, and deprecates the old name (a model that still reads
`past_key_values` silently receives no cache). This module is the one place in hf_flamingo that knows about the
rename. It reads the name from transformers' own public output class, `CausalLMOutputWithPast`, instead of comparing
version numbers, so it follows whatever the installed release does.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

LEGACY_CACHE_NAME = "past_key_values"
"""The cache's name up to transformers 5.23 (still accepted, deprecated from 5.24)."""

CACHE_NAME: str = (
    "cache" if "cache" in {field.name for field in dataclasses.fields(CausalLMOutputWithPast)} else LEGACY_CACHE_NAME
)
"""The cache's name in the installed transformers: `"cache"` from 5.24 on, `"past_key_values"` before."""

_BOTH_NAMES = (CACHE_NAME, "cache" if CACHE_NAME == LEGACY_CACHE_NAME else LEGACY_CACHE_NAME)


def merge_cache_arguments(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache a `forward` was given under either name.

    Raises:
        ValueError: If both names were given.
    """
    if cache is not None and past_key_values is not None:
        raise ValueError(
            "Got both `cache` and `past_key_values`: pass the key/value cache once (`past_key_values` is its name "
            "before transformers 5.24)."
        )
    return cache if cache is not None else past_key_values


def cache_argument_name(module: nn.Module) -> str:
    """The keyword under which `module.forward` takes the cache.

    transformers' own models take the installed release's name; a model written for another release (remote code, a
    port) may take only the other one. Models that take neither explicitly get the installed release's name.
    """
    parameters = inspect.signature(module.forward).parameters
    for name in _BOTH_NAMES:
        if name in parameters:
            return name
    return CACHE_NAME


def cache_from_output(output: Any) -> Cache | None:
    """The cache in a model output, under whichever name its class declares (`None` when it holds none)."""
    names = {field.name for field in dataclasses.fields(output)} if dataclasses.is_dataclass(output) else set(output)
    for name in _BOTH_NAMES:
        if name in names:
            return getattr(output, name, None) if dataclasses.is_dataclass(output) else output[name]
    return None
