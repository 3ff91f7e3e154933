"""Tests for `FlamingoProcessor`: special tokens, batching, image packing, validation and save/load."""

import json
import re

import numpy as np
import pytest
import torch
from helpers import TINY_VOCAB_SIZE, build_tiny_image_processor, build_tiny_tokenizer, make_test_image

from hf_flamingo.processing_flamingo import FlamingoProcessor

EOC_ID = TINY_VOCAB_SIZE  # 320
MEDIA_ID = TINY_VOCAB_SIZE + 1  # 321
PAD_ID = TINY_VOCAB_SIZE + 2  # 322


@pytest.fixture
def images():
    return [make_test_image(seed) for seed in range(3)]


def expected_pixels(image_processor, image):
    """The image processor's own output for one image, shape `(C, H, W)`."""
    return image_processor(image, return_tensors="pt")["pixel_values"][0]


# ----------------------------------------------------------------------------------------------------------------
# Special tokens
# ----------------------------------------------------------------------------------------------------------------


def test_tokens_added_when_missing(fresh_tiny_tokenizer, tiny_image_processor):
    tokenizer = fresh_tiny_tokenizer
    assert len(tokenizer) == TINY_VOCAB_SIZE
    assert tokenizer.pad_token is None

    processor = FlamingoProcessor(image_processor=tiny_image_processor, tokenizer=tokenizer)

    assert len(tokenizer) == TINY_VOCAB_SIZE + 3
    assert processor.eoc_token_id == EOC_ID
    assert processor.media_token_id == MEDIA_ID
    assert tokenizer.convert_tokens_to_ids("<|endofchunk|>") == EOC_ID
    assert tokenizer.convert_tokens_to_ids("<image>") == MEDIA_ID
    assert tokenizer.pad_token == "<PAD>"
    assert tokenizer.pad_token_id == PAD_ID
    assert tokenizer.extra_special_tokens == ["<|endofchunk|>", "<image>"]
    assert tokenizer.padding_side == "left"
    assert processor.media_token == "<image>"
    assert processor.end_of_chunk_token == "<|endofchunk|>"
    assert processor.image_token == "<image>"
    assert processor.image_token_id == MEDIA_ID
    # The new tokens are single, unsplit tokens in text.
    assert tokenizer("<image>a<|endofchunk|>")["input_ids"] == [MEDIA_ID, 65, EOC_ID]


def test_tokens_not_readded_when_present(fresh_tiny_tokenizer, tiny_image_processor):
    tokenizer = fresh_tiny_tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    assert len(tokenizer) == TINY_VOCAB_SIZE + 3

    processor = FlamingoProcessor(image_processor=tiny_image_processor, tokenizer=tokenizer)

    assert len(tokenizer) == TINY_VOCAB_SIZE + 3
    assert (processor.eoc_token_id, processor.media_token_id, tokenizer.pad_token_id) == (EOC_ID, MEDIA_ID, PAD_ID)
    assert tokenizer.extra_special_tokens == ["<|endofchunk|>", "<image>"]

    # Building a second processor on the same tokenizer changes nothing either.
    FlamingoProcessor(image_processor=tiny_image_processor, tokenizer=tokenizer)
    assert len(tokenizer) == TINY_VOCAB_SIZE + 3
    assert tokenizer.extra_special_tokens == ["<|endofchunk|>", "<image>"]


def test_existing_pad_token_is_kept(fresh_tiny_tokenizer, tiny_image_processor):
    tokenizer = fresh_tiny_tokenizer
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    assert tokenizer.pad_token_id == TINY_VOCAB_SIZE

    processor = FlamingoProcessor(image_processor=tiny_image_processor, tokenizer=tokenizer)

    assert len(tokenizer) == TINY_VOCAB_SIZE + 3  # pad + only 2 added by the processor
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id == TINY_VOCAB_SIZE
    assert processor.eoc_token_id == TINY_VOCAB_SIZE + 1
    assert processor.media_token_id == TINY_VOCAB_SIZE + 2
    assert tokenizer.convert_tokens_to_ids("<PAD>") is None


