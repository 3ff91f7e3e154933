"""Catalogue of bad inputs to `FlamingoProcessor`, `FlamingoImageProcessor` and `FlamingoDataCollator`.

Each bad input is one case: it must end in a clear, early error (type and key words of the message checked) or in a
transformers-style warning, never in a silent wrong result. Inputs that look unusual but are accepted on purpose
(grayscale and RGBA arrays, PIL images of other modes) are checked to give the same pixels as the equivalent PIL image.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from helpers import build_tiny_image_processor, build_tiny_tokenizer, make_test_image
from PIL import Image

from hf_flamingo import FlamingoDataCollator, FlamingoImageProcessor, FlamingoProcessor

# Tiny tokenizer ids (see tests/conftest.py `tiny_processor`): <|endofchunk|> 320, <image> 321, <PAD> 322, "a" 65.
EOC, IMG, PAD = 320, 321, 322
IMAGE = make_test_image(0)
ARRAY = np.array(IMAGE)  # (40, 50, 3) uint8
ONE_CHUNK = "<image>ab<|endofchunk|>"
RESCALED_IMAGES_WARNING = "It looks like you are trying to rescale already rescaled images."  # transformers' wording


def assert_message(error: BaseException, fragments: list[str]) -> None:
    """Checks that every literal fragment appears in the message of `error`."""
    for fragment in fragments:
        assert re.search(re.escape(fragment), str(error)), f"{fragment!r} not in {str(error)!r}"


@pytest.fixture
def fresh_warnings():
    """Forgets the `warning_once` messages already logged, so that a once-per-process warning can be observed."""
    logging.Logger.warning_once.cache_clear()
    yield
    logging.Logger.warning_once.cache_clear()


# ----------------------------------------------------------------------------------------------------------------
# FlamingoProcessor: `text`, `images`, call options and image contents that must raise
# ----------------------------------------------------------------------------------------------------------------

Call = Callable[[FlamingoProcessor], object]

PROCESSOR_ERRORS = [
    # `text`
    pytest.param(lambda p: p(), ["provide `text`, `images` or both"], id="text-and-images-missing"),
    pytest.param(
        lambda p: p(text=3), ["`text` must be a string or a non-empty list of strings", "got int"], id="text-int"
    ),
    pytest.param(
        lambda p: p(text=[65, 66]),
        ["`text` must be a string or a non-empty list of strings", "element 0 is int", "as `input_ids`"],
        id="text-list-of-token-ids",
    ),
    pytest.param(lambda p: p(text=[]), ["non-empty list of strings", "got an empty list"], id="text-empty-list"),
    pytest.param(
        lambda p: p(text="a", videos=[np.zeros((2, 8, 8, 3), dtype=np.uint8)]),
        ["not `videos` or `audio`"],
        id="videos-given",
    ),
    # `images`: types and grouping
    pytest.param(
        lambda p: p(images="photo.png", text="<image>a"),
        ["Could not load `images` ('photo.png') as an image", "a valid path to an image file"],
        id="images-path-string",
    ),
    pytest.param(
        lambda p: p(images=[b"\x89PNG"], text="<image>a"),
        ["`images[0]` is bytes", "PIL.Image.open(io.BytesIO(data))"],
        id="images-bytes",
    ),
    pytest.param(
        lambda p: p(images=[[[IMAGE]]], text=["<image>a"]),
        ["`images[0][0]` is a list nested 3 deep", "at most two deep"],
        id="images-nested-three-deep",
    ),
    pytest.param(
        lambda p: p(images=np.zeros(5), text="<image>a"),
        ["`images` is an array with 1 dimension(s) (shape (5,))"],
        id="images-1d-array",
    ),
    pytest.param(
        lambda p: p(images=[[IMAGE], IMAGE], text=["<image>a", "<image>b"]),
        ["`images` mixes images and lists of images"],
        id="images-mixed-nesting",
    ),
    pytest.param(
        lambda p: p(images=[IMAGE, IMAGE], text=["<image>a", "b"]),
        [
            "Got a flat list of 2 image(s) for 2 texts with 1 `<image>` token(s) in all (per text: [1, 0])",
            "images=[[img_a, img_b], [img_c], []]",
        ],
        id="images-flat-list-for-several-texts",
    ),
    pytest.param(
        lambda p: p(images=[[IMAGE]], text=["<image>a", "b"]),
        ["Got 1 lists of images for 2 texts"],
        id="images-fewer-lists-than-texts",
    ),
    # `<image>` tokens against images
    pytest.param(
        lambda p: p(images=[[IMAGE], [IMAGE]], text=["<image>a", "<image>b<image>c"]),
        ["Sample 1 has 2 `<image>` tokens in its text but 1 image(s) were given"],
        id="too-few-images",
    ),
    pytest.param(
        lambda p: p(images=[[IMAGE, IMAGE]], text=["<image>a"]),
        ["Sample 0 has 1 `<image>` tokens in its text but 2 image(s) were given"],
        id="too-many-images",
    ),
    pytest.param(
        lambda p: p(images=[IMAGE], text="<Image>a"),
        ["Sample 0 has 0 `<image>` tokens", "'<Image>', which is not the media token '<image>'"],
        id="media-token-capitalised",
    ),
    pytest.param(
        lambda p: p(images=[[], [IMAGE]], text=["a", "< image >b"]),
        ["Sample 1 has 0 `<image>` tokens", "'< image >', which is not the media token"],
        id="media-token-with-spaces",
    ),
    pytest.param(
        lambda p: p(images=[IMAGE, IMAGE], text="<image>a b c<image>", truncation=True, max_length=3),
        ["Sample 0 has 1 `<image>` tokens in its text but 2 image(s)", "Truncation may have removed `<image>` tokens"],
        id="truncation-removes-media-token",
    ),
    # Call options
    pytest.param(
        lambda p: p(images=IMAGE, text="<image>a", return_tensors="tf"),
        ["supports `return_tensors` 'pt', 'np' or None, got 'tf'"],
        id="return-tensors-tf",
    ),
    pytest.param(
        lambda p: p(text="a", padding_side="middle"),
        ["`padding_side` must be 'left'", "or 'right'", "got 'middle'"],
        id="padding-side-invalid",
    ),
    # Image contents
    pytest.param(
        lambda p: p(images=[ARRAY, np.full((40, 50, 3), np.nan, np.float32)], text="<image>a<image>b"),
        ["Image 1 of sample 0 contains NaN or infinite values", "float32"],
        id="nan-numpy",
    ),
    pytest.param(
        lambda p: p(images=[[], [torch.full((3, 40, 50), float("inf"))]], text=["a", "<image>b"]),
        ["Image 0 of sample 1 contains NaN or infinite values", "torch.float32"],
        id="inf-tensor",
    ),
    pytest.param(
        lambda p: p(images=np.ones((40, 50, 3), dtype=bool), text="<image>a"),
        ["Image 0 of sample 0 has dtype bool", "integers", "or floats"],
        id="bool-image",
    ),
    pytest.param(
        lambda p: p(images=np.full((40, 50, 3), 4095, dtype=np.uint16), text="<image>a"),
        ["Image 0 of sample 0 has integer values in [4095, 4095] (dtype uint16)", "expects [0, 255]", "8 bits"],
        id="sixteen-bit-integers",
    ),
    pytest.param(
        lambda p: p(images=np.zeros((40, 50, 2), dtype=np.uint8), text="<image>a"),
        ["Image 0 of sample 0 has shape (40, 50, 2) with 2 channel(s); expected 3 (RGB) channels"],
        id="two-channels",
    ),
    pytest.param(
        lambda p: p(images=np.zeros((40, 50, 5), dtype=np.uint8), text="<image>a"),
        ["Image 0 of sample 0 has shape (40, 50, 5) with 5 channel(s); expected 3 (RGB) channels"],
        id="five-channels",
    ),
    pytest.param(
        lambda p: p(images=ARRAY[..., :1], text="<image>a", do_convert_rgb=False),
        ["has shape (40, 50, 1) with 1 channel(s); expected 3 (RGB)", "do_convert_rgb=True"],
        id="grayscale-array-without-convert-rgb",
    ),
    pytest.param(
        lambda p: p(images=np.dstack([ARRAY, ARRAY[..., :1]]), text="<image>a", do_convert_rgb=False),
        ["has shape (40, 50, 4) with 4 channel(s); expected 3 (RGB)"],
        id="rgba-array-without-convert-rgb",
    ),
    pytest.param(
        lambda p: p(images=IMAGE.convert("L"), text="<image>a", do_convert_rgb=False),
        ["Image 0 of sample 0 is a PIL image in mode 'L' but `do_convert_rgb=False`", "image.convert('RGB')"],
        id="pil-grayscale-without-convert-rgb",
    ),
    pytest.param(
        lambda p: p(images=np.dstack([ARRAY, ARRAY[..., :1]]).astype(np.float32), text="<image>a"),
        ["has 4 (RGBA) channels and float values in [0, 255]", "floats in [0, 1]"],
        id="rgba-float-outside-unit-range",
    ),
    pytest.param(
        lambda p: p(images=np.zeros((0, 50, 3), dtype=np.uint8), text="<image>a"),
        ["Image 0 of sample 0 has shape (0, 50, 3): its height and width must be at least 1 pixel"],
        id="zero-height-array",
    ),
    pytest.param(
        lambda p: p(images=Image.new("RGB", (0, 10)), text="<image>a"),
        ["Image 0 of sample 0 is empty (0x10 pixels)"],
        id="zero-width-pil",
    ),
    pytest.param(
        lambda p: p(
            images=[make_test_image(0, 40, 50), make_test_image(1, 30, 30)],
            text="<image>a<image>b",
            do_resize=False,
            do_center_crop=False,
        ),
        [
            "After preprocessing, image 1 of sample 0 has shape (3, 30, 30) but image 0 of sample 0 has (3, 40, 50)",
            "do_resize=True",
        ],
        id="different-sizes-without-resize",
    ),
]


@pytest.mark.parametrize("call, fragments", PROCESSOR_ERRORS)
def test_processor_rejects(tiny_processor, call: Call, fragments: list[str]):
    with pytest.raises(ValueError) as error:
        call(tiny_processor)
    assert_message(error.value, fragments)


# ----------------------------------------------------------------------------------------------------------------
# Float images already in [0, 1]: transformers' "already rescaled" warning, `do_rescale=False` is the fix
# ----------------------------------------------------------------------------------------------------------------

RESCALED = [
    pytest.param(lambda: ARRAY.astype(np.float32) / 255, id="numpy-float32"),
    pytest.param(lambda: torch.from_numpy(ARRAY).permute(2, 0, 1).double() / 255, id="torch-float64"),
]


@pytest.mark.parametrize("make_image", RESCALED)
def test_rescaled_images_warn_and_do_rescale_false_fixes_them(tiny_processor, make_image, fresh_warnings, caplog):
    # The same pixels as floats in [0, 255] (the torchvision backend resizes floats and uint8 slightly differently).
    as_float = ARRAY.astype(np.float32)
    reference = tiny_processor(images=as_float, text="<image>a", return_tensors="pt")["pixel_values"]
    with caplog.at_level(logging.WARNING):
        tiny_processor(images=make_image(), text="<image>a", return_tensors="pt")
    assert RESCALED_IMAGES_WARNING in caplog.text
    assert "set `do_rescale=False`" in caplog.text

    caplog.clear()
    logging.Logger.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        fixed = tiny_processor(images=make_image(), text="<image>a", return_tensors="pt", do_rescale=False)
    assert RESCALED_IMAGES_WARNING not in caplog.text
    torch.testing.assert_close(fixed["pixel_values"], reference, atol=1e-5, rtol=0)


def test_images_in_0_255_as_floats_do_not_warn(tiny_processor, fresh_warnings, caplog):
    with caplog.at_level(logging.WARNING):
        tiny_processor(images=ARRAY.astype(np.float32), text="<image>a", return_tensors="pt")
    assert RESCALED_IMAGES_WARNING not in caplog.text


def test_flamingo_image_processor_warns_and_refuses_non_finite(fresh_warnings, caplog):
    image_processor = FlamingoImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    with caplog.at_level(logging.WARNING):
        image_processor([torch.rand(3, 40, 50)], return_tensors="pt")
    assert RESCALED_IMAGES_WARNING in caplog.text
    with pytest.raises(ValueError, match=re.escape("Image 1 contains NaN or infinite values")):
        image_processor([ARRAY, np.full((40, 50, 3), np.nan)], return_tensors="pt")


# ----------------------------------------------------------------------------------------------------------------
# Accepted on purpose: grayscale and RGBA arrays are converted like PIL images of mode L and RGBA
# ----------------------------------------------------------------------------------------------------------------

_RGBA = np.dstack([ARRAY, np.full((40, 50, 1), 128, np.uint8)])
_GRAY = np.array(IMAGE.convert("L"))
CONVERTED = [
    pytest.param(lambda: _GRAY, lambda: IMAGE.convert("L"), False, id="grayscale-HxW"),
    pytest.param(lambda: _GRAY[..., None], lambda: IMAGE.convert("L"), False, id="grayscale-HxWx1"),
    pytest.param(lambda: torch.from_numpy(_GRAY)[None], lambda: IMAGE.convert("L"), False, id="grayscale-1xHxW"),
    pytest.param(lambda: _RGBA, lambda: Image.fromarray(_RGBA), True, id="rgba-HxWx4"),
    pytest.param(
        lambda: torch.from_numpy(_RGBA).permute(2, 0, 1), lambda: Image.fromarray(_RGBA), True, id="rgba-4xHxW"
    ),
    pytest.param(lambda: IMAGE.convert("P"), lambda: IMAGE.convert("P").convert("RGB"), False, id="pil-palette"),
]


@pytest.mark.parametrize("make_image, make_pil, is_rgba", CONVERTED)
@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_grayscale_and_rgba_inputs_match_their_pil_image(fresh_tiny_tokenizer, make_image, make_pil, is_rgba, backend):
    image_processor = build_tiny_image_processor()
    if backend == "pil":
        image_processor = FlamingoImageProcessor(**image_processor.to_dict())
    processor = FlamingoProcessor(image_processor, fresh_tiny_tokenizer)
    expected = processor(images=make_pil(), text="<image>a", return_tensors="pt")["pixel_values"]
    actual = processor(images=make_image(), text="<image>a", return_tensors="pt")["pixel_values"]
    assert actual.shape == (1, 1, 3, 30, 30)
    # transformers' torchvision backend composites RGBA arrays in float, PIL in 8 bits: up to 2 levels of 255 apart.
    tolerance = 0.05 if is_rgba and backend == "torchvision" else 0.0
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Token ids: recorded on save, checked on reload and against a model's config
# ----------------------------------------------------------------------------------------------------------------


def _tokenizer_with_pad_token():
    """A tiny tokenizer that already has a pad token, so `<|endofchunk|>` and `<image>` land one id further."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


