"""FlamingoDataCollator: OpenFlamingo's label masking, right padding, truncation that drops cut images."""

import re

import pytest
import torch
from helpers import make_test_image

from hf_flamingo import FlamingoDataCollator, build_flamingo_labels

# Tiny tokenizer ids (see tests/conftest.py `tiny_processor`): <|endofchunk|> 320, <image> 321, <PAD> 322,
# <|endoftext|> 0, "x" 88, "a" 65, "b" 66, "c" 67, "d" 68, " b" 280.
EOC, IMG, PAD, EOS = 320, 321, 322, 0
TWO_CHUNKS = "x<image>a b<|endofchunk|>c<image>d<|endofchunk|><|endoftext|>"
ONE_CHUNK = "<image>ab<|endofchunk|>"


def _features():
    return [
        {"text": TWO_CHUNKS, "images": [make_test_image(0), make_test_image(1)]},
        {"text": ONE_CHUNK, "images": [make_test_image(2)], "id": "ignored"},
    ]


def test_labels_follow_openflamingo_rules(tiny_processor):
    batch = FlamingoDataCollator(tiny_processor)(_features())
    assert sorted(batch) == ["attention_mask", "input_ids", "labels", "pixel_values"]
    assert batch["input_ids"].tolist() == [
        [88, IMG, 65, 280, EOC, 67, IMG, 68, EOC, EOS],
        [IMG, 65, 66, EOC, PAD, PAD, PAD, PAD, PAD, PAD],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 10, [1] * 4 + [0] * 6]
    # Masked: "x" (before the first image), the <image> tokens, "c" (after an <|endofchunk|>, before the next image),
    # the EOS after the last <|endofchunk|>, padding. <|endofchunk|> itself is a target.
    assert batch["labels"].tolist() == [
        [-100, -100, 65, 280, EOC, -100, -100, 68, EOC, -100],
        [-100, 65, 66, EOC, -100, -100, -100, -100, -100, -100],
    ]


def test_pixel_values_match_the_processor(tiny_processor):
    features = _features()
    batch = FlamingoDataCollator(tiny_processor)(features)
    assert batch["pixel_values"].shape == (2, 2, 3, 30, 30)
    reference = tiny_processor(
        images=[f["images"] for f in features], text=[f["text"] for f in features], return_tensors="pt"
    )
    torch.testing.assert_close(batch["pixel_values"], reference["pixel_values"], atol=0, rtol=0)
    assert batch["pixel_values"][1, 1].abs().sum() == 0  # zero padding of the second sample's missing image


def test_masking_flags(tiny_processor):
    features = _features()
    keep_prefix = FlamingoDataCollator(tiny_processor, mask_before_first_image=False)(features)["labels"]
    assert keep_prefix[0].tolist() == [88, -100, 65, 280, EOC, -100, -100, 68, EOC, -100]
    keep_between = FlamingoDataCollator(tiny_processor, mask_between_chunks=False)(features)["labels"]
    assert keep_between[0].tolist() == [-100, -100, 65, 280, EOC, 67, -100, 68, EOC, EOS]
    neither = FlamingoDataCollator(tiny_processor, mask_before_first_image=False, mask_between_chunks=False)
    assert neither(features)["labels"][0].tolist() == [88, -100, 65, 280, EOC, 67, -100, 68, EOC, EOS]


