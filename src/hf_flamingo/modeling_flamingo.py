"""PyTorch Flamingo model: a vision encoder, a Perceiver Resampler and tanh-gated cross-attention attached to an
unmodified causal language model through forward pre-hooks (OpenFlamingo v2 semantics)."""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

from .cache_compat import CACHE_NAME, LEGACY_CACHE_NAME, cache_argument_name, cache_from_output, merge_cache_arguments
from .configuration_flamingo import FlamingoConfig
from .cpu_kernels import module_linear, onednn_linears_on
from .generation_flamingo import FlamingoGenerationImages
from .language_model_hooks import CrossAttentionConditioning, LanguageModelHooks
from .modeling_mosaic_gpt import MosaicGPTForCausalLM
from .quantization_utils import keep_4bit_layers_differentiable

logger = logging.get_logger(__name__)


@dataclass
class FlamingoCausalLMOutputWithPast(CausalLMOutputWithPast):
    """
    Output of [`FlamingoForConditionalGeneration`]: transformers' [`~modeling_outputs.CausalLMOutputWithPast`] (`loss`,
    `logits`, the cache, `hidden_states`, `attentions`, all from the language model) and the image latents.

    The cache field has the name the installed transformers gives it, so that `generate` finds it: `cache` from
    transformers 5.24 on, `past_key_values` before (`hf_flamingo.cache_compat.CACHE_NAME`).

    Args:
        image_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_images, num_latents, vision_hidden_size)`, *optional*):
            The Perceiver Resampler's output for the images of this call; pass it back as `image_hidden_states` to
            skip re-encoding the images.
    """

    image_hidden_states: torch.FloatTensor | None = None


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`(batch, length, heads * head_dim)` -> `(batch, heads, length, head_dim)`."""
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """`(batch, heads, length, head_dim)` -> `(batch, length, heads * head_dim)`."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


# Images per vision-tower call on CPU outside training. For a ViT-B/16 at 224 px, 8 images keep the tower's returned
# hidden states at 62 MB instead of 186 MB for 24 images, and were as fast or faster (2-core EPYC).
_CPU_IMAGES_PER_CHUNK = 8


