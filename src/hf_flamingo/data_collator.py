"""Data collator for training Flamingo on interleaved image-text samples (OpenFlamingo's label rules)."""

from dataclasses import dataclass
from typing import Any

import torch

from .image_tokens import check_image_token_counts, image_tokens_per_sample, stack_images_per_sample
from .processing_flamingo import FlamingoProcessor

IGNORE_INDEX = -100
"""Label value ignored by the loss (`torch.nn.CrossEntropyLoss`'s default `ignore_index`)."""


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
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"`max_length` must be a positive integer or None, got {self.max_length}.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(
                f"`pad_to_multiple_of` must be a positive integer or None, got {self.pad_to_multiple_of}."
            )
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
                with `"input_ids"` and optional `"pixel_values"`.

        Returns:
            `dict[str, torch.Tensor]`: `input_ids`, `attention_mask`, `labels` and (if any image) `pixel_values`.
        """
        if len(features) == 0:
            raise ValueError("FlamingoDataCollator got an empty list of features.")
        if all("input_ids" in feature for feature in features):
            return self._collate_tokenized(features)
        texts, images = [], []
        for index, feature in enumerate(features):
            if not isinstance(feature.get("text"), str):
                raise ValueError(f"Feature {index} needs a `text` string, got {type(feature.get('text')).__name__}.")
            texts.append(feature["text"])
            sample_images = feature.get("images")
            images.append([] if sample_images is None else list(sample_images))
        if self.max_length is not None:
            images = self._drop_truncated_images(texts, images)

        text_kwargs: dict[str, Any] = {"padding": "longest", "padding_side": "right"}
        if self.max_length is not None:
            text_kwargs.update(truncation=True, max_length=self.max_length)
        if self.pad_to_multiple_of is not None:
            text_kwargs["pad_to_multiple_of"] = self.pad_to_multiple_of
        encoded = self.processor(images=images, text=texts, return_tensors="pt", **text_kwargs)

        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        batch["labels"] = build_flamingo_labels(
            batch["input_ids"],
            batch["attention_mask"],
            media_token_id=self.processor.media_token_id,
            eoc_token_id=self.processor.eoc_token_id,
            mask_before_first_image=self.mask_before_first_image,
            mask_between_chunks=self.mask_between_chunks,
        )
        if "pixel_values" in encoded:
            batch["pixel_values"] = encoded["pixel_values"]
        return batch

    def _collate_tokenized(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pads samples that the processor already tokenized (`input_ids` and optional per-sample `pixel_values`)."""
        media_token_id = self.processor.media_token_id
        sequences, pixel_values = [], []
        for index, feature in enumerate(features):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            if ids.ndim != 1:
                raise ValueError(
                    f"Feature {index} has `input_ids` of shape {tuple(ids.shape)}; tokenized features hold one sample "
                    "each, a 1-D sequence (e.g. `processor(images=[images], text=[text])['input_ids'][0]`)."
                )
            sequences.append(ids)
            sample_pixels = feature.get("pixel_values")
            pixel_values.append(None if sample_pixels is None else torch.as_tensor(sample_pixels))
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
        batch["labels"] = build_flamingo_labels(
            batch["input_ids"],
            batch["attention_mask"],
            media_token_id=media_token_id,
            eoc_token_id=self.processor.eoc_token_id,
            mask_before_first_image=self.mask_before_first_image,
            mask_between_chunks=self.mask_between_chunks,
        )
        stacked = stack_images_per_sample(pixel_values)
        if stacked is not None:
            batch["pixel_values"] = stacked
        return batch

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
