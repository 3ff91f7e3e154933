"""Checks of what a user hands to a Flamingo (`forward`, `generate`, `get_image_features`, construction), run before
any expensive work; every error names the argument, the value received and what is expected.

Hot path: shape and dtype checks are free; each value check is one reduction over the inputs with one
synchronisation, and is skipped while `torch.compile` traces. Token values are checked in forwards that start their
sequences (no `cache`, no `token_image_index`) and once per `generate` call on its prompt, never at decoding steps;
images whenever they are given (never at decoding steps either: `generate` encodes them once per call).

Decisions on ambiguous inputs:
    - integer `pixel_values` are refused (`TypeError`), and so are float ones beyond +-`MAX_NORMALISED_PIXEL_VALUE`
      (raw 0-255 values) and non-finite ones (`ValueError`, naming the sample and image);
    - an image beyond a sample's number of `<image>` tokens is padding and ignored; a `UserWarning` says so when it is
      not all zeros (the processor pads with zeros, so it is probably an image whose `<image>` token is missing);
    - `config.media_token_id` may lie beyond the language model's embeddings when the config is built (the embeddings
      are resized to the tokenizer afterwards); token ids beyond them are refused at `forward`/`generate`.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import Any

import torch
from torch import nn

# Largest absolute value normalised pixels may hold. Images rescaled to [0, 1] and normalised with CLIP's, SigLIP's or
# ImageNet's statistics stay within about 2.7; raw 0-255 values (with or without normalisation) go far beyond.
MAX_NORMALISED_PIXEL_VALUE = 30.0
_IGNORE_INDEX = -100


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------------------------------------
# The model


def check_model_config(config: Any) -> None:
    """Checks, when a model is built, what its config must hold for the model to use images at all.

    Raises:
        ValueError: if `media_token_id` is unset, or if no decoder layer gets a gated cross-attention block.
    """
    if config.media_token_id is None:
        raise ValueError(
            "`config.media_token_id` is not set: it must be the id of the `<image>` token in your tokenizer "
            "(e.g. `FlamingoProcessor(...).media_token_id`)."
        )
    if not config.cross_attention_layer_indices():
        depth = config.num_text_layers
        raise ValueError(
            f"`cross_attn_every_n_layers={config.cross_attn_every_n_layers}` is larger than the language model's "
            f"{depth} decoder layers, so no gated cross-attention block would be built and images would have no "
            f"effect; use a value between 1 and {depth}."
        )


def check_materialised(model: nn.Module) -> None:
    """Refuses to run a model whose weights are still on the `meta` device (it would only compute shapes).

    Models dispatched by `from_pretrained(..., device_map=...)` (whose offloaded weights are on `meta` between calls)
    are accepted.
    """
    if getattr(model, "hf_device_map", None) is not None:
        return
    embeddings = model.get_input_embeddings().weight
    if embeddings.is_meta or model.perceiver.latents.is_meta:
        raise RuntimeError(
            "The model's parameters are on the `meta` device (it was built under `torch.device('meta')` or "
            "`init_empty_weights`), so it has no weights to compute with. Load it with `from_pretrained(...)`, or "
            "call `model.to_empty(device=...)` and then load its weights (`load_state_dict`)."
        )


def _vocab_size(module: nn.Module | None) -> int | None:
    if module is None:
        return None
    size = getattr(module, "num_embeddings", None) or getattr(module, "out_features", None)
    if size is None and isinstance(getattr(module, "weight", None), torch.Tensor):
        size = module.weight.shape[0]
    return size


# ---------------------------------------------------------------------------------------------------------------------
# Text inputs


def check_forward_inputs(
    model: nn.Module,
    input_ids: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None,
    cache: Any | None,
    token_image_index: torch.LongTensor | None,
    kwargs: dict[str, Any],
    labels: torch.LongTensor | None = None,
) -> None:
    """Checks `forward`'s text inputs: presence, shapes and dtypes always; token values only in forwards that start
    their sequences (no `cache`, no `token_image_index`: training, scoring), so never in `generate`'s decoding steps
    (`generate` checks its prompt once, [`check_prompt`]).

    Removes a `None` `inputs_embeds` from `kwargs`.
    """
    if input_ids is None:
        raise ValueError(
            "Flamingo needs `input_ids`: the `<image>` tokens in them decide which image each token attends to."
        )
    if kwargs.pop("inputs_embeds", None) is not None:
        raise ValueError("Pass `input_ids` only, not `inputs_embeds`.")
    check_materialised(model)
    _check_token_tensor("input_ids", input_ids)
    _check_same_shape("labels", labels, input_ids)
    _check_attention_mask(attention_mask, input_ids, cache is not None)
    _check_position_ids(position_ids, input_ids)
    if cache is None and token_image_index is None:
        check_token_values(model, input_ids, attention_mask, labels)


def check_prompt(model: nn.Module, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> None:
    """`generate`'s checks of its prompt, once per call (its decoding steps are not checked)."""
    check_materialised(model)
    _check_token_tensor("input_ids", input_ids)
    _check_attention_mask(attention_mask, input_ids, False)
    check_token_values(model, input_ids, attention_mask)


