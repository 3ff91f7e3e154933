"""Image processor reproducing OpenFlamingo's (open_clip's) evaluation preprocessing exactly."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import CLIPImageProcessorPil
from transformers.feature_extraction_utils import BatchFeature

from .image_tokens import check_raw_image_values


def _image_arrays(images: Any) -> list[np.ndarray | torch.Tensor]:
    """The arrays and tensors in `images` (one image, a stack, or nested lists of them), in order."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return [images]
    if isinstance(images, (list, tuple)):
        return [array for element in images for array in _image_arrays(element)]
    return []


class FlamingoImageProcessor(CLIPImageProcessorPil):
    r"""
    CLIP preprocessing as OpenFlamingo applies it (open_clip's `image_transform(image_size, is_train=False)`): resize
    the shortest side to `size["shortest_edge"]` with PIL's bicubic filter, center crop `crop_size`, convert to RGB,
    scale to [0, 1] and normalise with the OpenAI CLIP statistics.

    It is transformers' PIL-backend CLIP processor with one change: the crop starts at `round((L - S) / 2)` (round
    half to even), as torchvision's `CenterCrop` does, instead of `(L - S) // 2`. The two differ by one pixel whenever
    `(L - S) % 4 == 3` (e.g. a 299x224 image at 224 px). With it, the output equals open_clip's bit for bit on RGB and
    grayscale images. Images with an alpha channel still differ: open_clip resizes the RGBA image and then drops
    alpha, this processor composites onto white first; convert them to RGB beforehand to get identical results.

    Saved with `save_pretrained`, it reloads as itself through `AutoImageProcessor` / `AutoProcessor` (whichever
    `backend` is requested: the torchvision backend's resize differs from open_clip's by up to one 8-bit level).

    Before preprocessing, image arrays and tensors are checked (see [`~image_tokens.check_raw_image_values`]): NaN or
    infinite values raise a `ValueError`, and float images whose values all lie in [0, 1] while `do_rescale=True`
    log transformers' warning "It looks like you are trying to rescale already rescaled images..." (they would be
    divided by 255 a second time: pass `do_rescale=False` for them).
    """

    def preprocess(self, images: Any, *args: Any, **kwargs: Any) -> BatchFeature:
        """Checks the values of image arrays and tensors (see the class docstring), then preprocesses `images`."""
        do_rescale = kwargs.get("do_rescale")
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        rescale_factor = kwargs.get("rescale_factor") or self.rescale_factor or 1 / 255
        for index, array in enumerate(_image_arrays(images)):
            check_raw_image_values(array, f"Image {index}", do_rescale=bool(do_rescale), rescale_factor=rescale_factor)
        return super().preprocess(images, *args, **kwargs)

    def center_crop(self, image: np.ndarray, size: Any, **kwargs: Any) -> np.ndarray:
        height, width = image.shape[-2:]
        if size.height is None or size.width is None or height < size.height or width < size.width:
            return super().center_crop(image, size, **kwargs)
        top = int(round((height - size.height) / 2.0))
        left = int(round((width - size.width) / 2.0))
        return image[..., top : top + size.height, left : left + size.width]


__all__ = ["FlamingoImageProcessor"]
