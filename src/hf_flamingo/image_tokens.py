"""The `<image>` contract, shared by the processor, the data collator, the model and evaluation.

Every image has exactly one `<image>` token, placed where the image appears in the text, and a sample's images are
given in the order of their tokens. A batch's images are one tensor `(batch_size, max_num_images, ...)`: each
sample's own images first, then zeros up to the largest number of images of any sample.

It also holds the numerical checks every image array goes through before preprocessing (`check_raw_image_values`), shared
by `FlamingoProcessor` and `FlamingoImageProcessor`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

RESCALED_IMAGES_WARNING = (
    "It looks like you are trying to rescale already rescaled images. If the input images have pixel values between "
    "0 and 1, set `do_rescale=False` to avoid rescaling them again."
)
"""transformers' warning for float images already in [0, 1] that `do_rescale=True` would divide by 255 again."""


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
        ValueError: If the images do not all have the same shape, naming the two samples that differ.
    """
    shapes = [
        (row, tuple(images.shape[1:]))
        for row, images in enumerate(images_per_sample)
        if images is not None and images.shape[0] > 0
    ]
    if not shapes:
        return None
    first_row, image_shape = shapes[0]
    for row, shape in shapes[1:]:
        if shape != image_shape:
            raise ValueError(
                f"All images of a batch must have the same shape after preprocessing: sample {first_row} has images "
                f"of shape {image_shape} but sample {row} has {shape}."
            )
    present = [images for images in images_per_sample if images is not None and images.shape[0] > 0]
    most = max(images.shape[0] for images in present)
    stacked = present[0].new_zeros((len(images_per_sample), most, *image_shape))
    for row, images in enumerate(images_per_sample):
        if images is not None:
            stacked[row, : images.shape[0]] = images
    return stacked


def _value_range(image: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """The smallest and largest value of `image` (NaN if it holds a NaN): two cheap reductions."""
    if isinstance(image, torch.Tensor):
        return image.min().item(), image.max().item()
    return float(np.min(image)), float(np.max(image))


def check_raw_image_values(
    image: np.ndarray | torch.Tensor,
    name: str,
    do_rescale: bool,
    rescale_factor: float = 1 / 255,
) -> tuple[float, float] | None:
    """Checks the values of one image array or tensor before preprocessing.

    Float images must be finite. Float images whose values all lie in [0, 1] while `do_rescale=True` get transformers'
    warning "It looks like you are trying to rescale already rescaled images..." (once per process): rescaling would
    divide them by 255 a second time. Integer images (other than `uint8`) must lie in the range that `rescale_factor`
    maps into [0, 1], e.g. [0, 255]: a 16-bit image would otherwise come out up to 257 times too bright. `uint8` images
    are not inspected. Nothing is checked while `torch.compile` traces.

    Args:
        image (`np.ndarray` or `torch.Tensor`): The image (or a stack of images).
        name (`str`): How messages call the image, e.g. `"Image 0 of sample 1"`.
        do_rescale (`bool`): Whether the image processor will rescale the image by `rescale_factor`.
        rescale_factor (`float`, *optional*, defaults to `1 / 255`): The image processor's rescale factor.

    Returns:
        `tuple[float, float]` or `None`: The image's smallest and largest value, or `None` if it was not inspected.

    Raises:
        ValueError: If a float image holds NaN or infinite values, or an integer image lies outside the range
            `do_rescale` expects.
    """
    if torch.compiler.is_compiling():
        return None
    kind = _dtype_kind(image)
    if kind not in ("f", "i", "u"):
        raise ValueError(
            f"{name} has dtype {image.dtype}; images must hold integers (e.g. `uint8` in [0, 255]) or floats. "
            "Convert boolean masks with `.astype(np.uint8) * 255`."
        )
    if _is_uint8(image) or _num_values(image) == 0:
        return None
    low, high = _value_range(image)
    if kind == "f":
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError(
                f"{name} contains NaN or infinite values (dtype {image.dtype}, shape {tuple(image.shape)}); images "
                "must be finite. Check how the image was decoded or computed."
            )
        if do_rescale and low >= 0.0 and high <= 1.0:
            logger.warning_once(RESCALED_IMAGES_WARNING)
    elif do_rescale and (low < 0 or high * rescale_factor > 1.0 + 1e-6):
        raise ValueError(
            f"{name} has integer values in [{low:g}, {high:g}] (dtype {image.dtype}), but `do_rescale=True` expects "
            f"[0, {1 / rescale_factor:g}] (`rescale_factor={rescale_factor:g}`). Convert it to 8 bits per channel "
            "(e.g. `(image // 257).astype(np.uint8)` for 16-bit images) or set `rescale_factor` to match its range."
        )
    return low, high


def _is_uint8(image: np.ndarray | torch.Tensor) -> bool:
    """Whether `image` holds `uint8` values (always in [0, 255])."""
    return image.dtype == (torch.uint8 if isinstance(image, torch.Tensor) else np.uint8)


def _num_values(image: np.ndarray | torch.Tensor) -> int:
    """The number of values of `image`."""
    return image.numel() if isinstance(image, torch.Tensor) else image.size


def _dtype_kind(image: np.ndarray | torch.Tensor) -> str:
    """NumPy's kind of `image`'s dtype: `"f"` float, `"i"`/`"u"` (un)signed integer, `"b"` bool, `"c"` complex, ..."""
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.bool:
            return "b"
        if image.is_complex():
            return "c"
        return "f" if image.is_floating_point() else ("u" if image.dtype == torch.uint8 else "i")
    return image.dtype.kind