def _check_token_tensor(name: str, tensor: Any) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of token ids, got {type(tensor).__name__}.")
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integer token ids (torch.long), got {tensor.dtype}.")
    if tensor.ndim != 2:
        hint = f" Add the batch dimension: `{name}[None]`." if tensor.ndim == 1 else ""
        raise ValueError(
            f"`{name}` must have shape (batch_size, sequence_length), got a {tensor.ndim}-D tensor of shape "
            f"{tuple(tensor.shape)}.{hint}"
        )


def _check_same_shape(name: str, tensor: torch.Tensor | None, input_ids: torch.LongTensor) -> None:
    if tensor is not None and tuple(tensor.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"`{name}` must have the shape of `input_ids`, {tuple(input_ids.shape)}; got {tuple(tensor.shape)}."
        )


def _check_attention_mask(attention_mask: torch.Tensor | None, input_ids: torch.LongTensor, with_cache: bool) -> None:
    """A 2-D padding mask covers `input_ids` (and, with a cache, the cached tokens before them). Other ranks are the
    language model's own mask formats and are left to it."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2:
        return
    batch, length = input_ids.shape
    if attention_mask.shape[0] == batch and (
        attention_mask.shape[1] == length or (with_cache and attention_mask.shape[1] > length)
    ):
        return
    covered = "the cached tokens and `input_ids`" if with_cache else "`input_ids`"
    raise ValueError(
        f"`attention_mask` has shape {tuple(attention_mask.shape)} but must cover {covered}, whose shape is "
        f"{tuple(input_ids.shape)}: one row per sample and one column per token."
    )


def _check_position_ids(position_ids: torch.LongTensor | None, input_ids: torch.LongTensor) -> None:
    if position_ids is None:
        return
    batch, length = input_ids.shape
    shape = tuple(position_ids.shape)
    if position_ids.ndim != 2 or shape[-1] != length or shape[0] not in (1, batch):
        raise ValueError(
            f"`position_ids` must have shape ({batch}, {length}) or (1, {length}) like `input_ids`, got {shape}."
        )


def check_token_values(
    model: nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.LongTensor | None = None,
) -> None:
    """Token ids within the vocabulary, labels within the vocabulary or -100, and no `<image>` token at a padded
    position; one small reduction and one synchronisation."""
    if _is_compiling() or input_ids.numel() == 0:
        return
    media_token_id = model.config.media_token_id
    zero = input_ids.new_zeros(())
    image_at_padding = zero
    if isinstance(attention_mask, torch.Tensor) and attention_mask.shape == input_ids.shape:
        image_at_padding = ((input_ids == media_token_id) & (attention_mask == 0)).sum()
    bad_labels = zero
    label_vocab = _vocab_size(model.get_output_embeddings()) or _vocab_size(model.get_input_embeddings())
    if labels is not None and labels.numel() and label_vocab is not None:
        bad_labels = ((labels >= label_vocab) | ((labels < 0) & (labels != _IGNORE_INDEX))).sum()
    low, high, padded_images, wrong_labels = torch.stack(
        [input_ids.min(), input_ids.max(), image_at_padding.to(zero), bad_labels.to(zero)]
    ).tolist()
    _raise_for_token_ids(model, low, high)
    if padded_images:
        raise ValueError(
            f"`input_ids` holds {padded_images} `<image>` token(s) (id {media_token_id}, `config.media_token_id`) at "
            "positions where `attention_mask` is 0: the processor and the model disagree on token ids. The model's "
            f"`<image>` id is {media_token_id} and its language model's pad token id is {_pad_token_id(model)} "
            "(`text_config.pad_token_id`), but these inputs were padded with id "
            f"{media_token_id}. Use the processor the model was built with (its `media_token_id` must equal "
            "`config.media_token_id`)."
        )
    if wrong_labels:
        raise ValueError(
            f"`labels` holds {wrong_labels} value(s) outside the vocabulary: every label must be a token id in "
            f"[0, {label_vocab}) or -100 (ignored)."
        )


def _pad_token_id(model: nn.Module) -> Any:
    return getattr(model.config.text_config, "pad_token_id", None)


def _raise_for_token_ids(model: nn.Module, low: int, high: int) -> None:
    vocab = _vocab_size(model.get_input_embeddings())
    if vocab is None or (low >= 0 and high < vocab):
        return
    hint = ""
    if model.config.media_token_id >= vocab:
        hint = (
            f" The `<image>` id (`config.media_token_id`={model.config.media_token_id}) is outside it too: resize "
            "the embeddings to the tokenizer, `model.resize_token_embeddings(len(processor.tokenizer))`."
        )
    elif low < 0:
        hint = " Negative ids are not tokens (-100 is a `labels` value, never an input id)."
    raise ValueError(
        f"`input_ids` holds ids from {low} to {high}, but the language model's embeddings have {vocab} rows: every "
        f"id must lie in [0, {vocab}). Were the ids made by another tokenizer?{hint}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Images


def check_pixel_values(
    model: nn.Module, pixel_values: Any, input_ids: torch.LongTensor | None = None
) -> torch.FloatTensor:
    """Checks images before the vision tower sees them and returns them 6-D, `(batch, num_images, num_frames,
    channels, height, width)`.

    Checked: type, floating dtype, rank, channels and size against `config.vision_config`; one reduction per image
    for non-finite values and raw 0-255 values (`|x| > MAX_NORMALISED_PIXEL_VALUE`). With `input_ids`: the batch size,
    and that a sample's images beyond its number of `<image>` tokens are all-zero padding (a `UserWarning` says a
    non-zero one is ignored: padding with other images is legitimate, if unusual).
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"`pixel_values` must be a torch.Tensor, got {type(pixel_values).__name__}.")
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"`pixel_values` must be floating point (normalised by the image processor); got {pixel_values.dtype}. "
            "Pass the images through the processor (`FlamingoProcessor` / its image processor), which rescales "
            "and normalises them."
        )
    pixel_values = _as_six_dims(pixel_values)
    _check_image_shape(model, pixel_values)
    if input_ids is not None and pixel_values.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"`pixel_values` holds images for {pixel_values.shape[0]} samples but `input_ids` has "
            f"{input_ids.shape[0]} rows; give one row of images per sample (zero-padded to the same count)."
        )
    if not _is_compiling() and pixel_values.numel():
        _check_pixel_magnitudes(pixel_values, input_ids, model.config.media_token_id)
    return pixel_values