def test_existing_extra_special_tokens_are_preserved(fresh_tiny_tokenizer, tiny_image_processor):
    tokenizer = fresh_tiny_tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": ["<foo>"]})

    processor = FlamingoProcessor(image_processor=tiny_image_processor, tokenizer=tokenizer)

    assert tokenizer.extra_special_tokens == ["<foo>", "<|endofchunk|>", "<image>"]
    assert tokenizer.convert_tokens_to_ids("<foo>") == TINY_VOCAB_SIZE
    assert processor.eoc_token_id == TINY_VOCAB_SIZE + 1
    assert processor.media_token_id == TINY_VOCAB_SIZE + 2
    assert tokenizer.pad_token_id == TINY_VOCAB_SIZE + 3
    assert len(tokenizer) == TINY_VOCAB_SIZE + 4
    assert tokenizer.decode([TINY_VOCAB_SIZE, 65], skip_special_tokens=True) == "a"


def test_media_token_already_in_vocab_keeps_its_id(fresh_tiny_tokenizer, tiny_image_processor):
    tokenizer = fresh_tiny_tokenizer
    tokenizer.add_tokens(["<image>"])  # a plain (not special) added token
    assert tokenizer.convert_tokens_to_ids("<image>") == TINY_VOCAB_SIZE

    processor = FlamingoProcessor(image_processor=tiny_image_processor, tokenizer=tokenizer)

    assert processor.media_token_id == TINY_VOCAB_SIZE
    assert processor.eoc_token_id == TINY_VOCAB_SIZE + 1
    assert tokenizer.pad_token_id == TINY_VOCAB_SIZE + 2
    assert len(tokenizer) == TINY_VOCAB_SIZE + 3
    # It is now special, so decoding can skip it.
    assert tokenizer.decode([TINY_VOCAB_SIZE, 65], skip_special_tokens=True) == "a"


def test_custom_tokens(fresh_tiny_tokenizer, tiny_image_processor, images):
    processor = FlamingoProcessor(
        image_processor=tiny_image_processor,
        tokenizer=fresh_tiny_tokenizer,
        media_token="<img>",
        end_of_chunk_token="<eoc>",
        pad_token="[pad]",
    )
    assert (processor.eoc_token_id, processor.media_token_id) == (EOC_ID, MEDIA_ID)
    assert fresh_tiny_tokenizer.pad_token == "[pad]"

    out = processor(images=images[0], text="<img>a<eoc>", return_tensors="pt")
    assert out["input_ids"].tolist() == [[MEDIA_ID, 65, EOC_ID]]
    with pytest.raises(ValueError, match=re.escape("Sample 0 has 0 `<img>` tokens in its text but 1 image(s)")):
        processor(images=images[0], text="<image>a", return_tensors="pt")


def test_init_errors(fresh_tiny_tokenizer, tiny_image_processor):
    with pytest.raises(ValueError, match="needs a `tokenizer`"):
        FlamingoProcessor(image_processor=tiny_image_processor)
    with pytest.raises(ValueError, match="needs an `image_processor`"):
        FlamingoProcessor(tokenizer=fresh_tiny_tokenizer)
    with pytest.raises(ValueError, match="must differ"):
        FlamingoProcessor(tiny_image_processor, fresh_tiny_tokenizer, media_token="<x>", end_of_chunk_token="<x>")
    with pytest.raises(TypeError, match="Unexpected keyword argument"):
        FlamingoProcessor(tiny_image_processor, fresh_tiny_tokenizer, not_an_option=1)


# ----------------------------------------------------------------------------------------------------------------
# Batching, padding and image packing
# ----------------------------------------------------------------------------------------------------------------


def test_batch_with_images(tiny_processor, tiny_image_processor, images):
    img_a, img_b, img_c = images
    out = tiny_processor(
        images=[[img_a, img_b], [img_c]],
        text=["<image>a<image>b", "<image>c"],
        return_tensors="pt",
        padding=True,
    )

    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values"}
    assert out["input_ids"].dtype == torch.long
    assert out["input_ids"].tolist() == [[MEDIA_ID, 65, MEDIA_ID, 66], [PAD_ID, PAD_ID, MEDIA_ID, 67]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]

    pixel_values = out["pixel_values"]
    assert pixel_values.shape == (2, 2, 3, 30, 30)
    assert pixel_values.dtype == torch.float32
    assert torch.equal(pixel_values[0, 0], expected_pixels(tiny_image_processor, img_a))
    assert torch.equal(pixel_values[0, 1], expected_pixels(tiny_image_processor, img_b))
    assert torch.equal(pixel_values[1, 0], expected_pixels(tiny_image_processor, img_c))
    assert torch.count_nonzero(pixel_values[1, 1]) == 0
    assert not torch.equal(pixel_values[0, 0], pixel_values[0, 1])


