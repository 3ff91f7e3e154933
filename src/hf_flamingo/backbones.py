"""Composing a new Flamingo from pretrained backbones: what `FlamingoModel.from_backbones` and
`FlamingoForConditionalGeneration.from_backbones` run.

Kept out of the modeling file on purpose: `save_pretrained` copies the modeling file and its relative imports as a
checkpoint's remote code, which needs none of this (loading backbones, reading token ids from a tokenizer).
"""

from __future__ import annotations

import difflib
import inspect
import os
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from .configuration_flamingo import FlamingoConfig
from .quantization_utils import keep_4bit_layers_differentiable


def from_backbones(
    model_class: type,
    vision_model: str | os.PathLike | PreTrainedModel,
    language_model: str | os.PathLike | PreTrainedModel,
    *,
    tokenizer: Any | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: Any | None = None,
    quantization_config: Any | None = None,
    vision_model_kwargs: dict[str, Any] | None = None,
    language_model_kwargs: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> Any:
    """Builds a new Flamingo around a pretrained vision encoder and causal language model.

    The Perceiver Resampler and the cross-attention blocks are freshly initialised (gates closed, so the result
    behaves exactly like the language model until trained).

    Args:
        vision_model (`str`, `os.PathLike` or `PreTrainedModel`):
            A Hub id or local directory of a vision model (a composite image-text checkpoint such as a CLIP or
            SigLIP repository contributes its vision tower), or an instantiated vision model (e.g.
            `CLIPVisionModel`, or a `CLIPModel` whose vision tower is taken).
        language_model (`str`, `os.PathLike` or `PreTrainedModel`):
            A Hub id or local directory of a causal LM, or an instantiated `*ForCausalLM`.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The tokenizer the model will be used with, typically `FlamingoProcessor(...).tokenizer`. When given,
            `media_token_id`/`eoc_token_id` are read from its `<image>`/`<|endofchunk|>` tokens and the language
            model's embeddings are resized to `len(tokenizer)`.
        dtype (`torch.dtype` or `str`, *optional*): Passed to both backbones' `from_pretrained`.
        device_map (*optional*): Passed to the language model's `from_pretrained`. A vision model loaded here
            (given as a Hub id or directory, without a `device_map` of its own in `vision_model_kwargs`) then
            goes where the language model's input embeddings are, like the new Perceiver Resampler and
            cross-attention blocks.
        quantization_config (*optional*): Passed to the language model's `from_pretrained` (e.g.
            `BitsAndBytesConfig(load_in_4bit=True)`): only the language model is quantized, its `lm_head` excepted.
            The Flamingo itself is not marked quantized, so `Trainer` trains the bridge without an adapter. Its
            `save_pretrained` directory reloads with the same layers quantized, and is then marked quantized
            (`Trainer` then needs a PEFT adapter, see `hf_flamingo.flamingo_lora_config`).
        vision_model_kwargs (`dict`, *optional*): Extra `from_pretrained` arguments for the vision model.
        language_model_kwargs (`dict`, *optional*): Extra `from_pretrained` arguments for the language model.
        **config_overrides: [`FlamingoConfig`] arguments (e.g. `cross_attn_every_n_layers=2`,
            `media_token_id=...`).

        model_class (`type`): [`FlamingoModel`] or [`FlamingoForConditionalGeneration`], the class to build.

    Returns:
        A `model_class` in eval mode, its backbones frozen.
    """
    _check_config_overrides(config_overrides)
    for name, value in (("vision_model", vision_model), ("language_model", language_model)):
        _check_local_path(name, value)
    vision_model_loaded_here = isinstance(vision_model, (str, os.PathLike))
    vision_model = _load_vision_model(vision_model, dtype, vision_model_kwargs or {})
    _check_vision_tower(vision_model)
    lm_kwargs = {"dtype": dtype, "device_map": device_map, "quantization_config": quantization_config}
    language_model = _load_language_model(language_model, lm_kwargs, language_model_kwargs or {})
    if tokenizer is not None:
        config_overrides.setdefault("media_token_id", _special_token_id(tokenizer, "<image>", "media_token_id"))
        config_overrides.setdefault("eoc_token_id", _special_token_id(tokenizer, "<|endofchunk|>", "eoc_token_id"))
    if "vision_feature_select_strategy" not in config_overrides:
        config_overrides["vision_feature_select_strategy"] = "default" if _has_class_token(vision_model) else "full"
    config = FlamingoConfig(vision_config=vision_model.config, text_config=language_model.config, **config_overrides)

    model = model_class(config, vision_model=vision_model, language_model=language_model)
    move_vision_model = (
        device_map is not None and vision_model_loaded_here and "device_map" not in (vision_model_kwargs or {})
    )
    _place_new_modules(model, move_vision_model)
    if tokenizer is not None and len(tokenizer) != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer is not None and model.can_generate():
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.freeze_backbones()
    keep_4bit_layers_differentiable(model)
    return model.eval()


def _load_language_model(
    language_model: str | os.PathLike | PreTrainedModel, defaults: dict[str, Any], kwargs: dict[str, Any]
) -> PreTrainedModel:
    """`language_model` itself, or loaded with `kwargs` plus the `defaults` that are not `None`."""
    if isinstance(language_model, (str, os.PathLike)):
        kwargs = dict(kwargs)
        for name, value in defaults.items():
            if value is not None:
                kwargs.setdefault(name, value)
        return AutoModelForCausalLM.from_pretrained(language_model, **kwargs)
    if not isinstance(language_model, PreTrainedModel):
        raise TypeError(
            "`language_model` must be a Hub id, a local directory or a transformers `*ForCausalLM` model, got "
            f"{type(language_model).__name__}."
        )
    _check_causal_language_model(language_model)
    return language_model


def _check_vision_tower(vision_model: PreTrainedModel) -> None:
    if vision_model.main_input_name != "pixel_values":
        raise TypeError(
            f"`vision_model` is a {type(vision_model).__name__}, which takes `{vision_model.main_input_name}`, not "
            "`pixel_values`: pass a vision encoder (e.g. `CLIPVisionModel`, `SiglipVisionModel`) or an image-text "
            "model holding one (e.g. `CLIPModel`)."
            + (" Were `vision_model` and `language_model` swapped?" if vision_model.can_generate() else "")
        )


def _check_causal_language_model(language_model: PreTrainedModel) -> None:
    """Refuses a vision model, and a model whose config has a transformers causal LM class it is not (e.g. a
    `BertModel`, whose causal LM is `BertLMHeadModel`); other custom models are trusted."""
    if language_model.can_generate():
        return
    name = type(language_model).__name__
    if language_model.main_input_name == "pixel_values":
        raise TypeError(
            f"`language_model` is a {name}, a vision model, not a causal language model: were `vision_model` and "
            "`language_model` swapped?"
        )
    config_class = type(language_model.config)
    if config_class in AutoModelForCausalLM._model_mapping:
        causal_class = AutoModelForCausalLM._model_mapping[config_class]
        raise TypeError(
            f"`language_model` is a {name}, which has no language-modelling head; pass its causal language model "
            f"({causal_class.__name__}, e.g. from `AutoModelForCausalLM.from_pretrained(...)`), or its Hub id or "
            "directory."
        )


def _check_local_path(name: str, value: Any) -> None:
    """A path that can only be local (absolute, relative to `.`/`..`/`~`, or a `PathLike`) must be a directory;
    anything else may be a Hub id and is left to `from_pretrained`."""
    if isinstance(value, os.PathLike):
        path = os.fspath(value)
    elif isinstance(value, str) and (os.path.isabs(value) or value.startswith((".", "~"))):
        path = value
    else:
        return
    if not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(
            f"`{name}` is {str(path)!r}, which is not an existing directory; pass the directory a model was saved "
            "to (`save_pretrained`), a Hub id, or a model instance."
        )


def _check_config_overrides(config_overrides: dict[str, Any]) -> None:
    """Refuses keyword arguments that are near-misses of a [`FlamingoConfig`] argument (a typo would otherwise be
    stored as an unused config attribute and silently ignored)."""
    known = set(inspect.signature(FlamingoConfig.__init__).parameters) - {"self", "kwargs"}
    for name in config_overrides:
        if name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        if close:
            raise TypeError(
                f"`from_backbones` got an unexpected keyword argument {name!r}; did you mean {close[0]!r} (a "
                "`FlamingoConfig` argument)?"
            )


def _place_new_modules(model: Any, move_vision_model: bool) -> None:
    """Puts the new Perceiver Resampler and cross-attention blocks (and, when asked, the vision tower) where the
    language model's input embeddings are, in their dtype (float32 for quantized embeddings)."""
    embeddings = model.language_model.get_input_embeddings().weight
    device, dtype = embeddings.device, embeddings.dtype
    if move_vision_model and device.type != "meta":
        model.vision_model.to(device)
    if not dtype.is_floating_point:
        dtype = torch.float32
    model.perceiver.to(device=device, dtype=dtype)
    model.gated_cross_attn_layers.to(device=device, dtype=dtype)


def _special_token_id(tokenizer: Any, token: str, name: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(
            f"The tokenizer has no {token!r} token, so `{name}` cannot be set. Build a `FlamingoProcessor` from it "
            f"(which adds `<image>` and `<|endofchunk|>`) or add the token with `tokenizer.add_special_tokens`."
        )
    return token_id


def _has_class_token(vision_model: PreTrainedModel) -> bool:
    """Whether the vision encoder prepends a class token (CLIP-like) to its patch tokens."""
    return any(name.split(".")[-1] in ("class_embedding", "cls_token") for name, _ in vision_model.named_parameters())


def _load_vision_model(
    vision_model: str | os.PathLike | PreTrainedModel, dtype: torch.dtype | str | None, kwargs: dict[str, Any]
) -> PreTrainedModel:
    if isinstance(vision_model, (str, os.PathLike)):
        hub_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "token", "cache_dir", "local_files_only")}
        config = AutoConfig.from_pretrained(vision_model, **hub_kwargs)
        vision_config = getattr(config, "vision_config", None) or config
        model_class = AutoModel._model_mapping[type(vision_config)]
        load_kwargs = dict(kwargs)
        if dtype is not None:
            load_kwargs.setdefault("dtype", dtype)
        return model_class.from_pretrained(vision_model, config=vision_config, **load_kwargs)
    if not isinstance(vision_model, PreTrainedModel):
        raise TypeError(
            "`vision_model` must be a Hub id, a local directory or a transformers vision model, got "
            f"{type(vision_model).__name__}."
        )
    vision_config = getattr(vision_model.config, "vision_config", None)
    if vision_config is None:
        return vision_model
    # A composite image-text model (CLIPModel, SiglipModel, ...): keep only its vision tower.
    source = getattr(vision_model, "vision_model", None)
    if isinstance(source, PreTrainedModel):
        return source
    if not isinstance(source, nn.Module):
        raise TypeError(
            f"{type(vision_model).__name__} has a `vision_config` but no `vision_model` tower to take; pass the "
            "vision model itself."
        )
    tower = AutoModel.from_config(vision_config)
    tower.vision_model.load_state_dict(source.state_dict())
    reference = next(source.parameters())
    return tower.to(device=reference.device, dtype=reference.dtype)