def _as_six_dims(pixel_values: torch.Tensor) -> torch.Tensor:
    if pixel_values.ndim == 5:
        return pixel_values.unsqueeze(2)
    if pixel_values.ndim == 6:
        return pixel_values
    hint = (
        " For one image per sample, add the images dimension: `pixel_values[:, None]`."
        if pixel_values.ndim == 4
        else ""
    )
    raise ValueError(
        "`pixel_values` must have shape (batch, num_images, channels, height, width) or (batch, num_images, "
        f"num_frames, channels, height, width); got a {pixel_values.ndim}-D tensor of shape "
        f"{tuple(pixel_values.shape)}.{hint}"
    )


def _check_image_shape(model: nn.Module, pixel_values: torch.Tensor) -> None:
    vision_config = model.config.vision_config
    channels, height, width = pixel_values.shape[3:]
    expected_channels = getattr(vision_config, "num_channels", None)
    if isinstance(expected_channels, int) and channels != expected_channels:
        raise ValueError(
            f"`pixel_values` has {channels} channels but the vision tower expects {expected_channels} "
            f"(`vision_config.num_channels`); images are (channels, height, width), e.g. convert grayscale or RGBA "
            "images to RGB before the processor."
        )
    size = getattr(vision_config, "image_size", None)
    if size is None or not _needs_exact_size(type(model.vision_model)):
        return
    expected = (size, size) if isinstance(size, int) else tuple(size)
    if (height, width) != expected:
        raise ValueError(
            f"`pixel_values` holds {height}x{width} images but the vision tower takes {expected[0]}x{expected[1]} "
            "(`vision_config.image_size`); resize them with the model's image processor."
        )


