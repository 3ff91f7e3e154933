"""Image processor reproducing OpenFlamingo's (open_clip's) evaluation preprocessing exactly."""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import CLIPImageProcessorPil


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
    """

    def center_crop(self, image: np.ndarray, size: Any, **kwargs: Any) -> np.ndarray:
        height, width = image.shape[-2:]
        if size.height is None or size.width is None or height < size.height or width < size.width:
            return super().center_crop(image, size, **kwargs)
        top = int(round((height - size.height) / 2.0))
        left = int(round((width - size.width) / 2.0))
        return image[..., top : top + size.height, left : left + size.width]


__all__ = ["FlamingoImageProcessor"]
