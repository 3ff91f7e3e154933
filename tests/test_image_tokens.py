"""The `<image>` contract helpers that the processor, the collator, the model and evaluation share."""

import re

import pytest
import torch

from hf_flamingo.image_tokens import (
    check_image_token_counts,
    count_image_tokens,
    image_tokens_per_sample,
    stack_images_per_sample,
)

IMG = 9


def test_counts_from_lists_and_tensors_agree():
    rows = [[1, IMG, 2, IMG], [IMG, 3, 3, 3]]
    assert image_tokens_per_sample(rows, IMG) == [2, 1]
    assert image_tokens_per_sample(torch.tensor(rows), IMG) == [2, 1]
    assert count_image_tokens(torch.tensor(rows), IMG).tolist() == [[0, 1, 1, 2], [1, 1, 1, 1]]


def test_mismatch_names_the_first_wrong_sample():
    check_image_token_counts([2, 0], [2, 0], "<image>")
    message = (
        "Sample 1 has 1 `<img>` tokens in `input_ids` but 0 image(s) were given; each image needs exactly one "
        "`<img>` token where it appears in the text. Check truncation."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        check_image_token_counts([2, 1, 3], [2, 0, 0], "<img>", where="in `input_ids`", hint=" Check truncation.")


def test_stacking_pads_each_sample_with_zero_images():
    first, second = torch.rand(2, 3, 4, 4), torch.rand(1, 3, 4, 4)
    stacked = stack_images_per_sample([first, None, second, second[:0]])
    assert stacked.shape == (4, 2, 3, 4, 4)
    assert torch.equal(stacked[0], first) and torch.equal(stacked[2, 0], second[0])
    assert not stacked[1].any() and not stacked[2, 1].any() and not stacked[3].any()
    assert stack_images_per_sample([None, second[:0]]) is None
    with pytest.raises(ValueError, match="All images of a batch must have the same shape after preprocessing"):
        stack_images_per_sample([first, torch.rand(1, 3, 5, 5)])