def test_saved_config_records_token_ids(tiny_processor, tmp_path):
    tiny_processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert (config["media_token_id"], config["eoc_token_id"]) == (IMG, EOC)
    loaded = FlamingoProcessor.from_pretrained(tmp_path)
    assert (loaded.media_token_id, loaded.eoc_token_id) == (IMG, EOC)


TOKEN_ID_ERRORS = [
    pytest.param(
        lambda tmp_path: FlamingoProcessor(
            build_tiny_image_processor(), _tokenizer_with_pad_token(), media_token_id=IMG, eoc_token_id=EOC
        ),
        ["`<image>` id 322 and `<|endofchunk|>` id 321", "expects `media_token_id=321` and `eoc_token_id=320`"],
        id="ids-from-model-config-differ",
    ),
    pytest.param(
        lambda tmp_path: FlamingoProcessor(
            build_tiny_image_processor(), _tokenizer_with_pad_token(), media_token_id=IMG
        ),
        ["`<image>` id 322", "expects `media_token_id=321` (", "had other added tokens (often a pad token)"],
        id="media-token-id-differs",
    ),
    pytest.param(
        lambda tmp_path: (
            FlamingoProcessor(build_tiny_image_processor(), build_tiny_tokenizer()).save_pretrained(tmp_path),
            FlamingoProcessor.from_pretrained(tmp_path, tokenizer=_tokenizer_with_pad_token()),
        ),
        [
            "`<image>` id 322 and `<|endofchunk|>` id 321",
            "`media_token_id=321` and `eoc_token_id=320`",
            "from_pretrained",
        ],
        id="reloaded-with-tokenizer-that-had-a-pad-token",
    ),
    pytest.param(
        lambda tmp_path: FlamingoProcessor(build_tiny_image_processor(), _tokenizer_padding_with("<image>")),
        ["The tokenizer's pad token '<image>' is `<image>` (id 320)", "another pad token"],
        id="pad-token-is-media-token",
    ),
]


