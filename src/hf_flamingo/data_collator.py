"""Data collator for training Flamingo on interleaved image-text samples (OpenFlamingo's label rules)."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from .image_tokens import check_image_token_counts, image_tokens_per_sample, stack_images_per_sample
from .processing_flamingo import FlamingoProcessor

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
"""Label value ignored by the loss (`torch.nn.CrossEntropyLoss`'s default `ignore_index`)."""

_NO_TARGET_CAUSES = (
    "every label is -100 after OpenFlamingo's masking: the text has nothing after its last `<image>`, has no "
    "`<image>` while `mask_before_first_image=True`, or truncation to `max_length` removed every target"
)


def _check_optional_positive_int(name: str, value: Any) -> None:
    """Raises if `value` is neither `None` nor a positive integer."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value < 1):
        raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")


def build_flamingo_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    media_token_id: int,
    eoc_token_id: int,
    mask_before_first_image: bool = True,
    mask_between_chunks: bool = True,
) -> torch.Tensor:
    """
    Builds language-modelling labels for interleaved image-text token ids with OpenFlamingo's masking rules.

    Labels are a copy of `input_ids` in which the following positions are set to -100 (ignored by the loss):

    - padding (`attention_mask == 0`);
    - every `<image>` token;
    - if `mask_before_first_image`: every token before the first `<image>` of its sequence (such tokens cannot see
      any image). A sequence without any `<image>` token is then masked entirely;
    - if `mask_between_chunks`: every token after an `<|endofchunk|>` up to (excluding) the next `<image>`, e.g. the
      EOS token that ends an MMC4/LAION sample, or text between chunks that is not conditioned on a new image. The
      `<|endofchunk|>` token that closes a chunk is itself a target (the model learns to stop), unless it follows
      another `<|endofchunk|>` with no `<image>` in between.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Token ids.
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`):
            1 on real tokens, 0 on padding (either side).
        media_token_id (`int`):
            Id of `<image>`.
        eoc_token_id (`int`):
            Id of `<|endofchunk|>`.
        mask_before_first_image (`bool`, *optional*, defaults to `True`):
            Whether to ignore the tokens before the first `<image>`.
        mask_between_chunks (`bool`, *optional*, defaults to `True`):
            Whether to ignore the tokens between each `<|endofchunk|>` and the next `<image>`.

    Returns:
        `torch.LongTensor` of shape `(batch_size, sequence_length)`: The labels.
    """
    if input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"`input_ids` {tuple(input_ids.shape)} and `attention_mask` {tuple(attention_mask.shape)} must have the "
            "same shape."
        )
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    no_position = torch.full_like(positions, -1)
    is_media = input_ids == media_token_id
    # Position of the last `<image>` at or before each token (-1 if none).
    last_media = torch.where(is_media, positions, no_position).cummax(dim=-1).values

    ignore = (attention_mask == 0) | is_media
    if mask_before_first_image:
        ignore |= last_media < 0
    if mask_between_chunks:
        # Position of the last `<|endofchunk|>` strictly before each token (-1 if none): a token is between chunks when
        # that `<|endofchunk|>` comes after the last `<image>`.
        last_eoc = torch.where(input_ids == eoc_token_id, positions, no_position).cummax(dim=-1).values
        last_eoc_before = torch.cat([no_position[..., :1], last_eoc[..., :-1]], dim=-1)
        ignore |= last_eoc_before > last_media
    return input_ids.masked_fill(ignore, IGNORE_INDEX)


@dataclass
class FlamingoDataCollator:
    """
    Collates interleaved image-text samples into a training batch for [`FlamingoForConditionalGeneration`].

    Each feature is a dictionary with

    - `"text"` (`str`): the text with one `<image>` token where each image appears and `<|endofchunk|>` closing each
      image-text chunk, e.g. `"<image>A photo of a dog.<|endofchunk|><image>A cat.<|endofchunk|><|endoftext|>"`;
    - `"images"` (`list` of PIL images, arrays or tensors, *optional*): the sample's images, in text order.

    Other keys are ignored. The texts and images go through `processor` (so preprocessing is identical to
    inference), with right padding and, if `max_length` is set, truncation.

    Features may instead be already processed, one sample each: `"input_ids"` (a 1-D sequence produced by
    `processor`) and `"pixel_values"` of shape `(num_images, num_channels, height, width)` (absent or empty without
    images); their `"attention_mask"` and `"labels"`, if any, are ignored and rebuilt. Use this form with
    [`Trainer`]'s default `remove_unused_columns=True`, which keeps only the columns named by the model's `forward`
    (`input_ids`, `pixel_values`, ...) and would drop `"text"` and `"images"`; with raw `"text"`/`"images"` features
    set `remove_unused_columns=False`.

    Labels follow OpenFlamingo's MMC4 rules (see [`build_flamingo_labels`]): `input_ids` with -100 on padding, on
    `<image>` tokens, before the first `<image>` (`mask_before_first_image`) and after each `<|endofchunk|>` up to the
    next `<image>` (`mask_between_chunks`). `<|endofchunk|>` itself is a target.

    Truncation: if truncation removes `<image>` tokens, the images of the removed tokens are **dropped** (the last
    images of the sample with the tokenizer's default right truncation), so that every remaining image keeps its
    `<image>` token and no image is left without one. A sample may thus end up with fewer images, or none. Processed
    (`"input_ids"`) features are truncated on the right.

    Samples without any target token (every label -100, e.g. nothing after the last `<image>`, or truncated away)
    do not contribute to the loss: the collator logs a warning naming them. A batch in which no sample has a target
    token raises a `ValueError`, since its loss would be NaN and poison training.

    Features are checked before any work; errors name the feature (its index in `features`, which is also the
    "sample" index of the processor's messages): all features are raw or all processed; processed `input_ids` are
    1-D integer token ids of the tokenizer's vocabulary, and `pixel_values` are finite float tensors of shape
    `(num_images, num_channels, height, width)`.

    Args:
        processor ([`FlamingoProcessor`]):
            The processor used at inference.
        max_length (`int`, *optional*):
            Truncate each sample to at most this many tokens (on the tokenizer's `truncation_side`, right by default).
        pad_to_multiple_of (`int`, *optional*):
            Pad the sequence length to a multiple of this value.
        mask_before_first_image (`bool`, *optional*, defaults to `True`):
            Ignore the tokens before the first `<image>` in the loss.
        mask_between_chunks (`bool`, *optional*, defaults to `True`):
            Ignore the tokens after each `<|endofchunk|>` up to the next `<image>` in the loss.

    Returns (from `__call__`):
        `dict[str, torch.Tensor]` with

        - **input_ids** (`torch.LongTensor` of shape `(batch_size, sequence_length)`), right-padded;
        - **attention_mask** (`torch.LongTensor` of shape `(batch_size, sequence_length)`);
        - **labels** (`torch.LongTensor` of shape `(batch_size, sequence_length)`);
        - **pixel_values** (`torch.FloatTensor` of shape `(batch_size, max_num_images, num_channels, height, width)`),
          zero-padded after each sample's images; absent when no sample of the batch has an image.

    Example:

    ```python
    >>> collator = FlamingoDataCollator(processor, max_length=64)
    >>> batch = collator([{"text": "<image>A red square.<|endofchunk|>", "images": [image]}])
    >>> sorted(batch)
    ['attention_mask', 'input_ids', 'labels', 'pixel_values']
    ```
    """

    processor: FlamingoProcessor
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    mask_before_first_image: bool = True
    mask_between_chunks: bool = True

    def __post_init__(self):
        if not all(hasattr(self.processor, name) for name in ("tokenizer", "media_token", "media_token_id")):
            raise TypeError(
                f"`processor` must be a FlamingoProcessor (the one used at inference), got "
                f"{type(self.processor).__name__}."
            )
        _check_optional_positive_int("max_length", self.max_length)
        _check_optional_positive_int("pad_to_multiple_of", self.pad_to_multiple_of)
        if (
            self.max_length is not None
            and self.pad_to_multiple_of is not None
            and self.max_length % self.pad_to_multiple_of != 0
        ):
            raise ValueError(
                f"`max_length` ({self.max_length}) must be a multiple of `pad_to_multiple_of` "
                f"({self.pad_to_multiple_of}) when both are set."
            )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """
        Collates `features` into a batch.

        Args:
            features (`list[dict[str, Any]]`): Samples with a `"text"` and optional `"images"`, or processed samples
                with `"input_ids"` and optional `"pixel_values"`; all of one kind.

        Returns:
            `dict[str, torch.Tensor]`: `input_ids`, `attention_mask`, `labels` and (if any image) `pixel_values`.

        Raises:
            ValueError: If a feature is malformed (naming it), or if no sample of the batch has a target token.
        """
        processed = self._features_are_processed(features)
        if self.processor.tokenizer.pad_token_id is None:
            raise ValueError(
                "The processor's tokenizer has no pad token, which the collator needs to pad the batch. "
                "FlamingoProcessor adds `<PAD>` when it is built on a tokenizer without one; set one, e.g. "
                "`processor.tokenizer.pad_token = processor.tokenizer.eos_token`."
            )
        batch = self._collate_tokenized(features) if processed else self._collate_raw(features)
        self._check_targets(batch["labels"], features)
        return batch

    @staticmethod
    def _features_are_processed(features: Any) -> bool:
        """Whether the features are processed (`input_ids`) rather than raw (`text`); raises if malformed or mixed."""
        if isinstance(features, (Mapping, str)) or not isinstance(features, Sequence):
            raise TypeError(
                f"FlamingoDataCollator takes a list of features (one dict per sample), got {type(features).__name__}."
            )
        if len(features) == 0:
            raise ValueError("FlamingoDataCollator got an empty list of features.")
        processed = []
        for index, feature in enumerate(features):
            if not isinstance(feature, Mapping):
                raise TypeError(
                    f"Feature {index} is a {type(feature).__name__}; each feature is a dict with `text` (and "
                    "`images`) or with `input_ids` (and `pixel_values`)."
                )
            if "input_ids" not in feature and "text" not in feature:
                raise ValueError(
                    f"Feature {index} needs a `text` string (a raw sample) or `input_ids` (a processed sample); its "
                    f"keys are {sorted(feature)}. With `Trainer`, raw features need `remove_unused_columns=False`."
                )
            processed.append("input_ids" in feature)
        if len(set(processed)) > 1:
            raise ValueError(
                f"Feature {processed.index(False)} is raw (`text`) but feature {processed.index(True)} is processed "
                "(`input_ids`); all features of a batch must be of one kind."
            )
        return processed[0]

    def _collate_raw(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Processes and pads raw features (`text` and optional `images`)."""
        texts, images = [], []
        for index, feature in enumerate(features):
            if not isinstance(feature.get("text"), str):
                raise ValueError(f"Feature {index} needs a `text` string, got {type(feature.get('text')).__name__}.")
            texts.append(feature["text"])
            images.append(self._sample_images(index, feature.get("images")))
        if self.max_length is not None:
            images = self._drop_truncated_images(texts, images)

        text_kwargs: dict[str, Any] = {"padding": "longest", "padding_side": "right"}
        if self.max_length is not None:
            text_kwargs.update(truncation=True, max_length=self.max_length)
        if self.pad_to_multiple_of is not None:
            text_kwargs["pad_to_multiple_of"] = self.pad_to_multiple_of
        encoded = self.processor(images=images, text=texts, return_tensors="pt", **text_kwargs)

        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        batch["labels"] = self._labels(batch["input_ids"], batch["attention_mask"])
        if "pixel_values" in encoded:
            batch["pixel_values"] = encoded["pixel_values"]
        return batch

    @staticmethod
    def _sample_images(index: int, sample_images: Any) -> list:
        """A raw feature's `images` as a list; raises if it is not a list (or stack) of images."""
        if sample_images is None:
            return []
        if isinstance(sample_images, (list, tuple)):
            return list(sample_images)
        if isinstance(sample_images, (np.ndarray, torch.Tensor)) and sample_images.ndim == 4:
            return list(sample_images)
        hint = " Open paths first, e.g. with `PIL.Image.open(path)`." if isinstance(sample_images, str) else ""
        raise ValueError(
            f"Feature {index} has `images` of type {type(sample_images).__name__}; expected a list of images (PIL "
            f"images, arrays or tensors) in the order of its `<image>` tokens, e.g. `[image]` for one image.{hint}"
        )

    def _labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The batch's labels, with this collator's masking options (see [`build_flamingo_labels`])."""
        return build_flamingo_labels(
            input_ids,
            attention_mask,
            media_token_id=self.processor.media_token_id,
            eoc_token_id=self.processor.eoc_token_id,
            mask_before_first_image=self.mask_before_first_image,
            mask_between_chunks=self.mask_between_chunks,
        )

    @staticmethod
    def _check_targets(labels: torch.Tensor, features: list[dict[str, Any]]) -> None:
        """Warns about samples without any target token; raises if no sample has one (the loss would be NaN)."""
        has_target = (labels != IGNORE_INDEX).any(dim=-1).tolist()
        missing = [index for index, present in enumerate(has_target) if not present]
        if not missing:
            return
        described = ", ".join(
            f"{index} ({features[index]['text'][:40]!r})"
            if isinstance(features[index].get("text"), str)
            else str(index)
            for index in missing
        )
        if len(missing) == len(has_target):
            raise ValueError(
                f"No sample of the batch has a target token (samples {described}): {_NO_TARGET_CAUSES}. The loss "
                "of this batch would be NaN. Drop such samples from the dataset, increase `max_length`, or set "
                "`mask_before_first_image=False` for text-only batches."
            )
        logger.warning(
            f"Sample(s) {described} of the batch have no target token and do not contribute to the loss: "
            f"{_NO_TARGET_CAUSES}."
        )

    def _collate_tokenized(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pads samples that the processor already tokenized (`input_ids` and optional per-sample `pixel_values`)."""
        media_token_id = self.processor.media_token_id
        sequences = [self._input_ids(index, feature["input_ids"]) for index, feature in enumerate(features)]
        pixel_values = [
            self._pixel_values(index, feature.get("pixel_values")) for index, feature in enumerate(features)
        ]
        check_image_token_counts(
            image_tokens_per_sample(sequences, media_token_id),
            [0 if pixels is None else pixels.shape[0] for pixels in pixel_values],
            self.processor.media_token,
            where="in `input_ids`",
            hint=" (`pixel_values` holds `(num_images, ...)` per sample)",
        )
        if self.max_length is not None:
            sequences = [ids[: self.max_length] for ids in sequences]
            kept = image_tokens_per_sample(sequences, media_token_id)
            pixel_values = [
                None if pixels is None else pixels[:count] for pixels, count in zip(pixel_values, kept, strict=True)
            ]

        padded = self.processor.tokenizer.pad(
            {"input_ids": [ids.tolist() for ids in sequences]},
            padding="longest",
            pad_to_multiple_of=self.pad_to_multiple_of,
            padding_side="right",
            return_tensors="pt",
        )
        batch = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
        batch["labels"] = self._labels(batch["input_ids"], batch["attention_mask"])
        stacked = stack_images_per_sample(pixel_values)
        if stacked is not None:
            batch["pixel_values"] = stacked
        return batch

    def _input_ids(self, index: int, input_ids: Any) -> torch.Tensor:
        """A processed feature's `input_ids` as a 1-D `LongTensor`; raises if they are not token ids of the tokenizer."""
        ids = torch.as_tensor(input_ids)
        if ids.ndim != 1:
            raise ValueError(
                f"Feature {index} has `input_ids` of shape {tuple(ids.shape)}; tokenized features hold one sample "
                "each, a 1-D sequence (e.g. `processor(images=[images], text=[text])['input_ids'][0]`)."
            )
        if ids.numel() == 0:
            raise ValueError(f"Feature {index} has empty `input_ids`; a processed sample needs at least one token.")
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise ValueError(
                f"Feature {index} has `input_ids` of dtype {ids.dtype}; token ids must be integers (as the processor "
                "returns them), not rounded or cast values."
            )
        vocab_size = len(self.processor.tokenizer)
        low, high = ids.min().item(), ids.max().item()
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"Feature {index} has `input_ids` in [{low}, {high}], outside the tokenizer's vocabulary [0, "
                f"{vocab_size - 1}]; tokenize with the same processor as the collator."
            )
        return ids.long()

    @staticmethod
    def _pixel_values(index: int, pixel_values: Any) -> torch.Tensor | None:
        """A processed feature's `pixel_values` `(num_images, C, H, W)`, `None` without images; raises if malformed."""
        if pixel_values is None:
            return None
        pixels = torch.as_tensor(pixel_values)
        if pixels.numel() == 0:
            return None
        if pixels.ndim != 4:
            hint = ""
            if pixels.ndim == 3:
                hint = " For a single image use `pixel_values[None]`."
            elif pixels.ndim == 5 and pixels.shape[0] == 1:
                hint = " Drop the batch axis: `processor(...)['pixel_values'][0]`."
            raise ValueError(
                f"Feature {index} has `pixel_values` of shape {tuple(pixels.shape)}; a processed sample holds "
                f"`(num_images, num_channels, height, width)`.{hint}"
            )
        if not pixels.is_floating_point():
            raise ValueError(
                f"Feature {index} has `pixel_values` of dtype {pixels.dtype}; processed features hold the processor's "
                "normalized float output. Pass raw images as `images` (with `text`) instead."
            )
        if not torch.isfinite(pixels).all():
            raise ValueError(f"Feature {index} has NaN or infinite values in `pixel_values`.")
        return pixels

    def _drop_truncated_images(self, texts: list[str], images: list[list]) -> list[list]:
        """Keeps, per sample, only the images whose `<image>` token survives truncation to `max_length`."""
        tokenizer = self.processor.tokenizer
        media_token_id = self.processor.media_token_id
        full = tokenizer(texts, padding=False, truncation=False)["input_ids"]
        truncated = tokenizer(texts, padding=False, truncation=True, max_length=self.max_length)["input_ids"]
        check_image_token_counts(
            image_tokens_per_sample(full, media_token_id),
            [len(sample_images) for sample_images in images],
            self.processor.media_token,
        )
        kept_images = []
        for kept, sample_images in zip(image_tokens_per_sample(truncated, media_token_id), images, strict=True):
            if tokenizer.truncation_side == "left":
                kept_images.append(sample_images[len(sample_images) - kept :])
            else:
                kept_images.append(sample_images[:kept])
        return kept_images


__all__ = ["FlamingoDataCollator", "build_flamingo_labels", "IGNORE_INDEX"]