class FlamingoFeedForward(nn.Sequential):
    """`Linear(GELU(Linear(LayerNorm(x))))`, without biases; state-dict keys `0` (norm), `1` (up) and `3` (down)."""

    def __init__(self, dim: int, mult: int):
        inner_dim = dim * mult
        super().__init__(
            nn.LayerNorm(dim), nn.Linear(dim, inner_dim, bias=False), nn.GELU(), nn.Linear(inner_dim, dim, bias=False)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        norm, up, activation, down = self
        return module_linear(down, activation(module_linear(up, norm(hidden_states))))


class FlamingoPerceiverAttention(nn.Module):
    """Latents attend to the concatenation of the visual features and themselves."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        inner_dim = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """
        Args:
            features (`torch.Tensor` of shape `(batch, num_features, dim)`): Visual features of one image each.
            latents (`torch.Tensor` of shape `(batch, num_latents, dim)`): Current latents.

        Returns:
            `torch.Tensor` of shape `(batch, num_latents, dim)`: The attention update (before the residual).
        """
        features = self.norm_media(features)
        latents = self.norm_latents(latents)
        query = _split_heads(module_linear(self.to_q, latents), self.heads)
        key, value = module_linear(self.to_kv, torch.cat((features, latents), dim=1)).chunk(2, dim=-1)
        attended = F.scaled_dot_product_attention(
            query, _split_heads(key, self.heads), _split_heads(value, self.heads)
        )
        return module_linear(self.to_out, _merge_heads(attended))


class FlamingoPerceiverLayer(nn.ModuleList):
    """One Perceiver Resampler layer: `[attention, feed-forward]`, each with a residual connection."""

    def __init__(self, dim: int, dim_head: int, heads: int, ff_mult: int):
        super().__init__([FlamingoPerceiverAttention(dim, dim_head, heads), FlamingoFeedForward(dim, ff_mult)])

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        attention, feed_forward = self[0], self[1]
        latents = attention(features, latents) + latents
        return feed_forward(latents) + latents


class FlamingoPerceiverResampler(nn.Module):
    """Resamples each image's visual features to `perceiver_num_latents` latent vectors."""

    def __init__(self, config: FlamingoConfig):
        super().__init__()
        dim = config.vision_hidden_size
        self.latents = nn.Parameter(torch.empty(config.perceiver_num_latents, dim))
        if config.max_num_frames:
            self.frame_embs = nn.Parameter(torch.empty(config.max_num_frames, dim))
        else:
            self.register_parameter("frame_embs", None)
        if config.max_num_media:
            self.media_time_embs = nn.Parameter(torch.empty(config.max_num_media, 1, dim))
        else:
            self.register_parameter("media_time_embs", None)
        self.layers = nn.ModuleList(
            FlamingoPerceiverLayer(dim, config.perceiver_dim_head, config.perceiver_heads, config.perceiver_ff_mult)
            for _ in range(config.perceiver_depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            features (`torch.Tensor` of shape `(batch, num_images, num_frames, num_tokens, dim)`): Visual features.

        Returns:
            `torch.Tensor` of shape `(batch, num_images, num_latents, dim)`.
        """
        batch, num_images, num_frames, num_tokens, dim = features.shape
        if self.frame_embs is not None:
            if num_frames > self.frame_embs.shape[0]:
                raise ValueError(
                    f"Got {num_frames} frames per image but `max_num_frames` is {self.frame_embs.shape[0]}."
                )
            features = features + self.frame_embs[:num_frames].view(1, 1, num_frames, 1, dim)
        features = features.reshape(batch, num_images, num_frames * num_tokens, dim)
        if self.media_time_embs is not None:
            if num_images > self.media_time_embs.shape[0]:
                raise ValueError(
                    f"Got {num_images} images per sample but `max_num_media` is {self.media_time_embs.shape[0]}."
                )
            features = features + self.media_time_embs[:num_images]
        # Images are resampled independently: fold them into the batch axis.
        features = features.reshape(batch * num_images, num_frames * num_tokens, dim)
        latents = self.latents.unsqueeze(0).expand(batch * num_images, -1, -1)
        for layer in self.layers:
            latents = layer(features, latents)
        return self.norm(latents).view(batch, num_images, -1, dim)


class FlamingoMaskedCrossAttention(nn.Module):
    """Text tokens (queries) attend to image latents (keys/values) under a per-token image mask."""

    def __init__(self, dim: int, dim_visual: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        inner_dim = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, key_values: torch.Tensor, attention_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch, seq_len, dim)`): Text hidden states.
            key_values (`torch.Tensor` of shape `(batch, num_keys, 2 * heads * dim_head)`): `to_kv` of the image
                latents the tokens may attend to (keys, then values).
            attention_bias (`torch.Tensor` of shape `(batch, 1, seq_len, num_keys)`, *optional*):
                Additive mask (0 where allowed, the dtype's minimum elsewhere); `None` when every key is allowed.

        Returns:
            `torch.Tensor` of shape `(batch, seq_len, dim)`.
        """
        query = _split_heads(module_linear(self.to_q, self.norm(hidden_states)), self.heads)
        key, value = key_values.chunk(2, dim=-1)
        attended = F.scaled_dot_product_attention(
            query,
            _split_heads(key, self.heads),
            _split_heads(value, self.heads),
            attn_mask=None if attention_bias is None else attention_bias.to(query.dtype),
        )
        return module_linear(self.to_out, _merge_heads(attended))


class FlamingoGatedCrossAttentionBlock(GradientCheckpointingLayer):
    """`x + tanh(attn_gate) * cross_attention(x)`, then `x + tanh(ff_gate) * feed_forward(x)`.

    Both gates start at 0, so a fresh block is the identity. The feed-forward branch runs on every token, including
    tokens without an image (as in OpenFlamingo).
    """

    def __init__(self, config: FlamingoConfig):
        super().__init__()
        dim = config.text_hidden_size
        self.attn = FlamingoMaskedCrossAttention(
            dim, config.vision_hidden_size, config.xattn_dim_head, config.xattn_heads
        )
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FlamingoFeedForward(dim, config.xattn_ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def key_values(self, media: torch.Tensor) -> torch.Tensor:
        """Projects image latents to this block's cross-attention keys and values.

        Args:
            media (`torch.Tensor` of shape `(batch, num_keys, vision_hidden_size)`): Image latents.

        Returns:
            `torch.Tensor` of shape `(batch, num_keys, 2 * xattn_heads * xattn_dim_head)`: keys, then values.
        """
        return module_linear(self.attn.to_kv, media.to(self.attn.to_kv.weight.dtype))

    def forward(
        self,
        hidden_states: torch.Tensor,
        media: torch.Tensor | None = None,
        attention_bias: torch.Tensor | None = None,
        media_rows: torch.Tensor | None = None,
        key_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch, seq_len, dim)`): Input of the decoder layer.
            media (`torch.Tensor` of shape `(batch, num_images * num_latents, vision_hidden_size)`, *optional*):
                Image latents; `None` (with `key_values` `None`) when no token attends to an image: then only the
                feed-forward branch runs.
            attention_bias (`torch.Tensor` of shape `(batch, 1, seq_len, num_keys)`, *optional*):
                Additive cross-attention mask; `None` when every key is allowed.
            media_rows (`torch.Tensor` of shape `(batch, seq_len, 1)`, *optional*):
                `False` for tokens with no preceding image, whose attention output is set to exactly 0.
            key_values (`torch.Tensor` of shape `(batch, num_keys, 2 * xattn_heads * xattn_dim_head)`, *optional*):
                Precomputed [`~FlamingoGatedCrossAttentionBlock.key_values`], used instead of projecting `media`.
        """
        hidden_states = hidden_states.to(self.attn_gate.dtype)
        if key_values is None and media is not None:
            key_values = self.key_values(media)
        if key_values is not None:
            attended = self.attn(hidden_states, key_values.to(hidden_states.dtype), attention_bias)
            if media_rows is not None:
                attended = torch.where(media_rows, attended, torch.zeros_like(attended))
            hidden_states = hidden_states + self.attn_gate.tanh() * attended
        return hidden_states + self.ff_gate.tanh() * self.ff(hidden_states)


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


class FlamingoPreTrainedModel(PreTrainedModel):
    config_class = FlamingoConfig
    config: FlamingoConfig
    base_model_prefix = "flamingo"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["FlamingoGatedCrossAttentionBlock", "FlamingoPerceiverLayer"]
    _skip_keys_device_placement = [CACHE_NAME, LEGACY_CACHE_NAME]
    # Quantization (`from_pretrained(..., quantization_config=...)`): transformers 5 quantizers (bitsandbytes and the
    # others) never convert the modules listed here, so only the language model's linears are quantized (its
    # `lm_head` is kept by the quantizer's own default, through `get_output_embeddings`). Patterns are anchored at the
    # start of module names. This attribute is the only skip mechanism every quantizer reads; its one other effect is
    # that these modules load in float32 when `dtype=torch.float16` is requested (as BLIP-2's Q-Former), never for
    # bfloat16 or float32. `_keep_in_fp32_modules_strict` (which also upcasts under bfloat16) is deliberately unused.
    _keep_in_fp32_modules = ["vision_model", "perceiver", "gated_cross_attn_layers"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The vision and language models are PreTrainedModels and initialise their own modules; only Flamingo's
        # modules reach this method. They follow OpenFlamingo: PyTorch's default Linear/LayerNorm initialisation,
        # standard-normal latents and time embeddings, and closed (zero) gates.
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, FlamingoPerceiverResampler):
            init.normal_(module.latents, std=1.0)
            if module.frame_embs is not None:
                init.normal_(module.frame_embs, std=1.0)
            if module.media_time_embs is not None:
                init.normal_(module.media_time_embs, std=1.0)
        elif isinstance(module, FlamingoGatedCrossAttentionBlock):
            init.zeros_(module.attn_gate)
            init.zeros_(module.ff_gate)


class FlamingoForConditionalGeneration(FlamingoPreTrainedModel, GenerationMixin):
    """Flamingo: a vision encoder and Perceiver Resampler whose image latents condition a causal language model
    through tanh-gated cross-attention blocks.

    The language model is built with `AutoModelForCausalLM.from_config(config.text_config)` (or given ready-made) and
    left unmodified: the blocks live in `gated_cross_attn_layers` (keyed by the index of the decoder layer they run
    in front of) and are called from forward pre-hooks on the decoder layers. The language model's own parameters keep
    their keys under `language_model.`.

    Args:
        config ([`FlamingoConfig`]): Model configuration.
        vision_model (`PreTrainedModel`, *optional*): A ready vision encoder matching `config.vision_config`.
        language_model (`PreTrainedModel`, *optional*): A ready causal LM matching `config.text_config`.
    """

    def __init__(
        self,
        config: FlamingoConfig,
        vision_model: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        if config.media_token_id is None:
            raise ValueError(
                "`config.media_token_id` is not set: it must be the id of the `<image>` token in your tokenizer "
                "(e.g. `FlamingoProcessor(...).media_token_id`)."
            )
        self.vision_model = vision_model if vision_model is not None else AutoModel.from_config(config.vision_config)
        self.perceiver = FlamingoPerceiverResampler(config)
        self.gated_cross_attn_layers = nn.ModuleDict(
            {str(index): FlamingoGatedCrossAttentionBlock(config) for index in config.cross_attention_layer_indices()}
        )
        self.language_model = (
            language_model if language_model is not None else _causal_lm_from_config(config.text_config)
        )
        self._lm_hooks = LanguageModelHooks(config.cross_attention_layer_indices())
        self._bind_language_model()
        self._embedding_grad_hook = None
        self.post_init()
        # `post_init` collects the children's `_no_split_modules`, including classes a vision-only tower does not
        # contain (e.g. CLIP's `CLIPTextEmbeddings`); FSDP's transformer auto-wrap refuses class names it cannot find.
        present = {type(module).__name__ for module in self.modules()}
        self._no_split_modules = {name for name in self._no_split_modules if name in present}

    # ----------------------------------------------------------------------------------------------------------------
    # Construction helpers

    @classmethod
    def from_backbones(
        cls,
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
    ) -> FlamingoForConditionalGeneration:
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

        Returns:
            [`FlamingoForConditionalGeneration`]
        """
        vision_model_loaded_here = isinstance(vision_model, (str, os.PathLike))
        vision_model = _load_vision_model(vision_model, dtype, vision_model_kwargs or {})
        if isinstance(language_model, (str, os.PathLike)):
            lm_kwargs = dict(language_model_kwargs or {})
            for name, value in (
                ("dtype", dtype),
                ("device_map", device_map),
                ("quantization_config", quantization_config),
            ):
                if value is not None:
                    lm_kwargs.setdefault(name, value)
            language_model = AutoModelForCausalLM.from_pretrained(language_model, **lm_kwargs)
        elif not isinstance(language_model, PreTrainedModel):
            raise TypeError(
                "`language_model` must be a Hub id, a local directory or a transformers `*ForCausalLM` model, got "
                f"{type(language_model).__name__}."
            )

        if tokenizer is not None:
            config_overrides.setdefault("media_token_id", _special_token_id(tokenizer, "<image>", "media_token_id"))
            config_overrides.setdefault("eoc_token_id", _special_token_id(tokenizer, "<|endofchunk|>", "eoc_token_id"))
        if "vision_feature_select_strategy" not in config_overrides:
            config_overrides["vision_feature_select_strategy"] = (
                "default" if _has_class_token(vision_model) else "full"
            )
        config = FlamingoConfig(
            vision_config=vision_model.config, text_config=language_model.config, **config_overrides
        )

        model = cls(config, vision_model=vision_model, language_model=language_model)
        bridge_device = language_model.get_input_embeddings().weight.device
        if (
            device_map is not None
            and vision_model_loaded_here
            and "device_map" not in (vision_model_kwargs or {})
            and bridge_device.type != "meta"
        ):
            vision_model.to(bridge_device)
        bridge_dtype = language_model.get_input_embeddings().weight.dtype
        if not bridge_dtype.is_floating_point:
            bridge_dtype = torch.float32
        model.perceiver.to(device=bridge_device, dtype=bridge_dtype)
        model.gated_cross_attn_layers.to(device=bridge_device, dtype=bridge_dtype)
        if tokenizer is not None and len(tokenizer) != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        model.freeze_backbones()
        keep_4bit_layers_differentiable(model)
        return model.eval()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> FlamingoForConditionalGeneration:
        """Loads a saved Flamingo, as [`~PreTrainedModel.from_pretrained`].

        With a `quantization_config` (e.g. `BitsAndBytesConfig(load_in_4bit=True)`), or a checkpoint saved
        quantized, only the language model's linear layers are quantized; the vision tower, the Perceiver Resampler,
        the cross-attention blocks and `lm_head` keep the requested `dtype` (see `_keep_in_fp32_modules`). 4-bit
        layers are kept differentiable after inference on CPUs with AVX512-BF16
        ([`~hf_flamingo.quantization_utils.keep_4bit_layers_differentiable`]).
        """
        loaded = super().from_pretrained(*args, **kwargs)
        # `output_loading_info=True` returns `(model, loading_info)`.
        keep_4bit_layers_differentiable(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    def freeze_backbones(self, train_new_token_embeddings: bool = False) -> None:
        """Makes only the Perceiver Resampler and the gated cross-attention blocks trainable (OpenFlamingo's recipe).

        Args:
            train_new_token_embeddings (`bool`, *optional*, defaults to `False`):
                Also train the input-embedding rows of `<image>` and `<|endofchunk|>`: the embedding matrix gets
                `requires_grad=True` and a gradient hook zeroes every other row. Put the embeddings in a parameter
                group without weight decay, or the optimizer's decay will still move the other rows.
        """
        self.requires_grad_(False)
        self.perceiver.requires_grad_(True)
        self.gated_cross_attn_layers.requires_grad_(True)
        if self._embedding_grad_hook is not None:
            self._embedding_grad_hook.remove()
            self._embedding_grad_hook = None
        if train_new_token_embeddings:
            token_ids = [i for i in (self.config.media_token_id, self.config.eoc_token_id) if i is not None]
            weight = self.get_input_embeddings().weight
            row_mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
            row_mask[token_ids] = 1
            weight.requires_grad_(True)
            self._embedding_grad_hook = weight.register_hook(lambda grad: grad * row_mask.to(grad.device, grad.dtype))

    # ----------------------------------------------------------------------------------------------------------------
    # Embedding accessors (delegated, so that resizing and tying act on the language model)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def resize_token_embeddings(self, new_num_tokens: int | None = None, *args: Any, **kwargs: Any) -> nn.Embedding:
        """Resizes the language model's input and output embeddings and updates `config.text_config.vocab_size`."""
        embeddings = self.language_model.resize_token_embeddings(new_num_tokens, *args, **kwargs)
        if self._embedding_grad_hook is not None:
            logger.warning("Embeddings were resized: call `freeze_backbones(...)` again to re-install the row mask.")
        return embeddings

    def set_language_model(self, language_model: PreTrainedModel) -> None:
        """Replaces the language model and moves the cross-attention hooks onto its decoder layers."""
        self._lm_hooks.detach()
        self.language_model = language_model
        self.config.text_config = language_model.config
        self._bind_language_model()

    def _bind_language_model(self) -> None:
        """Hooks the blocks onto `self.language_model` and notes how its `forward` takes the cache and
        `logits_to_keep`."""
        self._lm_hooks.attach(self.language_model, self.config.num_text_layers, self.config.decoder_layers_attr)
        self._lm_cache_argument = cache_argument_name(self.language_model)
        self._language_model_takes_logits_to_keep = _accepts_argument(self.language_model, "logits_to_keep")

    @property
    def decoder_layers_path(self) -> str | None:
        """Dotted path (relative to `language_model`) of the decoder layers the cross-attention hooks are on."""
        return self._lm_hooks.layers_path

    # ----------------------------------------------------------------------------------------------------------------
    # Images

    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """Encodes images (or video frames) and resamples them to latents.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, num_images, channels, height, width)` or
                `(batch, num_images, num_frames, channels, height, width)`): The images.

        Returns:
            `torch.FloatTensor` of shape `(batch, num_images, num_latents, vision_hidden_size)`.
        """
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"`pixel_values` must be a torch.Tensor, got {type(pixel_values).__name__}.")
        if pixel_values.ndim == 5:
            pixel_values = pixel_values.unsqueeze(2)
        elif pixel_values.ndim != 6:
            raise ValueError(
                "`pixel_values` must have shape (batch, num_images, channels, height, width) or (batch, num_images, "
                f"num_frames, channels, height, width); got a {pixel_values.ndim}-D tensor of shape "
                f"{tuple(pixel_values.shape)}."
            )
        batch, num_images, num_frames = pixel_values.shape[:3]
        vision_param = next(self.vision_model.parameters())
        flat = pixel_values.reshape(batch * num_images * num_frames, *pixel_values.shape[3:])
        flat = flat.to(device=vision_param.device, dtype=vision_param.dtype)
        if flat.device.type == "cpu":
            # Through oneDNN where no gradient is needed (see `cpu_kernels`), without modifying the tower. Outside
            # training, in chunks of images: the tower returns the hidden states of all its layers, and smaller
            # activations stay in cache (training keeps one batch, for towers with batch statistics).
            chunk_size = max(flat.shape[0], 1) if self.vision_model.training else _CPU_IMAGES_PER_CHUNK
            with onednn_linears_on(flat.device):
                features = torch.cat([self._vision_features(chunk) for chunk in flat.split(chunk_size)])
        else:
            features = self._vision_features(flat)
        perceiver_param = self.perceiver.latents
        features = features.to(device=perceiver_param.device, dtype=perceiver_param.dtype)
        features = features.reshape(batch, num_images, num_frames, *features.shape[1:])
        return self.perceiver(features)

    def _vision_features(self, images: torch.FloatTensor) -> torch.FloatTensor:
        """The tower's features of `images` (`(num_images, channels, height, width)`) as the config selects them."""
        vision_outputs = self.vision_model(pixel_values=images, output_hidden_states=True)
        features = vision_outputs.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        if self.config.vision_feature_apply_post_layernorm:
            features = self._vision_post_layernorm()(features)
        return features

    def _vision_post_layernorm(self) -> nn.Module:
        for name, module in self.vision_model.named_modules():
            if name.split(".")[-1] == "post_layernorm":
                return module
        raise ValueError(
            f"`vision_feature_apply_post_layernorm=True` but {type(self.vision_model).__name__} has no "
            "`post_layernorm` module."
        )

    def _resolve_image_hidden_states(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor | None,
        image_hidden_states: torch.FloatTensor | None,
    ) -> torch.FloatTensor | None:
        """Encodes `pixel_values`, or checks the given `image_hidden_states`; `None` when there are no images."""
        if pixel_values is not None and image_hidden_states is not None:
            raise ValueError("Pass either `pixel_values` or `image_hidden_states`, not both.")
        if pixel_values is not None:
            image_hidden_states = self.get_image_features(pixel_values)
        if image_hidden_states is None:
            return None
        if image_hidden_states.ndim != 4:
            raise ValueError(
                "`image_hidden_states` must have shape (batch_size, num_images, num_latents, vision_hidden_size), got "
                f"{tuple(image_hidden_states.shape)}."
            )
        if image_hidden_states.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"Got images for {image_hidden_states.shape[0]} samples but `input_ids` has {input_ids.shape[0]} rows."
            )
        return image_hidden_states

    def _resolve_cross_attention_states(
        self, input_ids: torch.LongTensor, cross_attention_states: torch.FloatTensor
    ) -> torch.FloatTensor:
        """Checks precomputed keys/values against the model and the batch."""
        num_blocks, num_latents = len(self.gated_cross_attn_layers), self.config.perceiver_num_latents
        width = 2 * self.config.xattn_heads * self.config.xattn_dim_head
        if cross_attention_states.ndim != 4:
            raise ValueError(
                "`cross_attention_states` must have shape (batch_size, num_blocks, num_images * num_latents, "
                f"{width}), got {tuple(cross_attention_states.shape)}."
            )
        if cross_attention_states.shape[1] != num_blocks:
            raise ValueError(
                f"`cross_attention_states` holds keys/values for {cross_attention_states.shape[1]} blocks, the model "
                f"has {num_blocks}."
            )
        if cross_attention_states.shape[2] % num_latents or cross_attention_states.shape[3] != width:
            raise ValueError(
                f"`cross_attention_states` must hold a multiple of {num_latents} keys of width {width} per block, "
                f"got shape {tuple(cross_attention_states.shape)}."
            )
        if cross_attention_states.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"Got `cross_attention_states` for {cross_attention_states.shape[0]} samples but `input_ids` has "
                f"{input_ids.shape[0]} rows."
            )
        return cross_attention_states

    def _token_image_index(
        self,
        input_ids: torch.LongTensor,
        num_images: int,
        token_image_index: torch.LongTensor | None,
        cache: Cache | None,
    ) -> torch.LongTensor:
        """For every token, the 1-based index of the image it attends to (0: none), checked against `num_images`.

        Without `token_image_index`, a token attends to the image of the most recent `<image>` token up to it
        (OpenFlamingo's rule), which only holds for tokens that start a sequence.
        """
        if token_image_index is not None:
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
        token_image_index = (input_ids == self.config.media_token_id).cumsum(dim=-1)
        if torch.compiler.is_compiling():
            return token_image_index
        counts = token_image_index[:, -1] if token_image_index.numel() else token_image_index.new_zeros(1)
        if num_images:
            if int(counts.max()) > num_images:
                sample = int(counts.argmax())
                raise ValueError(
                    f"Sample {sample} has {int(counts[sample])} `<image>` tokens but only {num_images} image(s) per "
                    "sample were given; every `<image>` token needs an image."
                )
            if int(counts.max()) == 0:
                raise ValueError(
                    "Images were given but `input_ids` contains no `<image>` token (id "
                    f"{self.config.media_token_id}); put one `<image>` token where each image appears in the text."
                )
        elif int(counts.max()) > 0:
            raise ValueError(
                f"`input_ids` contains `<image>` tokens (id {self.config.media_token_id}) but no `pixel_values` or "
                "`image_hidden_states` were given."
            )
        return token_image_index

    def get_cross_attention_states(self, image_hidden_states: torch.FloatTensor) -> torch.FloatTensor:
        """Projects image latents to every gated block's cross-attention keys and values, once.

        `generate` calls this once per call, before expanding the batch for beams, so each block's keys and values
        are computed once per sample instead of at every decoding step.

        Args:
            image_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_images, num_latents, vision_hidden_size)`):
                Perceiver Resampler outputs.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, num_blocks, num_images * num_latents, 2 * xattn_heads *
            xattn_dim_head)`, blocks in the order of `gated_cross_attn_layers`.
        """
        batch, num_images, num_latents, dim = image_hidden_states.shape
        media = image_hidden_states.reshape(batch, num_images * num_latents, dim)
        blocks = list(self.gated_cross_attn_layers.values())
        width = 2 * self.config.xattn_heads * self.config.xattn_dim_head
        dtype = blocks[0].attn.to_kv.weight.dtype if blocks else media.dtype
        # Filled block by block, so that all blocks' keys/values never exist twice at once.
        states = media.new_empty(batch, len(blocks), num_images * num_latents, width, dtype=dtype)
        for position, block in enumerate(blocks):
            states[:, position] = block.key_values(media)
        return states

    def _cross_attention_conditioning(
        self,
        token_image_index: torch.LongTensor,
        image_hidden_states: torch.FloatTensor | None,
        cross_attention_states: torch.FloatTensor | None,
    ) -> dict[int, CrossAttentionConditioning]:
        """What each gated block needs for one forward, keyed by the index of the decoder layer it runs before."""
        blocks = self.gated_cross_attn_layers
        if image_hidden_states is None and cross_attention_states is None:
            return {int(index): CrossAttentionConditioning(block) for index, block in blocks.items()}
        num_latents = self.config.perceiver_num_latents
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
            build_cross_attention_mask(
                token_image_index, num_images, num_latents, self.config.only_attend_immediate_media, dtype
            )
            if num_images > 1
            else None
        )
        media_rows = (token_image_index > 0).unsqueeze(-1)
        return {
            int(index): CrossAttentionConditioning(block, media, attention_bias, media_rows, key_values[position])
            for position, (index, block) in enumerate(blocks.items())
        }

    # ----------------------------------------------------------------------------------------------------------------
    # Forward and generation

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_hidden_states: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        token_image_index: torch.LongTensor | None = None,
        cross_attention_states: torch.FloatTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> FlamingoCausalLMOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids; `<image>` tokens (`config.media_token_id`) mark where each image appears.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real tokens, 0 for padding (covering the cached tokens too when a cache is given).
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_images, channels, height, width)` or `(batch_size, num_images, num_frames, channels, height, width)`, *optional*):
                The images, in order of their `<image>` tokens; samples with fewer images are zero-padded at the end.
            image_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_images, num_latents, vision_hidden_size)`, *optional*):
                Precomputed Perceiver Resampler outputs (e.g. `outputs.image_hidden_states`), instead of
                `pixel_values`.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Targets for the language-modelling loss (shifted inside the language model); -100 is ignored.
            cache (`Cache`, *optional*):
                The language model's key/value cache (`past_key_values` is accepted too: its name before transformers
                5.24). It is passed to the language model under the name its `forward` takes.
            use_cache (`bool`, *optional*):
                Whether to return the updated cache.
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Positions, passed to the language model (`generate` derives them from a left-padded mask).
            token_image_index (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                For every token, the 1-based index of the image it attends to (with
                `only_attend_immediate_media=False`: of the last of the images it attends to); 0 for none. Defaults
                to the number of `<image>` tokens up to and including the token (OpenFlamingo's rule), which only
                holds for tokens that start their sequences: tokens continuing from a non-empty cache need it (e.g.
                `last_image_index[:, None].expand_as(input_ids)` to continue after prompts holding
                `last_image_index` images). `generate` passes it.
            cross_attention_states (`torch.FloatTensor` of shape `(batch_size, num_blocks, num_images * num_latents, 2 * xattn_heads * xattn_dim_head)`, *optional*):
                Precomputed keys and values of every gated block
                ([`~FlamingoForConditionalGeneration.get_cross_attention_states`] of `image_hidden_states`), instead
                of `pixel_values` or `image_hidden_states`: the blocks skip projecting the image latents.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
                Compute logits only for the last `logits_to_keep` positions (0: all), as transformers' causal LMs
                do; `generate` uses it to skip the prompt's logits.
            return_dict (`bool`, *optional*):
                Return a [`FlamingoCausalLMOutputWithPast`] (default) or a tuple.
            past_key_values (`Cache`, *optional*):
                The cache under its name before transformers 5.24; give it under one name only.
            **kwargs:
                Passed to the language model (e.g. `output_attentions`, `num_items_in_batch`).

        Returns:
            [`FlamingoCausalLMOutputWithPast`] or `tuple`.
        """
        if input_ids is None:
            raise ValueError(
                "FlamingoForConditionalGeneration needs `input_ids`: the `<image>` tokens in them decide which image "
                "each token attends to."
            )
        if kwargs.pop("inputs_embeds", None) is not None:
            raise ValueError("Pass `input_ids` only, not `inputs_embeds`.")
        cache = merge_cache_arguments(cache, past_key_values)
        if cross_attention_states is not None:
            if pixel_values is not None or image_hidden_states is not None:
                raise ValueError(
                    "Pass the images once: `pixel_values`, `image_hidden_states` or `cross_attention_states`."
                )
            cross_attention_states = self._resolve_cross_attention_states(input_ids, cross_attention_states)
            num_images = cross_attention_states.shape[2] // self.config.perceiver_num_latents
        else:
            image_hidden_states = self._resolve_image_hidden_states(input_ids, pixel_values, image_hidden_states)
            num_images = 0 if image_hidden_states is None else image_hidden_states.shape[1]
        token_image_index = self._token_image_index(input_ids, num_images, token_image_index, cache)
        conditioning = self._cross_attention_conditioning(
            token_image_index, image_hidden_states, cross_attention_states
        )
        if self.training and torch.is_grad_enabled():
            self._lm_hooks.check_gradient_checkpointing(self.language_model)
        if self._language_model_takes_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        kwargs[self._lm_cache_argument] = cache
        # The language model is not modified: the hooks apply `conditioning` to the calls this thread makes inside
        # the block. On CPU, its float32 products that autograd does not record run through oneDNN for the duration
        # of the call (see `cpu_kernels`); recorded ones (training) keep its kernels.
        with self._lm_hooks.conditioning(conditioning), onednn_linears_on(input_ids.device):
            lm_outputs = self.language_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                labels=labels,
                return_dict=True,
                **kwargs,
            )

        logits = lm_outputs.logits
        if not self._language_model_takes_logits_to_keep and isinstance(logits_to_keep, int) and logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        output = FlamingoCausalLMOutputWithPast(
            loss=lm_outputs.get("loss"),
            logits=logits,
            hidden_states=lm_outputs.get("hidden_states"),
            attentions=lm_outputs.get("attentions"),
            image_hidden_states=image_hidden_states,
            **{CACHE_NAME: cache_from_output(lm_outputs)},
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_hidden_states: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """Generates text conditioned on images, through the standard [`~GenerationMixin.generate`].

        The images are encoded, and every gated block's keys/values projected, once per call, before the batch is
        expanded for beams or `num_return_sequences` ([`~hf_flamingo.generation_flamingo.FlamingoGenerationImages`]).
        Every generated token attends to the last image of its prompt; an `<image>` token produced by generation
        does not start a new image. Everything else is transformers' `generate`: every decoding strategy, cache
        implementation and `torch.compile`.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): The prompts (left-padded).
            pixel_values (`torch.FloatTensor`, *optional*): The images, as in [`~FlamingoForConditionalGeneration.forward`].
            image_hidden_states (`torch.FloatTensor`, *optional*): Precomputed image latents instead of `pixel_values`.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): Padding mask.
            **kwargs: Generation arguments (`max_new_tokens`, `num_beams`, `do_sample`, `generation_config`, ...).

        Returns:
            `torch.LongTensor` or a [`~utils.ModelOutput`], as [`~GenerationMixin.generate`].
        """
        for name in ("cross_attention_states", "token_image_index"):
            if kwargs.get(name) is not None:
                raise ValueError(f"`generate` computes `{name}` itself: pass `pixel_values` or `image_hidden_states`.")
        images = kwargs.pop("flamingo_images", None)
        if images is None:
            if input_ids is None:
                raise ValueError("`generate` needs `input_ids` (the prompt, with its `<image>` tokens).")
            images = FlamingoGenerationImages(self, input_ids, pixel_values, image_hidden_states)
        elif pixel_values is not None or image_hidden_states is not None:
            raise ValueError("Pass the images as `pixel_values` or `image_hidden_states`, not with `flamingo_images`.")
        else:
            images.bind(self)  # an assistant model in assisted decoding gets the main model's arguments
        return super().generate(input_ids, attention_mask=attention_mask, flamingo_images=images, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        *args: Any,
        flamingo_images: FlamingoGenerationImages | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The inputs of one decoding step: the language model's own (its `prepare_inputs_for_generation`, so that
        its mask and position conventions apply, e.g. BLOOM's 2-D mask under a static cache) plus the image inputs
        of the tokens the step feeds.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): Every token so far.
            flamingo_images ([`~hf_flamingo.generation_flamingo.FlamingoGenerationImages`], *optional*):
                The call's images, which [`~FlamingoForConditionalGeneration.generate`] prepares.
            *args, **kwargs: As [`~GenerationMixin.prepare_inputs_for_generation`] of the installed transformers.
        """
        if flamingo_images is None and any(
            kwargs.get(name) is not None for name in ("pixel_values", "image_hidden_states")
        ):
            raise ValueError(
                "Generating with images goes through `FlamingoForConditionalGeneration.generate`, which prepares them "
                "once per call; `GenerationMixin.generate` alone would drop them after the prompt."
            )
        model_inputs = self.language_model.prepare_inputs_for_generation(input_ids, *args, **kwargs)
        if flamingo_images is not None:
            model_inputs.update(flamingo_images.step_inputs(self, input_ids, model_inputs["input_ids"].shape[1]))
        return model_inputs


def _causal_lm_from_config(text_config: PretrainedConfig) -> PreTrainedModel:
    # Language models bundled with this package are built directly, so that remote-code exports work without it.
    if text_config.model_type == MosaicGPTForCausalLM.config_class.model_type:
        return MosaicGPTForCausalLM._from_config(text_config)
    return AutoModelForCausalLM.from_config(text_config)


def _accepts_argument(module: nn.Module, argument: str) -> bool:
    return argument in inspect.signature(module.forward).parameters


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


__all__ = [
    "FlamingoCausalLMOutputWithPast",
    "FlamingoForConditionalGeneration",
    "FlamingoPreTrainedModel",
    "build_cross_attention_mask",
]
