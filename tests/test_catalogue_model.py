"""Catalogue of bad inputs at the model boundary: `forward`, `generate`, `get_image_features`, `FlamingoConfig`,
`from_pretrained` and `from_backbones`.

Each case is one bad input a new user could plausibly hand over, and asserts the exception type (or warning) and the
key words of its message: what argument, what was received, what is expected. `BEFORE` records how each case behaved
before the boundary checks of `hf_flamingo.input_checks` ("silent": a wrong result or none at all; "unclear": an error
from deep inside torch or transformers, or one that names the wrong cause; "clear": already a clear early error).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from model_testers import (
    EOC_TOKEN_ID,
    IMAGE_SIZE,
    MEDIA_TOKEN_ID,
    build_model,
    flamingo_config,
    interleaved_batch,
    open_gates,
    random_pixels,
    text_config_for,
    vision_config_for,
)
from transformers import (
    AutoModelForImageTextToText,
    BertConfig,
    BertModel,
    CLIPVisionModel,
    LlamaForCausalLM,
)

import hf_flamingo  # noqa: F401  (registers the Auto classes)
from hf_flamingo import FlamingoConfig, FlamingoForConditionalGeneration, input_checks

NUM_LATENTS = 8  # `perceiver_num_latents` of the tiny configs
VISION_DIM = 32  # hidden size of the tiny vision encoders
VOCAB_SIZE = 99

BEFORE: dict[str, str] = {}
"""Case id -> how the case behaved before the boundary checks ("silent", "unclear" or "clear")."""


def case(case_id: str, before: str, call: Callable[..., Any], error: type, *fragments: str) -> Any:
    """One catalogue entry: `call(context)` must raise `error` (or warn, for a `Warning`) with every fragment."""
    BEFORE[case_id] = before
    return pytest.param(call, error, fragments, id=case_id)


def assert_fails_clearly(call: Callable[[], Any], error: type, fragments: tuple[str, ...]) -> None:
    if issubclass(error, Warning):
        with pytest.warns(error) as record:
            call()
        message = " | ".join(str(w.message) for w in record if issubclass(w.category, error))
    else:
        with pytest.raises(error) as info:
            call()
        message = str(info.value)
    for fragment in fragments:
        assert re.search(re.escape(fragment), message), f"{fragment!r} not in {message!r}"


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class Context:
    """What the cases call: a tiny Llama-backed Flamingo with open gates and an interleaved two-sample batch."""

    def __init__(self, model: FlamingoForConditionalGeneration):
        self.model = model
        self.batch = interleaved_batch()

    def forward(self, **overrides: Any) -> Any:
        inputs = {
            "input_ids": self.batch.input_ids,
            "attention_mask": self.batch.attention_mask,
            "pixel_values": self.batch.pixel_values,
        }
        inputs.update(overrides)
        with torch.no_grad():
            return self.model(**{name: value for name, value in inputs.items() if value is not None})

    def generate(self, **overrides: Any) -> Any:
        inputs = {
            "input_ids": self.batch.input_ids,
            "attention_mask": self.batch.attention_mask,
            "pixel_values": self.batch.pixel_values,
            "max_new_tokens": 2,
            "do_sample": False,
        }
        inputs.update(overrides)
        return self.model.generate(**{name: value for name, value in inputs.items() if value is not None})

    def pixels(self, edit: Callable[[torch.Tensor], Any]) -> torch.Tensor:
        pixel_values = self.batch.pixel_values.clone()
        edit(pixel_values)
        return pixel_values


@pytest.fixture(scope="module")
def context() -> Context:
    model = build_model("llama")
    open_gates(model)
    return Context(model)


@pytest.fixture(scope="module")
def meta_model() -> FlamingoForConditionalGeneration:
    with torch.device("meta"):
        return build_model("llama")


@pytest.fixture(scope="module")
def llama_directory(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(text_config_for("llama")).save_pretrained(directory)
    return str(directory)


def tiny_clip() -> CLIPVisionModel:
    torch.manual_seed(0)
    return CLIPVisionModel(vision_config_for("clip")).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(text_config_for("llama")).eval()


def tiny_bert() -> BertModel:
    config = BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37
    )
    return BertModel(config).eval()


def from_backbones(vision_model: Any, language_model: Any, **overrides: Any) -> FlamingoForConditionalGeneration:
    kwargs = dict(media_token_id=MEDIA_TOKEN_ID, eoc_token_id=EOC_TOKEN_ID, perceiver_depth=1, perceiver_num_latents=4)
    kwargs.update(overrides)
    return FlamingoForConditionalGeneration.from_backbones(vision_model, language_model, **kwargs)


def _set_nan(pixels: torch.Tensor) -> None:
    pixels[0, 1, 0, 3, 4] = float("nan")


def _set_inf(pixels: torch.Tensor) -> None:
    pixels[1, 0, 2, 0, 0] = float("-inf")


def _fill_padding_slot(pixels: torch.Tensor) -> None:
    pixels[1, 2] = random_pixels(1, 1, seed=9)[0, 0]  # sample 1 has 2 `<image>` tokens; slot 2 is padding


def _pad_with_image_id(context: Context) -> torch.Tensor:
    """Sample 1's left padding (3 tokens) made of the model's `<image>` id, as a processor whose pad token has that
    id would pad."""
    input_ids = context.batch.input_ids.clone()
    input_ids[1, :3] = MEDIA_TOKEN_ID
    return input_ids


# ---------------------------------------------------------------------------------------------------------------------
# `pixel_values` (forward, generate, get_image_features)

PIXEL_CASES = [
    case(
        "pixel_values-uint8",
        "silent",
        lambda c: c.forward(pixel_values=(c.batch.pixel_values * 40 + 128).clamp(0, 255).to(torch.uint8)),
        TypeError,
        "`pixel_values` must be floating point (normalised by the image processor); got torch.uint8",
    ),
    case(
        "pixel_values-raw-0-255-floats",
        "silent",
        lambda c: c.forward(pixel_values=(c.batch.pixel_values * 40 + 128).clamp(0, 255)),
        ValueError,
        "`pixel_values` of sample 0, image 0",
        "reaches 255",
        "look like raw 0-255 pixel values",
        "processor",
    ),
    case(
        "pixel_values-nan",
        "silent",
        lambda c: c.forward(pixel_values=c.pixels(_set_nan)),
        ValueError,
        "`pixel_values` of sample 0, image 1 (0-based) holds NaN or infinite values",
    ),
    case(
        "pixel_values-inf",
        "silent",
        lambda c: c.forward(pixel_values=c.pixels(_set_inf)),
        ValueError,
        "`pixel_values` of sample 1, image 0 (0-based) holds NaN or infinite values",
    ),
    case(
        "pixel_values-1-channel",
        "unclear",
        lambda c: c.forward(pixel_values=c.batch.pixel_values[:, :, :1]),
        ValueError,
        "`pixel_values` has 1 channels but the vision tower expects 3 (`vision_config.num_channels`)",
    ),
    case(
        "pixel_values-4-channels",
        "unclear",
        lambda c: c.forward(pixel_values=torch.cat([c.batch.pixel_values, c.batch.pixel_values[:, :, :1]], dim=2)),
        ValueError,
        "`pixel_values` has 4 channels but the vision tower expects 3",
    ),
    case(
        "pixel_values-wrong-image-size",
        "clear",  # CLIP's own message, after the model had started
        lambda c: c.forward(pixel_values=torch.zeros(2, 3, 3, IMAGE_SIZE + 6, IMAGE_SIZE + 6)),
        ValueError,
        f"`pixel_values` holds 36x36 images but the vision tower takes {IMAGE_SIZE}x{IMAGE_SIZE}",
        "`vision_config.image_size`",
    ),
    case(
        "pixel_values-rank-4",
        "clear",
        lambda c: c.forward(pixel_values=c.batch.pixel_values[:, 0]),
        ValueError,
        "`pixel_values` must have shape (batch, num_images, channels, height, width)",
        "got a 4-D tensor",
        "`pixel_values[:, None]`",
    ),
    case(
        "pixel_values-not-a-tensor",
        "clear",
        lambda c: c.forward(pixel_values=c.batch.pixel_values.tolist()),
        TypeError,
        "`pixel_values` must be a torch.Tensor, got list",
    ),
    case(
        "pixel_values-batch-size",
        "clear",  # raised only after encoding the images
        lambda c: c.forward(pixel_values=c.batch.pixel_values[:1]),
        ValueError,
        "`pixel_values` holds images for 1 samples but `input_ids` has 2 rows",
    ),
    case(
        "pixel_values-non-zero-image-beyond-image-tokens",
        "silent",
        lambda c: c.forward(pixel_values=c.pixels(_fill_padding_slot)),
        UserWarning,
        "Sample 1 has 2 `<image>` token(s) but image 2 (0-based) of its `pixel_values` is not all zeros",
        "ignored",
        "id 97",
    ),
    case(
        "pixel_values-more-image-tokens-than-images",
        "clear",
        lambda c: c.forward(pixel_values=c.batch.pixel_values[:, :2]),
        ValueError,
        "Sample 0 has 3 `<image>` tokens but only 2 image(s) per sample were given",
    ),
    case(
        "pixel_values-without-image-tokens",
        "clear",
        lambda c: c.forward(input_ids=torch.tensor([[1, 5, 6], [1, 7, 8]]), attention_mask=None),
        ValueError,
        "Images were given but `input_ids` contains no `<image>` token (id 97)",
        "`config.media_token_id` must be the processor's `media_token_id`",
    ),
    case(
        "image-tokens-without-images",
        "clear",
        lambda c: c.forward(pixel_values=None),
        ValueError,
        "`input_ids` contains `<image>` tokens (id 97) but no `pixel_values` or `image_hidden_states`",
    ),
    case(
        "pixel_values-with-image_hidden_states",
        "clear",
        lambda c: c.forward(image_hidden_states=torch.zeros(2, 3, NUM_LATENTS, VISION_DIM)),
        ValueError,
        "Pass either `pixel_values` or `image_hidden_states`, not both",
    ),
    case(
        "get_image_features-uint8",
        "silent",
        lambda c: c.model.get_image_features(torch.full((1, 1, 3, IMAGE_SIZE, IMAGE_SIZE), 200, dtype=torch.uint8)),
        TypeError,
        "`pixel_values` must be floating point",
        "torch.uint8",
    ),
]

# ---------------------------------------------------------------------------------------------------------------------
# Text and other forward inputs

FORWARD_CASES = [
    case(
        "input_ids-missing",
        "clear",
        lambda c: c.forward(input_ids=None, attention_mask=None),
        ValueError,
        "Flamingo needs `input_ids`",
    ),
    case(
        "inputs_embeds-instead-of-input_ids",
        "clear",
        lambda c: c.forward(pixel_values=None, input_ids=torch.tensor([[1, 5]]), inputs_embeds=torch.zeros(1, 2, 32)),
        ValueError,
        "Pass `input_ids` only, not `inputs_embeds`",
    ),
    case(
        "input_ids-1-D",
        "unclear",
        lambda c: c.forward(input_ids=torch.tensor([1, 5, 6]), attention_mask=None, pixel_values=None),
        ValueError,
        "`input_ids` must have shape (batch_size, sequence_length), got a 1-D tensor of shape (3,)",
        "`input_ids[None]`",
    ),
    case(
        "input_ids-float",
        "unclear",
        lambda c: c.forward(input_ids=torch.tensor([[1.0, 5.0]]), attention_mask=None, pixel_values=None),
        TypeError,
        "`input_ids` must hold integer token ids (torch.long), got torch.float32",
    ),
    case(
        "input_ids-beyond-vocabulary",
        "unclear",
        lambda c: c.forward(input_ids=torch.tensor([[1, 5, 120]]), attention_mask=None, pixel_values=None),
        ValueError,
        "`input_ids` holds ids from 1 to 120, but the language model's embeddings have 99 rows",
        "[0, 99)",
    ),
    case(
        "input_ids-negative",
        "unclear",
        lambda c: c.forward(input_ids=torch.tensor([[1, -100, 5]]), attention_mask=None, pixel_values=None),
        ValueError,
        "`input_ids` holds ids from -100 to 5",
        "-100 is a `labels` value",
    ),
    case(
        "media_token_id-outside-the-embeddings",
        "unclear",  # the documented flow sets it before `resize_token_embeddings`, so it is checked at forward
        lambda c: build_model("llama", media_token_id=150)(
            input_ids=torch.tensor([[1, 150, 5]]), pixel_values=random_pixels(1, 1)
        ),
        ValueError,
        "`input_ids` holds ids from 1 to 150",
        "`config.media_token_id`=150) is outside it too",
        "model.resize_token_embeddings(len(processor.tokenizer))",
    ),
    case(
        "attention_mask-shape",
        "silent",
        lambda c: c.forward(attention_mask=torch.ones(2, 7, dtype=torch.long)),
        ValueError,
        "`attention_mask` has shape (2, 7) but must cover `input_ids`, whose shape is (2, 15)",
    ),
    case(
        "labels-shape",
        "unclear",
        lambda c: c.forward(labels=c.batch.input_ids[:, :7]),
        ValueError,
        "`labels` must have the shape of `input_ids`, (2, 15); got (2, 7)",
    ),
    case(
        "labels-beyond-vocabulary",
        "unclear",
        lambda c: c.forward(labels=torch.full_like(c.batch.input_ids, 150)),
        ValueError,
        "`labels` holds 30 value(s) outside the vocabulary",
        "[0, 99) or -100",
    ),
    case(
        "position_ids-shape",
        "unclear",
        lambda c: c.forward(position_ids=torch.arange(7)[None]),
        ValueError,
        "`position_ids` must have shape (2, 15) or (1, 15) like `input_ids`, got (1, 7)",
    ),
    case(
        "image-token-id-at-padded-positions",
        "unclear",  # "Sample 1 has 5 `<image>` tokens but only 3 image(s)": the wrong cause
        lambda c: c.forward(input_ids=_pad_with_image_id(c)),
        ValueError,
        "`input_ids` holds 3 `<image>` token(s) (id 97, `config.media_token_id`) at positions where "
        "`attention_mask` is 0",
        "the processor and the model disagree on token ids",
        "pad token id is 0",
    ),
    case(
        "token_image_index-float",
        "silent",
        lambda c: c.forward(token_image_index=torch.zeros(2, 15)),
        TypeError,
        "`token_image_index` must be an integer tensor (torch.long), got torch.float32",
    ),
    case(
        "token_image_index-shape",
        "clear",
        lambda c: c.forward(token_image_index=torch.zeros(2, 3, dtype=torch.long)),
        ValueError,
        "`token_image_index` must have the shape of `input_ids`, (2, 15); got (2, 3)",
    ),
    case(
        "token_image_index-range",
        "clear",
        lambda c: c.forward(token_image_index=torch.full((2, 15), 4)),
        ValueError,
        "`token_image_index` holds values from 4 to 4, but must lie between 0 and the number of images",
    ),
    case(
        "image_hidden_states-rank",
        "clear",
        lambda c: c.forward(pixel_values=None, image_hidden_states=torch.zeros(2, 3 * NUM_LATENTS, VISION_DIM)),
        ValueError,
        "`image_hidden_states` must have shape (batch_size, num_images, num_latents, vision_hidden_size)",
    ),
    case(
        "image_hidden_states-latent-count",
        "unclear",
        lambda c: c.forward(pixel_values=None, image_hidden_states=torch.zeros(2, 3, 5, VISION_DIM)),
        ValueError,
        "`image_hidden_states` has 5 latents of width 32 per image",
        "makes 8 of width 32",
    ),
    case(
        "image_hidden_states-width",
        "unclear",
        lambda c: c.forward(pixel_values=None, image_hidden_states=torch.zeros(2, 3, NUM_LATENTS, 16)),
        ValueError,
        "`image_hidden_states` has 8 latents of width 16 per image",
    ),
    case(
        "image_hidden_states-nan",
        "silent",
        lambda c: c.forward(
            pixel_values=None, image_hidden_states=torch.full((2, 3, NUM_LATENTS, VISION_DIM), float("nan"))
        ),
        ValueError,
        "`image_hidden_states` of sample 0, image 0 (0-based) holds NaN or infinite values",
    ),
    case(
        "cross_attention_states-block-count",
        "clear",
        lambda c: c.forward(pixel_values=None, cross_attention_states=torch.zeros(2, 1, 3 * NUM_LATENTS, 32)),
        ValueError,
        "`cross_attention_states` holds keys/values for 1 blocks, the model has 2",
    ),
]

# ---------------------------------------------------------------------------------------------------------------------
# generate

GENERATE_CASES = [
    case(
        "generate-without-input_ids",
        "clear",
        lambda c: c.generate(input_ids=None, attention_mask=None),
        ValueError,
        "`generate` needs `input_ids`",
    ),
    case(
        "generate-uint8-pixel_values",
        "silent",
        lambda c: c.generate(pixel_values=c.batch.pixel_values.to(torch.uint8)),
        TypeError,
        "`pixel_values` must be floating point",
    ),
    case(
        "generate-input_ids-beyond-vocabulary",
        "unclear",
        lambda c: c.generate(input_ids=torch.tensor([[1, 5, 130]]), attention_mask=None, pixel_values=None),
        ValueError,
        "`input_ids` holds ids from 1 to 130",
    ),
    case(
        "generate-image-token-id-at-padded-positions",
        "unclear",
        lambda c: c.generate(input_ids=_pad_with_image_id(c)),
        ValueError,
        "at positions where `attention_mask` is 0",
        "disagree on token ids",
    ),
    case(
        "generate-with-cross_attention_states",
        "clear",
        lambda c: c.generate(pixel_values=None, cross_attention_states=torch.zeros(2, 2, 3 * NUM_LATENTS, 32)),
        ValueError,
        "`generate` computes `cross_attention_states` itself",
    ),
]

# ---------------------------------------------------------------------------------------------------------------------
# Configuration and construction

CONFIG_CASES = [
    case(
        "cross_attn_every_n_layers-beyond-depth",
        "silent",
        lambda c: build_model("llama", cross_attn_every_n_layers=8),
        ValueError,
        "`cross_attn_every_n_layers=8` is larger than the language model's 4 decoder layers",
        "no gated cross-attention block",
        "between 1 and 4",
    ),
    case(
        "cross_attn_every_n_layers-zero",
        "clear",
        lambda c: flamingo_config(cross_attn_every_n_layers=0),
        ValueError,
        "`cross_attn_every_n_layers` must be an integer >= 1, got 0",
    ),
    case(
        "perceiver_num_latents-zero",
        "clear",
        lambda c: flamingo_config(perceiver_num_latents=0),
        ValueError,
        "`perceiver_num_latents` must be an integer >= 1, got 0",
    ),
    case(
        "max_num_media-zero",
        "silent",
        lambda c: flamingo_config(max_num_media=0),
        ValueError,
        "`max_num_media` must be an integer >= 1, got 0",
    ),
    case(
        "media_token_id-equals-eoc_token_id",
        "silent",
        lambda c: flamingo_config(eoc_token_id=MEDIA_TOKEN_ID),
        ValueError,
        "`media_token_id` and `eoc_token_id` are both 97",
    ),
    case(
        "media_token_id-negative",
        "silent",
        lambda c: flamingo_config(media_token_id=-1),
        ValueError,
        "`media_token_id` must be a token id (an integer >= 0), got -1",
    ),
    case(
        "media_token_id-a-string",
        "silent",
        lambda c: flamingo_config(media_token_id="<image>"),
        ValueError,
        "`media_token_id` must be a token id (an integer >= 0), got '<image>'",
    ),
    case(
        "media_token_id-unset",
        "clear",
        lambda c: build_model("llama", media_token_id=None),
        ValueError,
        "`config.media_token_id` is not set",
    ),
    case(
        "vision_feature_select_strategy-unknown",
        "clear",
        lambda c: flamingo_config(vision_feature_select_strategy="cls"),
        ValueError,
        "`vision_feature_select_strategy` must be one of ('default', 'full'), got 'cls'",
    ),
    case(
        "vision_feature_layer-out-of-range",
        "unclear",
        lambda c: flamingo_config(vision_feature_layer=5),
        ValueError,
        "`vision_feature_layer=5` is out of range: the vision tower has 2 layers",
        "between -3 and 2",
    ),
    case(
        "vision_and_text_configs-swapped",
        "unclear",
        lambda c: flamingo_config(vision_config=text_config_for("llama"), text_config=vision_config_for("clip")),
        ValueError,
        "`vision_config` is a LlamaConfig, which looks like a language model's config",
        "swapped",
    ),
    case(
        "text_config-a-vision-config",
        "unclear",
        lambda c: flamingo_config(text_config=vision_config_for("clip")),
        ValueError,
        "`text_config` is a CLIPVisionConfig, which looks like a vision encoder's config",
    ),
    case(
        "sub-config-dict-without-model_type",
        "clear",
        lambda c: flamingo_config(text_config={"vocab_size": 99}),
        ValueError,
        "`text_config` was given as a dict without a `model_type` key",
    ),
]

# ---------------------------------------------------------------------------------------------------------------------
# from_backbones

BACKBONE_CASES = [
    case(
        "from_backbones-BertModel-as-language-model",
        "unclear",
        lambda c: from_backbones(tiny_clip(), tiny_bert()),
        TypeError,
        "`language_model` is a BertModel, which has no language-modelling head",
        "BertLMHeadModel",
    ),
    case(
        "from_backbones-vision-model-as-language-model",
        "silent",
        lambda c: from_backbones(tiny_clip(), tiny_clip()),
        TypeError,
        "`language_model` is a CLIPVisionModel, a vision model, not a causal language model",
    ),
    case(
        "from_backbones-arguments-swapped",
        "silent",
        lambda c: from_backbones(tiny_llama(), tiny_clip()),
        TypeError,
        "`vision_model` is a LlamaForCausalLM, which takes `input_ids`, not `pixel_values`",
        "swapped",
    ),
    case(
        "from_backbones-path-does-not-exist",
        "unclear",
        lambda c: from_backbones("/nonexistent/clip-vit", tiny_llama()),
        FileNotFoundError,
        "`vision_model` is '/nonexistent/clip-vit', which is not an existing directory",
    ),
    case(
        "from_backbones-misspelt-config-argument",
        "silent",
        lambda c: from_backbones(tiny_clip(), tiny_llama(), cross_attn_every_n_layer=2),
        TypeError,
        "unexpected keyword argument 'cross_attn_every_n_layer'; did you mean 'cross_attn_every_n_layers'",
    ),
    case(
        "from_backbones-cross_attn_every_n_layers-beyond-depth",
        "silent",
        lambda c: from_backbones(tiny_clip(), tiny_llama(), cross_attn_every_n_layers=5),
        ValueError,
        "`cross_attn_every_n_layers=5` is larger than the language model's 4 decoder layers",
    ),
    case(
        "from_backbones-not-a-model",
        "clear",
        lambda c: from_backbones(object(), tiny_llama()),
        TypeError,
        "`vision_model` must be a Hub id, a local directory or a transformers vision model, got object",
    ),
]


@pytest.mark.parametrize(("call", "error", "fragments"), PIXEL_CASES + FORWARD_CASES + GENERATE_CASES)
def test_bad_model_input(context, call, error, fragments):
    assert_fails_clearly(lambda: call(context), error, fragments)


@pytest.mark.parametrize(("call", "error", "fragments"), CONFIG_CASES + BACKBONE_CASES)
def test_bad_configuration(call, error, fragments):
    assert_fails_clearly(lambda: call(None), error, fragments)


# ---------------------------------------------------------------------------------------------------------------------
# A model still on the `meta` device; directories that do not hold a Flamingo

META_MESSAGE = ("The model's parameters are on the `meta` device", "`from_pretrained(...)`", "`model.to_empty(")


def test_forward_on_meta_device(meta_model):
    BEFORE["forward-on-meta-device"] = "silent"  # returned logits on `meta`
    with torch.no_grad():
        assert_fails_clearly(lambda: meta_model(input_ids=torch.tensor([[1, 5, 6]])), RuntimeError, META_MESSAGE)


def test_generate_on_meta_device(meta_model):
    BEFORE["generate-on-meta-device"] = "unclear"  # "Tensor on device meta is not on the expected device cpu!"
    call = lambda: meta_model.generate(input_ids=torch.tensor([[1, 5, 6]]), max_new_tokens=2)  # noqa: E731
    assert_fails_clearly(call, RuntimeError, META_MESSAGE)


@pytest.mark.parametrize(
    "load",
    [
        pytest.param(FlamingoForConditionalGeneration.from_pretrained, id="FlamingoForConditionalGeneration"),
        pytest.param(FlamingoConfig.from_pretrained, id="FlamingoConfig"),
    ],
)
def test_language_model_directory_is_not_a_flamingo(llama_directory, load):
    # Before: the model said "`config.media_token_id` is not set"; the config loaded as a default Flamingo config.
    BEFORE[f"from_pretrained-language-model-directory-{load.__self__.__name__}"] = "unclear"
    fragments = (
        f"{llama_directory!r} is not a Flamingo checkpoint: its config.json holds a 'llama' config",
        "`model_type` 'flamingo'",
        "from_backbones",
    )
    assert_fails_clearly(lambda: load(llama_directory), ValueError, fragments)


def test_auto_image_text_model_of_language_model_directory(llama_directory):
    """transformers' own error: the directory's `LlamaConfig` maps to no image-text-to-text class. (`AutoModel` loads
    the directory as the `LlamaModel` it is, which is right.)"""
    BEFORE["AutoModelForImageTextToText-language-model-directory"] = "clear"
    call = lambda: AutoModelForImageTextToText.from_pretrained(llama_directory)  # noqa: E731
    assert_fails_clearly(call, ValueError, ("Unrecognized configuration class", "LlamaConfig"))


# ---------------------------------------------------------------------------------------------------------------------
# What the checks must let through, and what they cost


def test_normalised_images_with_zero_padding_pass_silently(context):
    """The processor's own output: normalised images (|x| about 2 at most), zero-padded for samples with fewer images,
    within the +-30 bound; no error and no warning."""
    extreme = context.batch.pixel_values.clone().clamp(-2.5, 2.5)
    extreme[0, 0] = input_checks.MAX_NORMALISED_PIXEL_VALUE  # the bound itself is accepted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outputs = context.forward(pixel_values=extreme)
    assert torch.isfinite(outputs.logits).all()


def test_processor_output_passes(tmp_path):
    from evaluation_fixtures import build_tiny_flamingo
    from helpers import make_test_image

    model, processor = build_tiny_flamingo()
    inputs = processor(
        text=["<image>A cat<|endofchunk|><image>A dog", "<image>A bird"],
        images=[[make_test_image(0), make_test_image(1)], [make_test_image(2)]],
        return_tensors="pt",
        padding=True,
    )
    inputs.pop("mm_token_type_ids", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with torch.no_grad():
            outputs = model(**inputs)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert torch.isfinite(outputs.logits).all()


def test_token_values_are_checked_once_per_generate_call(context, monkeypatch):
    """Token values are checked on the prompt only: never at the decoding steps (no synchronisation per token)."""
    calls = []
    original = input_checks.check_token_values
    monkeypatch.setattr(input_checks, "check_token_values", lambda *args: calls.append(1) or original(*args))
    context.generate(max_new_tokens=4, min_new_tokens=4)
    assert len(calls) == 1
    calls.clear()
    context.forward()  # a forward starting its sequences checks them
    assert len(calls) == 1