def test_padding_defaults_to_longest(tiny_processor):
    out = tiny_processor(text=["a", "a a"], return_tensors="pt")  # "a" = 65, " a" = 260
    assert out["input_ids"].tolist() == [[PAD_ID, 65], [65, 260]]
    assert out["attention_mask"].tolist() == [[0, 1], [1, 1]]


def test_padding_side_right_per_call(tiny_processor, images):
    texts = ["<image>a<image>b", "<image>c"]
    image_groups = [[images[0], images[1]], [images[2]]]

    right = tiny_processor(images=image_groups, text=texts, return_tensors="pt", padding_side="right")
    assert right["input_ids"].tolist() == [[MEDIA_ID, 65, MEDIA_ID, 66], [MEDIA_ID, 67, PAD_ID, PAD_ID]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]

    # The per-call option does not change the tokenizer's default.
    assert tiny_processor.tokenizer.padding_side == "left"
    left = tiny_processor(images=image_groups, text=texts, return_tensors="pt")
    assert left["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]

    # The same option grouped in `text_kwargs`.
    grouped = tiny_processor(
        images=image_groups, text=texts, return_tensors="pt", text_kwargs={"padding_side": "right"}
    )
    assert torch.equal(grouped["input_ids"], right["input_ids"])
    assert torch.equal(grouped["pixel_values"], right["pixel_values"])


def test_text_only_has_no_pixel_values(tiny_processor):
    out = tiny_processor(text=["a b", "c"], return_tensors="pt")
    assert set(out.keys()) == {"input_ids", "attention_mask"}
    assert out["input_ids"].shape[0] == 2

    out = tiny_processor(text="a", images=[], return_tensors="pt")
    assert "pixel_values" not in out


def test_sample_without_images_gets_zero_images(tiny_processor, tiny_image_processor, images):
    out = tiny_processor(images=[[], [images[0]]], text=["a", "<image>b"], return_tensors="pt")
    assert out["pixel_values"].shape == (2, 1, 3, 30, 30)
    assert torch.count_nonzero(out["pixel_values"][0]) == 0
    assert torch.equal(out["pixel_values"][1, 0], expected_pixels(tiny_image_processor, images[0]))


def test_single_text_accepts_single_image_and_flat_list(tiny_processor, tiny_image_processor, images):
    single = tiny_processor(images=images[0], text="<image>a", return_tensors="pt")
    assert single["input_ids"].tolist() == [[MEDIA_ID, 65]]
    assert single["pixel_values"].shape == (1, 1, 3, 30, 30)
    assert torch.equal(single["pixel_values"][0, 0], expected_pixels(tiny_image_processor, images[0]))

    flat = tiny_processor(images=[images[0], images[1]], text="<image>a<image>b", return_tensors="pt")
    nested = tiny_processor(images=[[images[0], images[1]]], text=["<image>a<image>b"], return_tensors="pt")
    assert flat["pixel_values"].shape == (1, 2, 3, 30, 30)
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(flat[key], nested[key])


def test_numpy_and_torch_images(tiny_processor, images):
    reference = tiny_processor(images=[images[0], images[1]], text="<image>a<image>b", return_tensors="pt")
    arrays = [np.array(image) for image in images[:2]]  # (H, W, C) uint8

    from_arrays = tiny_processor(images=arrays, text="<image>a<image>b", return_tensors="pt")
    from_stack = tiny_processor(images=np.stack(arrays), text="<image>a<image>b", return_tensors="pt")
    from_tensors = tiny_processor(
        images=[torch.from_numpy(array).permute(2, 0, 1) for array in arrays],
        text="<image>a<image>b",
        return_tensors="pt",
    )
    for out in (from_arrays, from_stack, from_tensors):
        assert out["pixel_values"].shape == (1, 2, 3, 30, 30)
        assert torch.allclose(out["pixel_values"], reference["pixel_values"], atol=1e-6)


def test_images_without_text(tiny_processor, tiny_image_processor, images):
    out = tiny_processor(images=[[images[0]], [images[1], images[2]]], return_tensors="pt")
    assert set(out.keys()) == {"pixel_values"}
    assert out["pixel_values"].shape == (2, 2, 3, 30, 30)
    assert torch.equal(out["pixel_values"][1, 1], expected_pixels(tiny_image_processor, images[2]))
    assert torch.count_nonzero(out["pixel_values"][0, 1]) == 0


def test_return_tensors_np_and_none(tiny_processor, images):
    texts = ["<image>a<image>b", "<image>c"]
    image_groups = [[images[0], images[1]], [images[2]]]
    pt = tiny_processor(images=image_groups, text=texts, return_tensors="pt")

    np_out = tiny_processor(images=image_groups, text=texts, return_tensors="np")
    assert isinstance(np_out["input_ids"], np.ndarray)
    assert isinstance(np_out["pixel_values"], np.ndarray)
    assert np_out["pixel_values"].shape == (2, 2, 3, 30, 30)
    assert np.array_equal(np_out["input_ids"], pt["input_ids"].numpy())
    assert np.array_equal(np_out["pixel_values"], pt["pixel_values"].numpy())

    list_out = tiny_processor(images=image_groups, text=texts)
    assert list_out["input_ids"] == pt["input_ids"].tolist()
    assert list_out["attention_mask"] == pt["attention_mask"].tolist()
    assert isinstance(list_out["pixel_values"], torch.Tensor)
    assert torch.equal(list_out["pixel_values"], pt["pixel_values"])


def test_unsupported_return_tensors(tiny_processor, images):
    with pytest.raises(ValueError, match="supports `return_tensors` 'pt', 'np' or None"):
        tiny_processor(images=images[0], text="<image>a", return_tensors="jax")


def test_mm_token_type_ids(tiny_processor, images):
    out = tiny_processor(images=images[0], text="<image>a", return_tensors="pt", return_mm_token_type_ids=True)
    assert out["mm_token_type_ids"].tolist() == [[1, 0]]


def test_truncation_and_other_tokenizer_kwargs(tiny_processor, images):
    out = tiny_processor(images=images[0], text="<image>a b c", return_tensors="pt", truncation=True, max_length=2)
    assert out["input_ids"].tolist() == [[MEDIA_ID, 65]]

    out = tiny_processor(text=["a", "b"], return_tensors="pt", padding="max_length", max_length=4)
    assert out["input_ids"].tolist() == [[PAD_ID, PAD_ID, PAD_ID, 65], [PAD_ID, PAD_ID, PAD_ID, 66]]


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def test_too_few_images(tiny_processor, images):
    expected = (
        "Sample 1 has 2 `<image>` tokens in its text but 1 image(s) were given; each image needs exactly one "
        "`<image>` token where it appears in the text."
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        tiny_processor(images=[[images[0]], [images[1]]], text=["<image>a", "<image>b<image>c"], return_tensors="pt")


def test_too_many_images(tiny_processor, images):
    with pytest.raises(ValueError, match=re.escape("Sample 0 has 1 `<image>` tokens in its text but 2 image(s)")):
        tiny_processor(images=[[images[0], images[1]], [images[2]]], text=["<image>a", "<image>c"])


def test_media_tokens_without_images(tiny_processor):
    with pytest.raises(ValueError, match=re.escape("Sample 0 has 1 `<image>` tokens in its text but 0 image(s)")):
        tiny_processor(text="<image>a", return_tensors="pt")


def test_media_token_counted_in_ids_not_substrings(tiny_processor, images):
    # Two images but the text has only one `<image>` token after truncation cut the second one.
    with pytest.raises(ValueError, match=r"Sample 0 has 1 `<image>` tokens .* Truncation may have removed"):
        tiny_processor(
            images=[images[0], images[1]],
            text="<image>a b c<image>",
            return_tensors="pt",
            truncation=True,
            max_length=3,
        )


def test_flat_image_list_is_handed_out_in_token_order(tiny_processor, images):
    texts = ["<image>a", "<image>b<image>c", "d"]
    flat = tiny_processor(images=images[:3], text=texts, return_tensors="pt")
    nested = tiny_processor(images=[[images[0]], [images[1], images[2]], []], text=texts, return_tensors="pt")
    assert torch.equal(flat["input_ids"], nested["input_ids"])
    assert torch.equal(flat["pixel_values"], nested["pixel_values"])

    message = "Got a flat list of 1 image(s) for 2 texts with 2 `<image>` token(s) in all (per text: [1, 1])"
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_processor(images=images[0], text=["<image>a", "<image>b"], return_tensors="pt")


def test_nested_list_length_must_match_texts(tiny_processor, images):
    with pytest.raises(ValueError, match=re.escape("Got 1 lists of images for 2 texts")):
        tiny_processor(images=[[images[0]]], text=["<image>a", "b"], return_tensors="pt")


@pytest.mark.parametrize(
    ("bad_images", "message"),
    [
        (["not an image"], "Could not load `images[0]` ('not an image') as an image: Incorrect image source"),
        ([[make_test_image(0)], "x"], "Could not load `images[1]` ('x') as an image"),
        (3, "`images` must be a PIL image, a NumPy array or torch tensor, a path or URL"),
    ],
)
def test_invalid_images(tiny_processor, bad_images, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_processor(images=bad_images, text="<image>a", return_tensors="pt")


def test_image_paths_and_urls_are_loaded_with_transformers_utilities(tiny_processor, images, tmp_path, monkeypatch):
    images[0].save(tmp_path / "a.png")
    images[1].save(tmp_path / "b.png")
    direct = tiny_processor(images=[images[0], images[1]], text="<image>a<image>b", return_tensors="pt")
    for references in ([str(tmp_path / "a.png"), tmp_path / "b.png"], [[tmp_path / "a.png", str(tmp_path / "b.png")]]):
        loaded = tiny_processor(images=references, text="<image>a<image>b", return_tensors="pt")
        assert torch.equal(loaded["pixel_values"], direct["pixel_values"])

    requested = []

    def fake_load_image(source, timeout=None):
        requested.append(source)
        return images[0]

    monkeypatch.setattr("hf_flamingo.processing_flamingo.load_image", fake_load_image)
    url = "https://example.com/cat.jpg"
    from_url = tiny_processor(images=url, text="<image>a", return_tensors="pt")
    assert requested == [url]
    assert torch.equal(from_url["pixel_values"][0, 0], direct["pixel_values"][0, 0])


def test_post_process_image_text_to_text_decodes_without_special_tokens(tiny_processor):
    ids = tiny_processor.tokenizer(["<image>a dog<|endofchunk|>", "a cat"], padding=True, return_tensors="pt")
    ids = ids["input_ids"]
    assert tiny_processor.post_process_image_text_to_text(ids) == ["a dog", "a cat"]
    kept = tiny_processor.post_process_image_text_to_text(ids, skip_special_tokens=False)
    assert kept == ["<image>a dog<|endofchunk|>", "<PAD>a cat"]


@pytest.mark.parametrize("padding_side", [None, "left", "right"])
def test_padding_is_the_same_after_an_auto_processor_round_trip(tiny_processor, images, tmp_path, padding_side):
    from transformers import AutoProcessor

    tiny_processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is type(tiny_processor)
    options = {} if padding_side is None else {"padding_side": padding_side}
    texts = ["<image>a long caption of a dog", "<image>b"]
    before = tiny_processor(images=images[:2], text=texts, return_tensors="pt", **options)
    after = reloaded(images=images[:2], text=texts, return_tensors="pt", **options)
    for name in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(before[name], after[name]), name
    pad_column = 0 if padding_side in (None, "left") else -1
    assert before["attention_mask"][1, pad_column] == 0


def test_invalid_inputs(tiny_processor, images):
    with pytest.raises(ValueError, match="provide `text`, `images` or both"):
        tiny_processor()
    with pytest.raises(ValueError, match="`text` must be a string or a non-empty list of strings"):
        tiny_processor(text=[])
    with pytest.raises(ValueError, match="`text` must be a string or a non-empty list of strings"):
        tiny_processor(text=["a", 1])
    with pytest.raises(ValueError, match="not `videos` or `audio`"):
        tiny_processor(text="a", videos=[np.zeros((2, 8, 8, 3), dtype=np.uint8)])


# ----------------------------------------------------------------------------------------------------------------
# Decoding, model inputs, save/load
# ----------------------------------------------------------------------------------------------------------------


def test_decode(tiny_processor, images):
    out = tiny_processor(
        images=[[images[0], images[1]], [images[2]]],
        text=["<image>a<image>b<|endofchunk|>", "<image>c"],
        return_tensors="pt",
    )
    assert tiny_processor.batch_decode(out["input_ids"], skip_special_tokens=True) == ["ab", "c"]
    assert tiny_processor.batch_decode(out["input_ids"]) == [
        "<image>a<image>b<|endofchunk|>",
        "<PAD><PAD><PAD><image>c",
    ]
    assert tiny_processor.decode(out["input_ids"][0], skip_special_tokens=True) == "ab"
    assert tiny_processor.decode(out["input_ids"][0]) == "<image>a<image>b<|endofchunk|>"


def test_model_input_names(tiny_processor):
    assert tiny_processor.model_input_names == ["input_ids", "attention_mask", "pixel_values"]


def test_save_load_round_trip(tiny_processor, images, tmp_path):
    texts = ["<image>a<image>b<|endofchunk|>", "<image>c"]
    image_groups = [[images[0], images[1]], [images[2]]]
    before = tiny_processor(images=image_groups, text=texts, return_tensors="pt")

    tiny_processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["processor_class"] == "FlamingoProcessor"
    assert config["media_token"] == "<image>"
    assert config["end_of_chunk_token"] == "<|endofchunk|>"
    assert config["image_processor"]["crop_size"] == {"height": 30, "width": 30}

    loaded = FlamingoProcessor.from_pretrained(tmp_path)
    tokenizer = loaded.tokenizer
    assert len(tokenizer) == TINY_VOCAB_SIZE + 3
    assert tokenizer.extra_special_tokens == ["<|endofchunk|>", "<image>"]
    assert (loaded.eoc_token_id, loaded.media_token_id, tokenizer.pad_token_id) == (EOC_ID, MEDIA_ID, PAD_ID)
    assert tokenizer.pad_token == "<PAD>"
    assert tokenizer.padding_side == "left"
    assert loaded.media_token == "<image>"
    assert loaded.end_of_chunk_token == "<|endofchunk|>"
    assert loaded.image_processor.to_dict() == tiny_processor.image_processor.to_dict()

    after = loaded(images=image_groups, text=texts, return_tensors="pt")
    assert set(after.keys()) == set(before.keys())
    for key in before:
        assert torch.equal(after[key], before[key]), key

    # A second round trip is stable too.
    loaded.save_pretrained(tmp_path / "again")
    reloaded = FlamingoProcessor.from_pretrained(tmp_path / "again")
    assert len(reloaded.tokenizer) == TINY_VOCAB_SIZE + 3
    assert reloaded.tokenizer.extra_special_tokens == ["<|endofchunk|>", "<image>"]


def test_save_load_round_trip_custom_tokens(tmp_path, images):
    processor = FlamingoProcessor(
        build_tiny_image_processor(), build_tiny_tokenizer(), media_token="<img>", end_of_chunk_token="<eoc>"
    )
    processor.save_pretrained(tmp_path)

    loaded = FlamingoProcessor.from_pretrained(tmp_path)
    assert loaded.media_token == "<img>"
    assert loaded.end_of_chunk_token == "<eoc>"
    assert (loaded.eoc_token_id, loaded.media_token_id, loaded.tokenizer.pad_token_id) == (EOC_ID, MEDIA_ID, PAD_ID)
    assert len(loaded.tokenizer) == TINY_VOCAB_SIZE + 3
    out = loaded(images=images[0], text="<img>a<eoc>", return_tensors="pt")
    assert out["input_ids"].tolist() == [[MEDIA_ID, 65, EOC_ID]]


def test_shared_tiny_tokenizer_fixture(tiny_tokenizer):
    assert len(tiny_tokenizer) == TINY_VOCAB_SIZE
    assert tiny_tokenizer.pad_token is None
    assert tiny_tokenizer.eos_token == tiny_tokenizer.bos_token == "<|endoftext|>"
    assert tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    assert tiny_tokenizer.decode(tiny_tokenizer("Output: a cat.")["input_ids"]) == "Output: a cat."
