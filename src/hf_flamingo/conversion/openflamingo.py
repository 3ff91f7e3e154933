"""Conversion of OpenFlamingo v2 `checkpoint.pt` files into `FlamingoForConditionalGeneration` Hub directories.

An OpenFlamingo checkpoint holds the trainable parts of a model whose language model was wrapped in place:

- `perceiver.*` (the Perceiver Resampler; same names here);
- `lang_encoder.<layers>.<i>.gated_cross_attn_layer.*` (the block before decoder layer `i`; here
  `gated_cross_attn_layers.<i>.*`);
- language-model weights under `lang_encoder.` (always the input embeddings; the whole LM for FSDP-trained
  releases, whose decoder-layer weights carry an extra `.decoder_layer` level);
- possibly the aliases `lang_encoder.old_decoder_blocks.*` / `lang_encoder.gated_cross_attn_layers.*` of the above, and
  `vision_encoder.*` (an open_clip visual tower) in full dumps.

Every key must be accounted for; the frozen backbone weights not in the checkpoint come from the backbones.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from ..configuration_flamingo import FlamingoConfig
from ..modeling_flamingo import FlamingoForConditionalGeneration
from ._checks import format_keys
from .releases import OpenFlamingoRelease

logger = logging.getLogger(__name__)

_CROSS_ATTENTION = "gated_cross_attn_layer"
_DECODER_LAYER = "decoder_layer"
# Alias prefixes OpenFlamingo also saves the two halves of a wrapped decoder layer under, and the half each names.
_LAYER_ALIASES = (
    ("lang_encoder.gated_cross_attn_layers.", _CROSS_ATTENTION),
    ("lang_encoder.old_decoder_blocks.", _DECODER_LAYER),
)
# Buffers that older transformers versions saved with the language model and current ones recompute (GPT-NeoX's
# causal mask and masking constant, rotary inverse frequencies). Dropped only when the target model has no such key.
_OBSOLETE_BUFFER_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq", ".attn.bias")


class CheckpointError(ValueError):
    """An OpenFlamingo checkpoint that cannot be read or does not fit the model it is converted into."""


@dataclass
class OpenFlamingoWeights:
    """An OpenFlamingo state dict split by destination.

    Attributes:
        bridge: Perceiver and gated cross-attention weights under their `FlamingoForConditionalGeneration` names.
        language_model: Language-model weights under the language model's own names (as OpenFlamingo saw them).
        vision_encoder: open_clip visual-tower weights (without the `vision_encoder.` prefix), if the checkpoint has any.
        cross_attention_layers: Sorted indices of the decoder layers that have a gated cross-attention block.
        dropped_aliases: Alias keys that duplicated a canonical key.
    """

    bridge: dict[str, torch.Tensor] = field(default_factory=dict)
    language_model: dict[str, torch.Tensor] = field(default_factory=dict)
    vision_encoder: dict[str, torch.Tensor] = field(default_factory=dict)
    cross_attention_layers: list[int] = field(default_factory=list)
    dropped_aliases: list[str] = field(default_factory=list)


@dataclass
class ConversionReport:
    """What a conversion did with every key.

    Attributes:
        checkpoint_keys: Number of keys in the checkpoint.
        loaded_keys: Model keys whose values came from the checkpoint.
        backbone_keys: Model keys left to the frozen backbones (vision tower and language-model weights the checkpoint
            does not hold).
        dropped_aliases: Checkpoint keys that duplicated another key.
        dropped_buffers: Obsolete buffers of older transformers versions that the model recomputes.
        renamed_keys: Language-model keys renamed to the installed transformers' names (old -> new).
        cross_attn_every_n_layers: The interval the checkpoint's cross-attention layers follow.
    """

    checkpoint_keys: int
    loaded_keys: list[str]
    backbone_keys: list[str]
    dropped_aliases: list[str]
    dropped_buffers: list[str]
    renamed_keys: dict[str, str]
    cross_attn_every_n_layers: int


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def _unpickler_detail(error: pickle.UnpicklingError) -> str:
    """The reason in torch's weights-only refusal, on one line, without its advice to retry with
    `weights_only=False` (which would run the file's code)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    detail = text.split(marker, 1)[1] if marker in text else text
    detail = detail.split("Check the documentation of torch.load", 1)[0]
    return " ".join(detail.split()) or type(error).__name__


def load_openflamingo_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads an OpenFlamingo checkpoint safely (`torch.load(weights_only=True)`, or safetensors).

    Accepts the released flat state dicts, training checkpoints wrapped as `{"model_state_dict": ...}` and keys with a
    DDP `module.` prefix.

    Args:
        path (`str` or `os.PathLike`): A `checkpoint.pt` written by `torch.save`, or a `.safetensors` file.

    Returns:
        `dict[str, torch.Tensor]`: The state dict, unwrapped and without `module.` prefixes.

    Raises:
        FileNotFoundError: if the file does not exist.
        CheckpointError: if it cannot be read, holds objects other than tensors and plain containers, or is not a
            state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OpenFlamingo checkpoint {str(path)!r} does not exist or is not a file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return normalize_openflamingo_state_dict(load_file(path), source=str(path))
        except Exception as error:  # safetensors raises its own error types for damaged headers
            raise CheckpointError(f"Could not read the safetensors file {str(path)!r}: {error}") from error
    try:
        with warnings.catch_warnings():
            # torch warns about plain-pickle protocols before refusing them; the refusal below says all there is.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{str(path)!r} contains objects other than tensors and plain containers, so it was not unpickled "
            f"(only `torch.load(weights_only=True)` is used, for safety). An OpenFlamingo checkpoint is a dict of "
            f"tensors. Details: {_unpickler_detail(error)}"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"Could not read {str(path)!r} as a torch.save file; it may be truncated or not a checkpoint "
            f"({type(error).__name__}: {error})."
        ) from error
    return normalize_openflamingo_state_dict(loaded, source=str(path))


