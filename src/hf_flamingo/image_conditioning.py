"""Which image each token attends to, and what each gated cross-attention block receives for one forward pass.

The `<image>` contract (OpenFlamingo's rule): images are given in the order of their `<image>` tokens, and a token
attends to the image of the most recent `<image>` token up to and including it (with
`only_attend_immediate_media=False`, to all images up to that one). `token_image_index` holds, for every token, that
image's 1-based index (0: no image yet).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache

from .image_tokens import count_image_tokens
from .language_model_hooks import CrossAttentionConditioning


def resolve_token_image_index(
    input_ids: torch.LongTensor,
    media_token_id: int,
    num_images: int,
    token_image_index: torch.LongTensor | None = None,
    cache: Cache | None = None,
) -> torch.LongTensor:
    """The image index of every token of `input_ids`, given (`token_image_index`, checked) or counted from the
    `<image>` tokens, checked against the `num_images` images given per sample.

    Raises:
        TypeError: if `token_image_index` is not an integer tensor.
        ValueError: if `token_image_index` has the wrong shape or range; if a row has more `<image>` tokens than
            images, images but no `<image>` token, or `<image>` tokens but no images; if tokens continue a non-empty
            cache with images and no `token_image_index` (the count would restart at 0).
    """
    if token_image_index is not None:
        if not isinstance(token_image_index, torch.Tensor) or token_image_index.is_floating_point():
            kind = getattr(token_image_index, "dtype", type(token_image_index).__name__)
            raise TypeError(f"`token_image_index` must be an integer tensor (torch.long), got {kind}.")
        if token_image_index.shape != input_ids.shape:
            raise ValueError(
                f"`token_image_index` must have the shape of `input_ids`, {tuple(input_ids.shape)}; got "
                f"{tuple(token_image_index.shape)}."
            )
        if not torch.compiler.is_compiling() and token_image_index.numel():
            low, high = int(token_image_index.min()), int(token_image_index.max())
            if low < 0 or high > num_images:
                raise ValueError(
                    f"`token_image_index` holds values from {low} to {high}, but must lie between 0 and the "
                    f"number of images given per sample, {num_images}."
                )
        return token_image_index

    if num_images and cache is not None and int(cache.get_seq_length()) > 0:
        raise ValueError(
            "Continuing from a non-empty cache with images needs `token_image_index`, the image each new token "
            "attends to (e.g. `last_image_index[:, None].expand_as(input_ids)` after prompts holding "
            "`last_image_index` images); `generate` passes it."
        )
    token_image_index = count_image_tokens(input_ids, media_token_id)
    if not torch.compiler.is_compiling():
        counts = token_image_index[:, -1] if token_image_index.numel() else token_image_index.new_zeros(1)
        _check_image_counts(counts, num_images, media_token_id)
    return token_image_index


def _check_image_counts(counts: torch.LongTensor, num_images: int, media_token_id: int) -> None:
    """`counts`: `<image>` tokens per row."""
    most = int(counts.max())
    if num_images and most > num_images:
        sample = int(counts.argmax())
        raise ValueError(
            f"Sample {sample} has {most} `<image>` tokens but only {num_images} image(s) per sample were given; every "
            "`<image>` token needs an image."
        )
    if num_images and most == 0:
        raise ValueError(
            f"Images were given but `input_ids` contains no `<image>` token (id {media_token_id}); put one `<image>` "
            "token where each image appears in the text. If the text has `<image>` tokens, the processor and the "
            "model disagree on its id: use the processor the model was built with (`config.media_token_id` must be "
            "the processor's `media_token_id`)."
        )
    if not num_images and most > 0:
        raise ValueError(
            f"`input_ids` contains `<image>` tokens (id {media_token_id}) but no `pixel_values` or "
            "`image_hidden_states` were given."
        )


def check_cross_attention_states(
    cross_attention_states: torch.FloatTensor, batch_size: int, num_blocks: int, num_latents: int, width: int
) -> None:
    """Checks precomputed keys/values (`(batch, num_blocks, num_images * num_latents, width)`) against the model
    and the batch."""
    shape = tuple(cross_attention_states.shape)
    if cross_attention_states.ndim != 4:
        raise ValueError(
            "`cross_attention_states` must have shape (batch_size, num_blocks, num_images * num_latents, "
            f"{width}), got {shape}."
        )
    if shape[1] != num_blocks:
        raise ValueError(
            f"`cross_attention_states` holds keys/values for {shape[1]} blocks, the model has {num_blocks}."
        )
    if shape[2] % num_latents or shape[3] != width:
        raise ValueError(
            f"`cross_attention_states` must hold a multiple of {num_latents} keys of width {width} per block, "
            f"got shape {shape}."
        )
    if shape[0] != batch_size:
        raise ValueError(f"Got `cross_attention_states` for {shape[0]} samples but `input_ids` has {batch_size} rows.")


def build_cross_attention_mask(
    token_image_index: torch.LongTensor, num_images: int, num_latents: int, only_immediate: bool, dtype: torch.dtype
) -> torch.Tensor:
    """Builds the additive cross-attention mask from each token's image index.

    Args:
        token_image_index (`torch.LongTensor` of shape `(batch, seq_len)`):
            1-based index of the image every token attends to (0: none).
        num_images (`int`): Number of images per sample (after padding).
        num_latents (`int`): Latents per image.
        only_immediate (`bool`): Attend only to that image, or to all images up to it.
        dtype (`torch.dtype`): Dtype of the mask.

    Returns:
        `torch.Tensor` of shape `(batch, 1, seq_len, num_images * num_latents)`: 0 where a token may attend, the
        dtype's minimum elsewhere. Tokens without an image may attend anywhere (keeping the softmax finite); their
        attention output is zeroed by the block.
    """
    key_image = torch.arange(1, num_images + 1, device=token_image_index.device).repeat_interleave(num_latents)
    query_image = token_image_index.unsqueeze(-1)
    allowed = query_image == key_image if only_immediate else query_image >= key_image
    allowed = allowed | (query_image == 0)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=token_image_index.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def block_conditioning(
    blocks: nn.ModuleDict,
    token_image_index: torch.LongTensor,
    image_hidden_states: torch.FloatTensor | None,
    cross_attention_states: torch.FloatTensor | None,
    num_latents: int,
    only_immediate: bool,
) -> dict[int, CrossAttentionConditioning]:
    """What each gated block needs for one forward, keyed by the index of the decoder layer it runs before: the
    image latents (or the block's precomputed keys/values), the mask and which tokens have an image."""
    if image_hidden_states is None and cross_attention_states is None:
        return {int(index): CrossAttentionConditioning(block) for index, block in blocks.items()}
    media, key_values = None, [None] * len(blocks)
    if cross_attention_states is not None:
        key_values = cross_attention_states.unbind(dim=1)
        num_keys, dtype = cross_attention_states.shape[2], cross_attention_states.dtype
    else:
        batch, num_images, _, dim = image_hidden_states.shape
        media = image_hidden_states.reshape(batch, num_images * num_latents, dim)
        num_keys, dtype = media.shape[1], media.dtype
    num_images = num_keys // num_latents
    # With one image, every token that has an image attends to all keys: no mask needed.
    attention_bias = (
        build_cross_attention_mask(token_image_index, num_images, num_latents, only_immediate, dtype)
        if num_images > 1
        else None
    )
    media_rows = (token_image_index > 0).unsqueeze(-1)
    return {
        int(index): CrossAttentionConditioning(block, media, attention_bias, media_rows, key_values[position])
        for position, (index, block) in enumerate(blocks.items())
    }
