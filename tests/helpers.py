"""Offline builders for tiny test components, importable from any test module (`from helpers import ...`)."""

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

TINY_VOCAB_SIZE = 320
"""Size of the vocabulary of `build_tiny_tokenizer()`: `<|endoftext|>` (id 0), 256 byte symbols and 63 merges."""

_TRAINING_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A picture of a cat sitting on a mat.",
    "Output: two dogs playing in the snow.",
    "Question: What color is the car? Short answer: red",
    "An image of a bird flying over the sea.",
    "Hello world, this is a tiny tokenizer for tests.",
]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """
    Builds a small byte-level BPE tokenizer entirely offline, in a few milliseconds.

    The tokenizer has `TINY_VOCAB_SIZE` (320) tokens, `<|endoftext|>` (id 0) as its only special token, which is
    both its BOS and EOS token, and no pad token. Every call returns a new, independent instance, and training is
    deterministic, so ids are the same across calls.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_SENTENCES * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def build_tiny_image_processor() -> CLIPImageProcessor:
    """Builds a `CLIPImageProcessor` (OpenAI CLIP statistics) that resizes to 30 px and center-crops to 30x30."""
    return CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})


def make_test_image(seed: int = 0, height: int = 40, width: int = 50) -> Image.Image:
    """Returns a deterministic random RGB PIL image; different seeds give different images."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)