def normalize_openflamingo_state_dict(loaded: Any, source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """Unwraps `{"model_state_dict": ...}`, strips a `module.` prefix and checks that every value is a tensor."""
    if isinstance(loaded, Mapping) and "model_state_dict" in loaded:
        loaded = loaded["model_state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{source} holds a {type(loaded).__name__}, not a state dict (a dict of tensors).")
    if not loaded:
        raise CheckpointError(f"{source} is an empty state dict.")
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{source} is not a state dict of tensors: key {key!r} holds a {type(value).__name__}."
            )
        state_dict[key] = value
    if all(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    return state_dict


# ---------------------------------------------------------------------------------------------------------------------
# Mapping


def infer_cross_attn_every_n_layers(layer_indices: list[int], num_layers: int) -> int:
    """The `n` for which blocks sit exactly before the layers `i` with `(i + 1) % n == 0`.

    Raises:
        CheckpointError: if the indices follow no such interval.
    """
    present = sorted(set(layer_indices))
    for n in range(1, num_layers + 1):
        if present == [i for i in range(num_layers) if (i + 1) % n == 0]:
            return n
    raise CheckpointError(
        f"The checkpoint has gated cross-attention blocks before decoder layers {present}, which is not every n-th "
        f"layer of a {num_layers}-layer language model for any n (OpenFlamingo places them where (i + 1) % n == 0)."
    )


class _DecoderLayerKeys:
    """Routes the keys of OpenFlamingo's wrapped decoder layers, `lang_encoder.<layers>.<i>.<half>.*`.

    Each wrapped layer has two halves: `gated_cross_attn_layer` (to `gated_cross_attn_layers.<i>.*`) and
    `decoder_layer` (to the language model's `<layers>.<i>.*`). Canonical keys and alias keys saved without their
    canonical key both go through [`add`], so that decision is made in one place.
    """

    def __init__(self, decoder_layers_path: str, num_layers: int, weights: OpenFlamingoWeights) -> None:
        self.decoder_layers_path = decoder_layers_path
        self.num_layers = num_layers
        self.weights = weights
        self.cross_attention_layers: set[int] = set()
        self.prefix = f"lang_encoder.{decoder_layers_path}."
        self._pattern = re.compile(rf"^{re.escape(self.prefix)}(\d+)\.(.+)$")

    def canonical(self, key: str) -> str | None:
        """The canonical key of an alias key (see `_LAYER_ALIASES`); `None` if `key` is no alias."""
        for alias_prefix, half in _LAYER_ALIASES:
            if key.startswith(alias_prefix):
                index, _, rest = key.removeprefix(alias_prefix).partition(".")
                return f"{self.prefix}{index}.{half}.{rest}"
        return None

    def split(self, key: str, reported_key: str) -> tuple[int, str] | None:
        """`(i, rest)` of a canonical key `<prefix><i>.<rest>`; `None` for other keys.

        Raises:
            CheckpointError: if `i` is not a layer of the language model (naming `reported_key`).
        """
        match = self._pattern.match(key)
        if match is None:
            return None
        index = int(match.group(1))
        if index >= self.num_layers:
            raise CheckpointError(
                f"Checkpoint key {reported_key!r} refers to decoder layer {index}, but the language model has "
                f"{self.num_layers} layers: the checkpoint belongs to a different language model."
            )
        return index, match.group(2)

    def add(self, index: int, rest: str, value: torch.Tensor) -> bool:
        """Stores the weight `rest` of wrapped layer `index`; `False` if `rest` is in neither half."""
        half, dot, name = rest.partition(".")
        if dot and half == _CROSS_ATTENTION:
            self.cross_attention_layers.add(index)
            self.weights.bridge[f"gated_cross_attn_layers.{index}.{name}"] = value
        elif dot and half == _DECODER_LAYER:
            self.weights.language_model[f"{self.decoder_layers_path}.{index}.{name}"] = value
        else:
            return False
        return True


def map_openflamingo_state_dict(
    state_dict: Mapping[str, torch.Tensor], decoder_layers_path: str, num_layers: int
) -> OpenFlamingoWeights:
    """Splits an OpenFlamingo state dict by destination, validating every key.

    Args:
        state_dict: The checkpoint (see [`load_openflamingo_checkpoint`]).
        decoder_layers_path (`str`): Where the target language model keeps its decoder layers (e.g.
            `"transformer.blocks"`); OpenFlamingo's keys use the same path under `lang_encoder.`.
        num_layers (`int`): Number of decoder layers of the target language model.

    Raises:
        CheckpointError: for keys that belong nowhere, layer indices out of range, alias keys whose shape differs
            from their canonical key, or a checkpoint written for a language model with differently placed layers.
    """
    weights = OpenFlamingoWeights()
    layers = _DecoderLayerKeys(decoder_layers_path, num_layers, weights)
    aliases: dict[str, str] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        if key.startswith("perceiver."):
            weights.bridge[key] = value
        elif key.startswith("vision_encoder."):
            weights.vision_encoder[key.removeprefix("vision_encoder.")] = value
        elif (canonical := layers.canonical(key)) is not None:
            aliases[key] = canonical
        elif (layer_weight := layers.split(key, key)) is not None:
            if not layers.add(*layer_weight, value):
                unexpected.append(key)
        elif key.startswith("lang_encoder."):
            weights.language_model[key.removeprefix("lang_encoder.")] = value
        else:
            unexpected.append(key)

    if unexpected:
        raise CheckpointError(
            f"{len(unexpected)} checkpoint keys belong to no part of an OpenFlamingo model whose language model keeps "
            f"its decoder layers at `{decoder_layers_path}`: {format_keys(unexpected, 5)}. Is the checkpoint from a "
            "different release or language model?"
        )
    _resolve_aliases(state_dict, aliases, layers)
    if not layers.cross_attention_layers:
        raise _no_cross_attention_error(state_dict, decoder_layers_path)
    weights.cross_attention_layers = sorted(layers.cross_attention_layers)
    return weights


def _resolve_aliases(
    state_dict: Mapping[str, torch.Tensor], aliases: Mapping[str, str], layers: _DecoderLayerKeys
) -> None:
    """Drops each alias key that duplicates its canonical key, and routes the others as their canonical key."""
    for alias, canonical in aliases.items():
        if canonical in state_dict:
            if state_dict[canonical].shape != state_dict[alias].shape:
                raise CheckpointError(
                    f"Alias key {alias!r} has shape {tuple(state_dict[alias].shape)} but {canonical!r} has "
                    f"{tuple(state_dict[canonical].shape)}."
                )
            if not state_dict[alias].is_meta and not torch.equal(state_dict[alias], state_dict[canonical]):
                raise CheckpointError(f"Alias key {alias!r} holds different values than {canonical!r}.")
            layers.weights.dropped_aliases.append(alias)
            continue
        layer_weight = layers.split(canonical, alias)
        if layer_weight is None:
            raise CheckpointError(f"Alias key {alias!r} has no layer index.")
        # `canonical` names one of the two halves (see `_DecoderLayerKeys.canonical`), so this always stores it.
        layers.add(*layer_weight, state_dict[alias])


def _no_cross_attention_error(state_dict: Mapping[str, torch.Tensor], decoder_layers_path: str) -> CheckpointError:
    """The error for a checkpoint without cross-attention weights where the model expects them."""
    pattern = re.compile(rf"^lang_encoder\.(.+?)\.\d+\.{re.escape(_CROSS_ATTENTION)}\.")
    found = sorted({match.group(1) for key in state_dict if (match := pattern.match(key))})
    return CheckpointError(
        "The checkpoint has no gated cross-attention weights for a language model whose decoder layers are at "
        f"`{decoder_layers_path}`"
        + (f"; its cross-attention blocks sit in `lang_encoder.{found[0]}`" if found else "")
        + ". Is it from a different release or language model?"
    )


def _rename_to_installed_transformers(
    language_model: PreTrainedModel, state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Applies the installed transformers' checkpoint renamings for this LM (e.g. GPT-NeoX `embed_out` -> `lm_head`)."""
    from transformers.conversion_mapping import extract_weight_conversions_for_model
    from transformers.core_model_loading import WeightRenaming

    transforms = extract_weight_conversions_for_model(language_model) or []
    renamings = [t for t in transforms if type(t) is WeightRenaming]
    if len(renamings) != len(transforms):
        other = [type(t).__name__ for t in transforms if type(t) is not WeightRenaming]
        logger.info("Ignoring non-renaming checkpoint conversions %s of %s.", other, type(language_model).__name__)
    renamed: dict[str, str] = {}
    result: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = key
        for renaming in renamings:
            new_key, _ = renaming.rename_source_key(new_key)
        if new_key != key:
            renamed[key] = new_key
        result[new_key] = value
    return result, renamed


def load_openflamingo_weights(
    model: FlamingoForConditionalGeneration,
    state_dict: Mapping[str, torch.Tensor],
    *,
    cross_attn_every_n_layers: int | None = None,
    load: bool = True,
) -> ConversionReport:
    """Validates an OpenFlamingo state dict against `model` and (optionally) loads it.

    Every checkpoint key must map to a model key with the same shape; every Perceiver Resampler and gated
    cross-attention weight of the model must be in the checkpoint; the model keys left over must be backbone weights.

    Args:
        model ([`FlamingoForConditionalGeneration`]): The target, built with the right backbones (may be on the meta
            device when `load=False`).
        state_dict: The OpenFlamingo checkpoint.
        cross_attn_every_n_layers (`int`, *optional*): The interval the checkpoint must follow (e.g. a release's).
        load (`bool`, *optional*, defaults to `True`): Copy the weights into `model`; `False` only validates.

    Returns:
        [`ConversionReport`]

    Raises:
        CheckpointError: on any mismatch; the message names the offending keys.
    """
    config = model.config
    decoder_layers_path = model.decoder_layers_path
    weights = map_openflamingo_state_dict(state_dict, decoder_layers_path, config.num_text_layers)
    n = infer_cross_attn_every_n_layers(weights.cross_attention_layers, config.num_text_layers)
    if cross_attn_every_n_layers is not None and n != cross_attn_every_n_layers:
        raise CheckpointError(
            f"The checkpoint has gated cross-attention every {n} layers (before layers "
            f"{weights.cross_attention_layers}), but every {cross_attn_every_n_layers} layers was expected: it does "
            "not belong to the chosen release."
        )
    if n != config.cross_attn_every_n_layers:
        raise CheckpointError(
            f"The checkpoint has gated cross-attention every {n} layers but the model was built with "
            f"`cross_attn_every_n_layers={config.cross_attn_every_n_layers}`."
        )

    language_model_weights, renamed = _rename_to_installed_transformers(model.language_model, weights.language_model)
    target: dict[str, torch.Tensor] = dict(weights.bridge)
    model_keys = model.state_dict(keep_vars=True)
    dropped_buffers = []
    for key, value in language_model_weights.items():
        full_key = f"language_model.{key}"
        if full_key not in model_keys and key.endswith(_OBSOLETE_BUFFER_SUFFIXES):
            dropped_buffers.append(f"lang_encoder.{key}")
            continue
        target[full_key] = value
    if weights.vision_encoder:
        target.update(_convert_vision_encoder(model, weights.vision_encoder))

    unexpected = sorted(k for k in target if k not in model_keys)
    if unexpected:
        raise CheckpointError(
            f"{len(unexpected)} checkpoint weights have no place in the model: {format_keys(unexpected, 5)}. Is the "
            "checkpoint from a different release or language model?"
        )
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(model_keys[key].shape)}"
        for key, value in target.items()
        if tuple(value.shape) != tuple(model_keys[key].shape)
    ]
    if mismatched:
        raise CheckpointError(
            f"{len(mismatched)} checkpoint weights have the wrong shape for this model: {format_keys(mismatched, 5)}. "
            "Is the checkpoint from a different release, language model or tokenizer?"
        )
    missing_bridge = sorted(
        k for k in model_keys if k.startswith(("perceiver.", "gated_cross_attn_layers.")) and k not in target
    )
    if missing_bridge:
        raise CheckpointError(
            f"The checkpoint lacks {len(missing_bridge)} Perceiver Resampler / cross-attention weights of the model: "
            f"{format_keys(missing_bridge, 5)}; it is truncated or from a differently configured model."
        )
    backbone_keys = sorted(k for k in model_keys if k not in target)
    not_backbone = [k for k in backbone_keys if not k.startswith(("vision_model.", "language_model."))]
    if not_backbone:
        raise CheckpointError(
            f"Model weights {format_keys(not_backbone, 5)} are neither in the checkpoint nor in a backbone."
        )
    _warn_untrained_output_rows(model, target)

    if load:
        with torch.no_grad():
            for key, value in target.items():
                model_keys[key].copy_(value.to(model_keys[key].dtype))
    return ConversionReport(
        checkpoint_keys=len(state_dict),
        loaded_keys=sorted(target),
        backbone_keys=backbone_keys,
        dropped_aliases=sorted(weights.dropped_aliases),
        dropped_buffers=sorted(dropped_buffers),
        renamed_keys=renamed,
        cross_attn_every_n_layers=n,
    )