def test_build_labels_on_left_padding_and_repeated_chunks():
    input_ids = torch.tensor([[PAD, PAD, IMG, 65, EOC, 66, EOC, 67, IMG, 68], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    labels = build_flamingo_labels(input_ids, attention_mask, media_token_id=IMG, eoc_token_id=EOC)
    # A second <|endofchunk|> with no <image> since the first one is masked like OpenFlamingo's loop does;
    # a text-only sequence has no target at all (everything is before the first image).
    assert labels.tolist() == [
        [-100, -100, -100, 65, EOC, -100, -100, -100, -100, 68],
        [-100] * 10,
    ]


def test_truncation_drops_the_images_of_cut_image_tokens(tiny_processor):
    collator = FlamingoDataCollator(tiny_processor, max_length=6)
    batch = collator(_features())
    assert batch["input_ids"].tolist() == [[88, IMG, 65, 280, EOC, 67], [IMG, 65, 66, EOC, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, -100, 65, 280, EOC, -100], [-100, 65, 66, EOC, -100, -100]]
    # The second image of sample 0 lost its <image> token: it is dropped, so at most one image per sample remains.
    assert batch["pixel_values"].shape == (2, 1, 3, 30, 30)
    full = FlamingoDataCollator(tiny_processor)(_features())
    torch.testing.assert_close(batch["pixel_values"][:, 0], full["pixel_values"][:, 0], atol=0, rtol=0)

    # Cutting every <image> token drops every image: no pixel_values, and (by default) nothing to learn, which a
    # batch may not be (its loss would be NaN).
    batch = FlamingoDataCollator(tiny_processor, max_length=1, mask_before_first_image=False)(_features()[:1])
    assert "pixel_values" not in batch
    assert batch["input_ids"].tolist() == [[88]] and batch["labels"].tolist() == [[88]]
    with pytest.raises(ValueError, match="No sample of the batch has a target token"):
        FlamingoDataCollator(tiny_processor, max_length=1)(_features()[:1])


def test_pad_to_multiple_of(tiny_processor):
    batch = FlamingoDataCollator(tiny_processor, pad_to_multiple_of=8)(_features())
    assert batch["input_ids"].shape == (2, 16)
    assert (batch["labels"][:, 10:] == -100).all()
    assert (batch["attention_mask"][:, 10:] == 0).all()


def test_images_are_optional_and_arrays_work(tiny_processor):
    image = torch.rand(3, 40, 50)
    batch = FlamingoDataCollator(tiny_processor)([{"text": "ab"}, {"text": ONE_CHUNK, "images": [image]}])
    assert batch["pixel_values"].shape == (2, 1, 3, 30, 30)
    assert batch["pixel_values"][0].abs().sum() == 0


def test_bad_inputs_fail_loudly(tiny_processor):
    with pytest.raises(ValueError, match="1 `<image>` tokens in its text but 2 image"):
        FlamingoDataCollator(tiny_processor)([{"text": ONE_CHUNK, "images": [make_test_image(0)] * 2}])
    with pytest.raises(ValueError, match="1 `<image>` tokens in its text but 2 image"):
        FlamingoDataCollator(tiny_processor, max_length=8)([{"text": ONE_CHUNK, "images": [make_test_image(0)] * 2}])
    with pytest.raises(ValueError, match="needs a `text` string"):
        FlamingoDataCollator(tiny_processor)([{"images": []}])
    with pytest.raises(ValueError, match="multiple of `pad_to_multiple_of`"):
        FlamingoDataCollator(tiny_processor, max_length=6, pad_to_multiple_of=4)


def test_processed_features_give_the_same_batch(tiny_processor):
    """Samples tokenized by the processor one by one (what `remove_unused_columns=True` keeps) collate identically."""
    raw = _features()
    processed = []
    for feature in raw:
        encoded = tiny_processor(images=[feature["images"]], text=[feature["text"]], return_tensors="pt")
        processed.append({"input_ids": encoded["input_ids"][0], "pixel_values": encoded["pixel_values"][0]})
    for max_length in (None, 6):
        expected = FlamingoDataCollator(tiny_processor, max_length=max_length)(raw)
        batch = FlamingoDataCollator(tiny_processor, max_length=max_length)(processed)
        assert batch.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(batch[key], expected[key], atol=0, rtol=0, msg=key)
    text_only = FlamingoDataCollator(tiny_processor, mask_before_first_image=False)(
        [{"input_ids": [65, 66]}, {"input_ids": [65]}]
    )
    assert "pixel_values" not in text_only
    assert text_only["input_ids"].tolist() == [[65, 66], [65, PAD]]
    with pytest.raises(
        ValueError, match=re.escape("Sample 0 has 1 `<image>` tokens in `input_ids` but 0 image(s) were given")
    ):
        FlamingoDataCollator(tiny_processor)([{"input_ids": [IMG, 65]}])