def _tokenizer_padding_with(token: str):
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"pad_token": token})
    return tokenizer


@pytest.mark.parametrize("build, fragments", TOKEN_ID_ERRORS)
def test_processor_token_ids_are_checked(tmp_path, build, fragments: list[str]):
    with pytest.raises(ValueError) as error:
        build(tmp_path)
    assert_message(error.value, fragments)


# ----------------------------------------------------------------------------------------------------------------
# FlamingoDataCollator
# ----------------------------------------------------------------------------------------------------------------

_PIXELS = torch.zeros(1, 3, 30, 30)

COLLATOR_CALL_ERRORS = [
    pytest.param({}, lambda: {"text": "a"}, TypeError, ["takes a list of features", "got dict"], id="features-dict"),
    pytest.param({}, lambda: ["<image>a"], TypeError, ["Feature 0 is a str"], id="feature-not-a-dict"),
    pytest.param({}, lambda: [], ValueError, ["got an empty list of features"], id="features-empty"),
    pytest.param(
        {},
        lambda: [{"images": [IMAGE]}],
        ValueError,
        ["Feature 0 needs a `text` string (a raw sample) or `input_ids`", "['images']", "remove_unused_columns=False"],
        id="neither-text-nor-input-ids",
    ),
    pytest.param(
        {},
        lambda: [{"input_ids": [IMG, 65], "pixel_values": _PIXELS}, {"text": ONE_CHUNK, "images": [IMAGE]}],
        ValueError,
        ["Feature 1 is raw (`text`) but feature 0 is processed (`input_ids`)"],
        id="raw-and-processed-mixed",
    ),
    pytest.param({}, lambda: [{"text": 3}], ValueError, ["Feature 0 needs a `text` string, got int"], id="text-int"),
    pytest.param(
        {},
        lambda: [{"text": ONE_CHUNK, "images": "photo.png"}],
        ValueError,
        ["Feature 0 has `images` of type str", "e.g. `[image]`", "PIL.Image.open(path)"],
        id="images-path-string",
    ),
    pytest.param(
        {},
        lambda: [{"text": ONE_CHUNK, "images": [IMAGE, IMAGE]}],
        ValueError,
        ["Sample 0 has 1 `<image>` tokens in its text but 2 image(s)"],
        id="raw-image-count-mismatch",
    ),
    pytest.param(
        {},
        lambda: [{"input_ids": [float(IMG), 65.0], "pixel_values": _PIXELS}],
        ValueError,
        ["Feature 0 has `input_ids` of dtype torch.float32", "must be integers"],
        id="input-ids-float",
    ),
    pytest.param(
        {},
        lambda: [{"input_ids": [[IMG, 65]], "pixel_values": _PIXELS}],
        ValueError,
        ["Feature 0 has `input_ids` of shape (1, 2)", "1-D sequence"],
        id="input-ids-2d",
    ),
    pytest.param(
        {}, lambda: [{"input_ids": []}], ValueError, ["Feature 0 has empty `input_ids`"], id="input-ids-empty"
    ),
    pytest.param(
        {},
        lambda: [{"input_ids": [IMG, 65], "pixel_values": _PIXELS}, {"input_ids": [65, 5000]}],
        ValueError,
        ["Feature 1 has `input_ids` in [65, 5000], outside the tokenizer's vocabulary [0, 322]"],
        id="input-ids-out-of-vocabulary",
    ),
    pytest.param(
        {},
        lambda: [{"input_ids": [IMG, 65], "pixel_values": _PIXELS[0]}],
        ValueError,
        ["Feature 0 has `pixel_values` of shape (3, 30, 30)", "`pixel_values[None]`"],
        id="pixel-values-3d",
    ),
    pytest.param(
        {},
        lambda: [{"input_ids": [IMG, 65], "pixel_values": _PIXELS[None]}],
        ValueError,
        ["Feature 0 has `pixel_values` of shape (1, 1, 3, 30, 30)", "Drop the batch axis"],
        id="pixel-values-5d",
    ),
    pytest.param(
        {},
        lambda: [{"input_ids": [IMG, 65], "pixel_values": _PIXELS.to(torch.uint8)}],
        ValueError,
        ["Feature 0 has `pixel_values` of dtype torch.uint8", "Pass raw images as `images`"],
        id="pixel-values-uint8",
    ),
    pytest.param(
        {},
        lambda: [{"input_ids": [IMG, 65], "pixel_values": torch.full((1, 3, 30, 30), float("nan"))}],
        ValueError,
        ["Feature 0 has NaN or infinite values in `pixel_values`"],
        id="pixel-values-nan",
    ),
    pytest.param(
        {},
        lambda: [
            {"input_ids": [IMG, 65], "pixel_values": _PIXELS},
            {"input_ids": [IMG, 66], "pixel_values": torch.zeros(1, 3, 20, 20)},
        ],
        ValueError,
        ["sample 0 has images of shape (3, 30, 30) but sample 1 has (3, 20, 20)"],
        id="pixel-values-shapes-differ",
    ),
    pytest.param(
        {},
        lambda: [{"input_ids": [IMG, 65]}],
        ValueError,
        ["Sample 0 has 1 `<image>` tokens in `input_ids` but 0 image(s)"],
        id="processed-image-count-mismatch",
    ),
    pytest.param(
        {},
        lambda: [{"text": "a b<image>", "images": [IMAGE]}, {"text": "no image here"}],
        ValueError,
        ["No sample of the batch has a target token (samples 0 ('a b<image>'), 1 ('no image here'))", "NaN"],
        id="no-target-in-batch",
    ),
    pytest.param(
        {"max_length": 1},
        lambda: [{"text": "x<image>a b<|endofchunk|>", "images": [IMAGE]}],
        ValueError,
        ["No sample of the batch has a target token", "increase `max_length`"],
        id="truncation-removes-every-target",
    ),
    pytest.param(
        {},
        lambda: [{"input_ids": [65, 66]}],
        ValueError,
        ["No sample of the batch has a target token (samples 0)", "mask_before_first_image=False"],
        id="processed-text-only-batch",
    ),
]