def _warn_untrained_output_rows(model: FlamingoForConditionalGeneration, target: Mapping[str, torch.Tensor]) -> None:
    """OpenFlamingo never saves an untied output projection: its rows for the new tokens come from the resize."""
    output = model.get_output_embeddings()
    if output is None or output.weight is model.get_input_embeddings().weight:
        return
    output_key = next(
        (f"language_model.{n}" for n, p in model.language_model.named_parameters() if p is output.weight), None
    )
    if output_key is not None and output_key not in target:
        logger.warning(
            "The checkpoint holds no output-projection weights (`%s`); the rows of the tokens added by OpenFlamingo "
            "(<|endofchunk|>, <image>, <PAD>) come from resizing the language model, as they did in OpenFlamingo, "
            "where they were re-initialised at every load. Their logits will not match any particular OpenFlamingo "
            "run.",
            output_key,
        )


def _convert_vision_encoder(
    model: FlamingoForConditionalGeneration, vision_state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    from transformers import CLIPVisionConfig

    from .open_clip import convert_open_clip_vision_state_dict

    if not isinstance(model.config.vision_config, CLIPVisionConfig):
        raise CheckpointError(
            "The checkpoint contains an open_clip vision tower (`vision_encoder.*`), which converts only into a CLIP "
            f"vision model, but the model's vision tower is a {type(model.config.vision_config).__name__}."
        )
    converted = convert_open_clip_vision_state_dict(vision_state_dict, model.config.vision_config, prefix="")
    # `converted` has `CLIPVisionModel` keys; the Flamingo keeps that model under `vision_model`.
    return {f"vision_model.{key}": value for key, value in converted.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Release checks without weights


def release_flamingo_config(release: OpenFlamingoRelease) -> FlamingoConfig:
    """The [`FlamingoConfig`] of a release, built from its architecture facts (no downloads)."""
    text_config = release.text_config()
    text_config.vocab_size = release.vocab_size
    ids = release.special_token_ids
    return FlamingoConfig(
        vision_config=release.vision_config(),
        text_config=text_config,
        cross_attn_every_n_layers=release.cross_attn_every_n_layers,
        media_token_id=ids["<image>"],
        eoc_token_id=ids["<|endofchunk|>"],
        vision_feature_select_strategy="default",
    )


def check_checkpoint_against_release(
    state_dict: Mapping[str, torch.Tensor], release: OpenFlamingoRelease
) -> ConversionReport:
    """Validates a checkpoint's keys and shapes against a release on the meta device (no weights are allocated).

    Raises:
        CheckpointError: if the checkpoint does not belong to `release`.
    """
    config = release_flamingo_config(release)
    with torch.device("meta"):
        model = FlamingoForConditionalGeneration(config)
    try:
        return load_openflamingo_weights(
            model, state_dict, cross_attn_every_n_layers=release.cross_attn_every_n_layers, load=False
        )
    except CheckpointError as error:
        raise CheckpointError(f"The checkpoint is not one of {release.name}: {error}") from error


__all__ = [
    "CheckpointError",
    "ConversionReport",
    "OpenFlamingoWeights",
    "check_checkpoint_against_release",
    "infer_cross_attn_every_n_layers",
    "load_openflamingo_checkpoint",
    "load_openflamingo_weights",
    "map_openflamingo_state_dict",
    "normalize_openflamingo_state_dict",
    "release_flamingo_config",
]