@functools.cache
def _needs_exact_size(vision_class: type) -> bool:
    """Towers whose `forward` takes `interpolate_pos_encoding` (CLIP, SigLIP, ...) only take their own image size
    unless asked to interpolate, which Flamingo never does."""
    return "interpolate_pos_encoding" in inspect.signature(vision_class.forward).parameters


def _check_pixel_magnitudes(
    pixel_values: torch.Tensor, input_ids: torch.LongTensor | None, media_token_id: int
) -> None:
    """One reduction: each image's largest absolute value, which is NaN or inf for non-finite images, far above
    `MAX_NORMALISED_PIXEL_VALUE` for raw pixels, and exactly 0 for padding images; one synchronisation."""
    low, high = torch.aminmax(pixel_values.flatten(2), dim=-1)
    peak = torch.maximum(-low, high)  # (batch, num_images); NaN propagates
    bad = ~(peak <= MAX_NORMALISED_PIXEL_VALUE)
    extra = torch.zeros_like(bad)
    own_images = torch.zeros(peak.shape[0], 1, dtype=torch.long, device=peak.device)
    if input_ids is not None:
        own_images = (input_ids == media_token_id).sum(dim=-1, keepdim=True).to(peak.device)
        slots = torch.arange(peak.shape[1], device=peak.device)
        extra = (peak != 0) & (slots >= own_images)
    any_bad, any_extra, most_tokens = torch.stack([bad.any(), extra.any(), own_images.max() > 0]).tolist()
    if any_bad:
        sample, image = (int(i) for i in bad.nonzero()[0])
        _raise_for_pixel_peak(sample, image, float(peak[sample, image]))
    # Without any `<image>` token the image counts' own error follows (`resolve_token_image_index`).
    if any_extra and most_tokens:
        sample, image = (int(i) for i in extra.nonzero()[0])
        warnings.warn(
            f"Sample {sample} has {int(own_images[sample])} `<image>` token(s) but image {image} (0-based) of its "
            "`pixel_values` is not all zeros: no token attends to it, so it is ignored. Images beyond a sample's "
            "`<image>` tokens are padding and should be all zeros (as `FlamingoProcessor` pads); if this image "
            f"belongs to the text, add its `<image>` token (id {media_token_id}) where it appears.",
            UserWarning,
            stacklevel=4,
        )


def _raise_for_pixel_peak(sample: int, image: int, peak: float) -> None:
    where = f"`pixel_values` of sample {sample}, image {image} (0-based)"
    if not math.isfinite(peak):
        raise ValueError(
            f"{where} holds NaN or infinite values; they would turn the whole sample's output into NaN. Check how "
            "the image was loaded and preprocessed."
        )
    raise ValueError(
        f"{where} reaches {peak:g}, but normalised images stay within +-{MAX_NORMALISED_PIXEL_VALUE:g}: these look "
        "like raw 0-255 pixel values. Pass the images through the processor (`FlamingoProcessor` / its image "
        "processor) to rescale and normalise them."
    )


def check_image_hidden_states(image_hidden_states: Any, batch_size: int, config: Any) -> None:
    """Checks given Perceiver Resampler outputs against the batch and the model (and, outside `torch.compile`, that
    they are finite)."""
    if not isinstance(image_hidden_states, torch.Tensor):
        raise TypeError(f"`image_hidden_states` must be a torch.Tensor, got {type(image_hidden_states).__name__}.")
    expected = (config.perceiver_num_latents, config.vision_hidden_size)
    shape = tuple(image_hidden_states.shape)
    if image_hidden_states.ndim != 4:
        raise ValueError(
            "`image_hidden_states` must have shape (batch_size, num_images, num_latents, vision_hidden_size), got "
            f"{shape}."
        )
    if shape[0] != batch_size:
        raise ValueError(f"Got images for {shape[0]} samples but `input_ids` has {batch_size} rows.")
    if shape[2:] != expected:
        raise ValueError(
            f"`image_hidden_states` has {shape[2]} latents of width {shape[3]} per image, but this model's Perceiver "
            f"Resampler makes {expected[0]} of width {expected[1]} (`perceiver_num_latents`, "
            "`vision_config.hidden_size`): were they computed by another model?"
        )
    if not _is_compiling() and not bool(torch.isfinite(image_hidden_states).all()):
        sample, image = (int(i) for i in (~torch.isfinite(image_hidden_states)).nonzero()[0, :2])
        raise ValueError(
            f"`image_hidden_states` of sample {sample}, image {image} (0-based) holds NaN or infinite values."
        )