@pytest.mark.parametrize("options, make_features, error_type, fragments", COLLATOR_CALL_ERRORS)
def test_collator_rejects(tiny_processor, options, make_features, error_type, fragments: list[str]):
    collator = FlamingoDataCollator(tiny_processor, **options)
    with pytest.raises(error_type) as error:
        collator(make_features())
    assert_message(error.value, fragments)


COLLATOR_INIT_ERRORS = [
    pytest.param(
        {"max_length": 0}, ValueError, ["`max_length` must be a positive integer or None, got 0"], id="max-length-0"
    ),
    pytest.param(
        {"max_length": 2.5},
        ValueError,
        ["`max_length` must be a positive integer or None, got 2.5"],
        id="max-length-float",
    ),
    pytest.param(
        {"pad_to_multiple_of": 0},
        ValueError,
        ["`pad_to_multiple_of` must be a positive integer or None, got 0"],
        id="pad-to-multiple-of-0",
    ),
    pytest.param(
        {"max_length": 6, "pad_to_multiple_of": 4},
        ValueError,
        ["`max_length` (6) must be a multiple of `pad_to_multiple_of` (4)"],
        id="max-length-not-a-multiple",
    ),
    pytest.param(
        {"processor": None}, TypeError, ["`processor` must be a FlamingoProcessor", "got NoneType"], id="no-processor"
    ),
]


@pytest.mark.parametrize("options, error_type, fragments", COLLATOR_INIT_ERRORS)
def test_collator_options_are_checked(tiny_processor, options, error_type, fragments: list[str]):
    options = {"processor": tiny_processor, **options}
    with pytest.raises(error_type) as error:
        FlamingoDataCollator(**options)
    assert_message(error.value, fragments)


def test_collator_needs_a_pad_token(tiny_processor):
    tiny_processor.tokenizer.pad_token = None
    with pytest.raises(ValueError, match=re.escape("The processor's tokenizer has no pad token")):
        FlamingoDataCollator(tiny_processor)([{"text": ONE_CHUNK, "images": [IMAGE]}])


def test_collator_warns_about_a_sample_without_target(tiny_processor, caplog):
    features = [{"text": "a b<image>", "images": [IMAGE]}, {"text": ONE_CHUNK, "images": [IMAGE]}]
    with caplog.at_level(logging.WARNING):
        batch = FlamingoDataCollator(tiny_processor)(features)
    assert "Sample(s) 0 ('a b<image>') of the batch have no target token" in caplog.text
    assert (batch["labels"][0] == -100).all() and (batch["labels"][1] != -100).any()
