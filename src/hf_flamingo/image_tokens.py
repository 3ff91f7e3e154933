"""The `<image>` contract, shared by the processor, the data collator, the model and evaluation.

Every image has exactly one `<image>` token, placed where the image appears in the text, and a sample's images are
given in the order of their tokens. A batch's images are one tensor `(batch_size, max_num_images, ...)`: each
sample's own images first, then zeros up to the largest number of images of any sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def count_image_tokens(input_ids: torch.LongTensor, media_token_id: int) -> torch.LongTensor:
    """For every token, how many `<image>` tokens its row holds up to and including it: the 1-based index of the
    image it follows (0: none yet). Shape `(batch, seq_len)`."""
    return (input_ids == media_token_id).cumsum(dim=-1)


def image_tokens_per_sample(input_ids: Sequence[Sequence[int]] | torch.Tensor, media_token_id: int) -> list[int]:
    """The number of `<image>` tokens of each sample of `input_ids` (lists of ids, or a `(batch, seq_len)` tensor)."""
    if isinstance(input_ids, torch.Tensor):
        return (input_ids == media_token_id).sum(dim=-1).tolist()
    return [sum(1 for token_id in ids if token_id == media_token_id) for ids in input_ids]


def check_image_token_counts(
    token_counts: Sequence[int],
    image_counts: Sequence[int],
    media_token: str,
    *,
    where: str = "in its text",
    hint: str = "",
) -> None:
    """Raises if a sample's number of `<image>` tokens differs from its number of images.

    Args:
        token_counts (`Sequence[int]`): `<image>` tokens per sample.
        image_counts (`Sequence[int]`): Images per sample.
        media_token (`str`): The `<image>` token's text, for the message.
        where (`str`, defaults to `"in its text"`): Where the tokens were counted, for the message.
        hint (`str`, *optional*): Appended to the message (e.g. what may have removed tokens).

    Raises:
        ValueError: Naming the first sample whose counts differ.
    """
    for index, (num_tokens, num_images) in enumerate(zip(token_counts, image_counts, strict=True)):
        if num_tokens != num_images:
            raise ValueError(
                f"Sample {index} has {num_tokens} `{media_token}` tokens {where} but {num_images} image(s) were "
                f"given; each image needs exactly one `{media_token}` token where it appears in the text.{hint}"
            )


def stack_images_per_sample(images_per_sample: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """Stacks each sample's images `(num_images, ...)` (or `None`: no image) into `(batch_size, max_num_images,
    ...)`, zero-padded after each sample's own images; `None` when no sample has an image.

    Raises:
        ValueError: If the images do not all have the same shape.
    """
    present = [images for images in images_per_sample if images is not None and images.shape[0] > 0]
    if not present:
        return None
    image_shape = present[0].shape[1:]
    if any(images.shape[1:] != image_shape for images in present):
        raise ValueError("All images of a batch must have the same shape after preprocessing.")
    most = max(images.shape[0] for images in present)
    stacked = present[0].new_zeros((len(images_per_sample), most, *image_shape))
    for row, images in enumerate(images_per_sample):
        if images is not None:
            stacked[row, : images.shape[0]] = images
    return stacked
