"""Shared pytest configuration and fixtures. Everything here works offline."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Make `from helpers import ...` work from every test module (the tests directory is not a package).
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import pytest  # noqa: E402
from helpers import build_tiny_image_processor, build_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """
    A session-wide tiny byte-level BPE tokenizer (320 tokens, no pad token); see `helpers.build_tiny_tokenizer`.

    It is shared by all tests: do not modify it (adding tokens, building a `FlamingoProcessor` on it, ...). Use
    `fresh_tiny_tokenizer` or `copy.deepcopy(tiny_tokenizer)` for that.
    """
    return build_tiny_tokenizer()


@pytest.fixture
def fresh_tiny_tokenizer():
    """A new tiny tokenizer for each test, free to modify."""
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_image_processor():
    """A `CLIPImageProcessor` producing 3x30x30 images."""
    return build_tiny_image_processor()


@pytest.fixture
def tiny_processor(fresh_tiny_tokenizer, tiny_image_processor):
    """
    A `FlamingoProcessor` over a fresh tiny tokenizer: `<|endofchunk|>` = 320, `<image>` = 321, `<PAD>` = 322.
    """
    from hf_flamingo.processing_flamingo import FlamingoProcessor

    return FlamingoProcessor(image_processor=tiny_image_processor, tokenizer=fresh_tiny_tokenizer)


@pytest.fixture(scope="module")
def llama_model():
    """A tiny Llama-backed Flamingo with its gates opened to random values; one per test module."""
    from model_testers import build_model, open_gates

    model = build_model("llama")
    open_gates(model)
    return model
