"""Flamingo model configuration."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

from .configuration_mosaic_gpt import MosaicGPTConfig

_VISION_FEATURE_STRATEGIES = ("default", "full")
# Language-model configs that ship with this package (and with remote-code exports of it): resolved here so that a
# saved Flamingo loads even where `AutoConfig` has not been told about them (`trust_remote_code` without the package).
_BUNDLED_CONFIGS: dict[str, type[PretrainedConfig]] = {MosaicGPTConfig.model_type: MosaicGPTConfig}


def _as_config(value: PretrainedConfig | dict[str, Any] | None, name: str) -> PretrainedConfig | None:
    """Turns a sub-config given as a dict (with a `model_type`) into a config object."""
    if value is None or isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        if "model_type" not in value:
            raise ValueError(
                f"`{name}` was given as a dict without a `model_type` key; add one (e.g. 'clip_vision_model' or "
                f"'llama') or pass a config object."
            )
        config_dict = dict(value)
        model_type = config_dict.pop("model_type")
        if model_type in _BUNDLED_CONFIGS:
            return _BUNDLED_CONFIGS[model_type](**config_dict)
        return AutoConfig.for_model(model_type, **config_dict)
    raise TypeError(
        f"`{name}` must be a `PretrainedConfig` or a dict with a `model_type`, got {type(value).__name__}."
    )


class NotAFlamingoConfigError(ValueError):
    """A config of another model type (`model_type`) was given to [`FlamingoConfig`]."""

    def __init__(self, message: str, model_type: str):
        super().__init__(message)
        self.model_type = model_type


def _check_sub_configs(vision_config: PretrainedConfig, text_config: PretrainedConfig) -> None:
    """Refuses a language-model config given as `vision_config` and a vision config given as `text_config` (e.g.
    swapped arguments)."""
    if hasattr(vision_config, "vocab_size") and not hasattr(vision_config, "image_size"):
        raise ValueError(
            f"`vision_config` is a {type(vision_config).__name__}, which looks like a language model's config (it has "
            "a `vocab_size` and no `image_size`); pass a vision encoder's config (e.g. `CLIPVisionConfig`). Were "
            "`vision_config` and `text_config` swapped?"
        )
    if hasattr(text_config, "image_size") and not hasattr(text_config, "vocab_size"):
        raise ValueError(
            f"`text_config` is a {type(text_config).__name__}, which looks like a vision encoder's config (it has an "
            "`image_size` and no `vocab_size`); pass a causal language model's config (e.g. `LlamaConfig`). Were "
            "`vision_config` and `text_config` swapped?"
        )


def _check_positive(**sizes: int | None) -> None:
    """Sizes and counts must be integers >= 1 (`None`: unset, allowed)."""
    for name, value in sizes.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")


def _check_token_ids(media_token_id: Any, eoc_token_id: Any) -> None:
    for name, value in (("media_token_id", media_token_id), ("eoc_token_id", eoc_token_id)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(
                f"`{name}` must be a token id (an integer >= 0), got {value!r}; read it from the tokenizer, e.g. "
                "`FlamingoProcessor(...).media_token_id`."
            )
    if media_token_id is not None and media_token_id == eoc_token_id:
        raise ValueError(
            f"`media_token_id` and `eoc_token_id` are both {media_token_id}: `<image>` and `<|endofchunk|>` must be "
            "different tokens."
        )


def _check_vision_features(vision_config: PretrainedConfig, layer: Any, strategy: Any) -> None:
    if strategy not in _VISION_FEATURE_STRATEGIES:
        raise ValueError(
            f"`vision_feature_select_strategy` must be one of {_VISION_FEATURE_STRATEGIES}, got {strategy!r}."
        )
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(f"`vision_feature_layer` must be an integer index, got {layer!r}.")
    depth = getattr(vision_config, "num_hidden_layers", None)
    # The tower returns `depth + 1` hidden states: the embeddings, then one per layer.
    if isinstance(depth, int) and not -(depth + 1) <= layer <= depth:
        raise ValueError(
            f"`vision_feature_layer={layer}` is out of range: the vision tower has {depth} layers "
            f"(`vision_config.num_hidden_layers`), so it must lie between {-(depth + 1)} and {depth} (-1: the last "
            "layer's output)."
        )


class FlamingoConfig(PretrainedConfig):
    r"""
    Configuration of a [`FlamingoForConditionalGeneration`]: a frozen vision encoder, a Perceiver Resampler and
    tanh-gated cross-attention blocks attached in front of the decoder layers of an unmodified causal language model,
    as in OpenFlamingo v2.

    Args:
        vision_config (`PretrainedConfig` or `dict`, *optional*):
            Config of the vision encoder, any Transformers vision config (e.g. `CLIPVisionConfig`,
            `SiglipVisionConfig`). A composite config such as `CLIPConfig` is reduced to its `vision_config`. A dict
            must carry a `model_type`. Defaults to a `CLIPVisionConfig()`.
        text_config (`PretrainedConfig` or `dict`, *optional*):
            Config of the language model, the config of any causal LM loadable with `AutoModelForCausalLM`. A dict
            must carry a `model_type`. Defaults to a `LlamaConfig()`.
        perceiver_depth (`int`, *optional*, defaults to 6):
            Number of Perceiver Resampler layers.
        perceiver_num_latents (`int`, *optional*, defaults to 64):
            Number of learned latents, i.e. of visual tokens each image is resampled to.
        perceiver_heads (`int`, *optional*, defaults to 8):
            Attention heads of the Perceiver Resampler.
        perceiver_dim_head (`int`, *optional*, defaults to 64):
            Width of each Perceiver Resampler attention head.
        perceiver_ff_mult (`int`, *optional*, defaults to 4):
            Expansion factor of the Perceiver Resampler feed-forward layers.
        max_num_media (`int`, *optional*):
            When set, a learned embedding per image position (`media_time_embs`) is added to the visual features,
            for up to this many images per sample. OpenFlamingo leaves it unset.
        max_num_frames (`int`, *optional*):
            When set, a learned embedding per video frame (`frame_embs`) is added to the visual features, for up to
            this many frames per image. OpenFlamingo leaves it unset.
        cross_attn_every_n_layers (`int`, *optional*, defaults to 4):
            A gated cross-attention block runs before decoder layer `i` (0-based) iff
            `(i + 1) % cross_attn_every_n_layers == 0`.
        xattn_heads (`int`, *optional*, defaults to 8):
            Attention heads of each gated cross-attention block.
        xattn_dim_head (`int`, *optional*, defaults to 64):
            Width of each cross-attention head.
        xattn_ff_mult (`int`, *optional*, defaults to 4):
            Expansion factor of the gated feed-forward layers.
        only_attend_immediate_media (`bool`, *optional*, defaults to `True`):
            If `True`, a text token attends only to the latents of the most recent image before it (counting an
            `<image>` token as preceding itself). If `False`, it attends to all images up to and including that one.
            In both modes, tokens before the first image get exactly zero cross-attention output (OpenFlamingo gives
            them a uniform average over all images in the non-immediate mode; this implementation does not).
        media_token_id (`int`, *optional*):
            Id of the `<image>` token that marks where an image appears in the text (also readable and settable as
            `image_token_id`, the name transformers' vision-language models use).
        eoc_token_id (`int`, *optional*):
            Id of the `<|endofchunk|>` token that ends an image-text chunk.
        vision_feature_layer (`int`, *optional*, defaults to -1):
            Index into the vision encoder's `hidden_states` tuple of the features fed to the Perceiver Resampler.
            `-1` is the output of the last encoder layer, before any final LayerNorm.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            `"default"` drops the first token (the CLS token of CLIP-like encoders); `"full"` keeps every token (use
            it for encoders without a CLS token, such as SigLIP).
        vision_feature_apply_post_layernorm (`bool`, *optional*, defaults to `False`):
            Whether to apply the vision encoder's final LayerNorm (`post_layernorm`) to the selected features.
            OpenFlamingo's features are CLIP's 256 patch tokens, without CLS and before `post_layernorm`, i.e. the
            defaults `vision_feature_layer=-1`, `vision_feature_select_strategy="default"`,
            `vision_feature_apply_post_layernorm=False`.
        decoder_layers_attr (`str`, *optional*):
            Dotted path, relative to the language model, of the `nn.ModuleList` holding its decoder layers (e.g.
            `"model.layers"`). Only needed for language models whose layers the generic discovery cannot find.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation used by the vision and language models' own initialisers when they read it from this
            config. The Flamingo modules use PyTorch's default (Kaiming-uniform) initialisation, like OpenFlamingo.

    Example:

    ```python
    >>> from transformers import CLIPVisionConfig, LlamaConfig
    >>> from hf_flamingo import FlamingoConfig, FlamingoForConditionalGeneration

    >>> config = FlamingoConfig(
    ...     vision_config=CLIPVisionConfig(), text_config=LlamaConfig(), media_token_id=32001, eoc_token_id=32000
    ... )
    >>> model = FlamingoForConditionalGeneration(config)
    ```
    """

    model_type = "flamingo"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}
    # transformers' vision-language models call the image placeholder's id `image_token_id`; tools built for them
    # read (and may set) it under that name.
    attribute_map = {"image_token_id": "media_token_id"}
    # Output keys `Trainer` leaves out of predictions: the cache, under its name before and after transformers 5.24.
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vision_config: PretrainedConfig | dict[str, Any] | None = None,
        text_config: PretrainedConfig | dict[str, Any] | None = None,
        perceiver_depth: int = 6,
        perceiver_num_latents: int = 64,
        perceiver_heads: int = 8,
        perceiver_dim_head: int = 64,
        perceiver_ff_mult: int = 4,
        max_num_media: int | None = None,
        max_num_frames: int | None = None,
        cross_attn_every_n_layers: int = 4,
        xattn_heads: int = 8,
        xattn_dim_head: int = 64,
        xattn_ff_mult: int = 4,
        only_attend_immediate_media: bool = True,
        media_token_id: int | None = None,
        eoc_token_id: int | None = None,
        vision_feature_layer: int = -1,
        vision_feature_select_strategy: str = "default",
        vision_feature_apply_post_layernorm: bool = False,
        decoder_layers_attr: str | None = None,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        vision_config = _as_config(vision_config, "vision_config")
        if vision_config is None:
            vision_config = AutoConfig.for_model("clip_vision_model")
        # A composite image-text config (CLIPConfig, SiglipConfig, ...) contributes only its vision tower.
        if getattr(vision_config, "vision_config", None) is not None:
            vision_config = _as_config(vision_config.vision_config, "vision_config.vision_config")
        text_config = _as_config(text_config, "text_config")
        if text_config is None:
            text_config = AutoConfig.for_model("llama")

        _check_sub_configs(vision_config, text_config)
        _check_positive(
            cross_attn_every_n_layers=cross_attn_every_n_layers,
            perceiver_depth=perceiver_depth,
            perceiver_num_latents=perceiver_num_latents,
            perceiver_heads=perceiver_heads,
            perceiver_dim_head=perceiver_dim_head,
            perceiver_ff_mult=perceiver_ff_mult,
            xattn_heads=xattn_heads,
            xattn_dim_head=xattn_dim_head,
            xattn_ff_mult=xattn_ff_mult,
            max_num_media=max_num_media,
            max_num_frames=max_num_frames,
        )
        _check_token_ids(media_token_id, eoc_token_id)
        _check_vision_features(vision_config, vision_feature_layer, vision_feature_select_strategy)

        self.vision_config = vision_config
        self.text_config = text_config
        self.perceiver_depth = perceiver_depth
        self.perceiver_num_latents = perceiver_num_latents
        self.perceiver_heads = perceiver_heads
        self.perceiver_dim_head = perceiver_dim_head
        self.perceiver_ff_mult = perceiver_ff_mult
        self.max_num_media = max_num_media
        self.max_num_frames = max_num_frames
        self.cross_attn_every_n_layers = cross_attn_every_n_layers
        self.xattn_heads = xattn_heads
        self.xattn_dim_head = xattn_dim_head
        self.xattn_ff_mult = xattn_ff_mult
        self.only_attend_immediate_media = only_attend_immediate_media
        self.media_token_id = media_token_id
        self.eoc_token_id = eoc_token_id
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.vision_feature_apply_post_layernorm = vision_feature_apply_post_layernorm
        self.decoder_layers_attr = decoder_layers_attr
        self.initializer_range = initializer_range
        # The base config propagates its (default `None`) attention implementation to the sub-configs; keep the ones
        # the sub-configs already had (they may belong to models that are already built) unless one was asked for.
        sub_attn_implementations = {
            name: getattr(sub_config, "_attn_implementation_internal", None)
            for name, sub_config in (("vision_config", vision_config), ("text_config", text_config))
        }
        super().__init__(**kwargs)
        if kwargs.get("attn_implementation") is None:
            for name, implementation in sub_attn_implementations.items():
                if implementation is not None:
                    getattr(self, name)._attn_implementation_internal = implementation

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> PretrainedConfig:
        """As [`~PretrainedConfig.from_dict`], refusing the config of another model type (e.g. a language model's)."""
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            raise NotAFlamingoConfigError(
                f"This is a {model_type!r} config, not a Flamingo (`model_type` {cls.model_type!r}).", model_type
            )
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> PretrainedConfig:
        """As [`~PretrainedConfig.from_pretrained`]; a directory or Hub repository holding another model (e.g. a saved
        language model) raises a `ValueError` that says so and points to `from_backbones`."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except NotAFlamingoConfigError as error:
            raise NotAFlamingoConfigError(
                f"{str(pretrained_model_name_or_path)!r} is not a Flamingo checkpoint: its config.json holds a "
                f"{error.model_type!r} config, not a Flamingo (`model_type` {cls.model_type!r}). To build a "
                "new Flamingo around this model, use `FlamingoForConditionalGeneration.from_backbones(vision_model, "
                "language_model, tokenizer=...)`.",
                error.model_type,
            ) from None

    @property
    def vision_hidden_size(self) -> int:
        """Width of the visual features fed to the Perceiver Resampler."""
        return self.vision_config.hidden_size

    @property
    def text_hidden_size(self) -> int:
        """Width of the language model's residual stream (MPT-style configs call it `d_model`)."""
        for name in ("hidden_size", "d_model", "n_embd"):
            value = getattr(self.text_config, name, None)
            if isinstance(value, int):
                return value
        raise ValueError(
            f"Cannot read the hidden size of the language model config {type(self.text_config).__name__}: it has "
            "none of `hidden_size`, `d_model`, `n_embd`."
        )

    @property
    def num_text_layers(self) -> int:
        """Number of decoder layers of the language model."""
        for name in ("num_hidden_layers", "n_layers", "n_layer", "num_layers"):
            value = getattr(self.text_config, name, None)
            if isinstance(value, int):
                return value
        raise ValueError(
            f"Cannot read the number of layers of the language model config {type(self.text_config).__name__}."
        )

    def cross_attention_layer_indices(self) -> list[int]:
        """0-based indices of the decoder layers preceded by a gated cross-attention block."""
        n = self.cross_attn_every_n_layers
        return [i for i in range(self.num_text_layers) if (i + 1) % n == 0]


__all__ = ["FlamingoConfig"]
