"""PyTorch MosaicGPT: MosaicML's pre-MPT decoder (`model_type: "mosaic_gpt"`), the language model of OpenFlamingo-3B.

Module and parameter names are those of the remote code (`transformer.wte`, `transformer.blocks.{i}.ln_1`,
`.attn.Wqkv`, `.attn.q_ln`, `.attn.k_ln`, `.attn.out_proj`, `.ln_2`, `.mlp.mlp_up`, `.mlp.mlp_down`, `transformer.ln_f`),
so its checkpoints load without renaming. `lm_head` is tied to `transformer.wte` and never stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .cache_compat import CACHE_NAME, LEGACY_CACHE_NAME, cache_from_output, merge_cache_arguments
from .configuration_mosaic_gpt import MosaicGPTConfig


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8, device: torch.device | str | None = None) -> torch.Tensor:
    """ALiBi slopes of MosaicGPT: `2 ** (-h * alibi_bias_max / n_heads)` for heads `h = 1 ... n_heads`.

    This is the construction of the MosaicGPT code MPT-1B was trained with (mosaicml/examples v0.0.4) for every
    `n_heads`; it differs from the later MPT one (transformers' `MptModel`) when `n_heads` is not a power of two.

    Returns:
        `torch.Tensor` of shape `(n_heads,)`, float32.
    """
    exponents = torch.arange(1, n_heads + 1, dtype=torch.float32, device=device) * (alibi_bias_max / n_heads)
    return 1.0 / torch.pow(2.0, exponents)


def alibi_bias(
    n_heads: int, kv_length: int, alibi_bias_max: float = 8, device: torch.device | str | None = None
) -> torch.Tensor:
    """ALiBi attention bias `slope_h * (j - (kv_length - 1))` for key position `j`, the same for every query.

    Softmax is invariant to a per-row shift, so this equals the usual `-slope_h * (i - j)` on every causal row.

    Returns:
        `torch.Tensor` of shape `(1, n_heads, 1, kv_length)`, float32.
    """
    offsets = torch.arange(1 - kv_length, 1, dtype=torch.float32, device=device)
    return alibi_slopes(n_heads, alibi_bias_max, device).view(1, n_heads, 1, 1) * offsets.view(1, 1, 1, kv_length)


class MosaicGPTLayerNorm(nn.LayerNorm):
    """LayerNorm (eps 1e-5) that, with `low_precision=True` and autocast enabled, runs in the autocast dtype.

    This is the remote code's `LPLayerNorm`: input, weight and bias are cast to the autocast dtype and the norm is
    computed with autocast disabled (a plain `nn.LayerNorm` would be computed in float32 under autocast). Outside
    autocast both are the same plain LayerNorm.

    Args:
        hidden_size (`int`): Width of the normalised dimension.
        bias (`bool`, *optional*, defaults to `True`): Whether the norm has a bias.
        low_precision (`bool`, *optional*, defaults to `False`): Whether to run in the autocast dtype.
    """

    def __init__(self, hidden_size: int, bias: bool = True, low_precision: bool = False):
        super().__init__(hidden_size, eps=1e-5, bias=bias)
        self.low_precision = low_precision

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        device_type = hidden_states.device.type
        if not (self.low_precision and torch.is_autocast_enabled(device_type)):
            return super().forward(hidden_states)
        dtype = torch.get_autocast_dtype(device_type)
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        with torch.autocast(device_type=device_type, enabled=False):
            return F.layer_norm(hidden_states.to(dtype), self.normalized_shape, weight, bias, self.eps)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with an additive bias.

    Args:
        query (`torch.Tensor` of shape `(batch_size, num_heads, query_length, head_dim)`): Queries.
        key (`torch.Tensor` of shape `(batch_size, num_heads, kv_length, head_dim)`): Keys.
        value (`torch.Tensor` of shape `(batch_size, num_heads, kv_length, head_dim)`): Values.
        attention_mask (`torch.Tensor` broadcastable to `(batch_size, num_heads, query_length, kv_length)`):
            Additive bias (ALiBi, and the dtype's minimum where attention is not allowed).
        scaling (`float`): Logit scale.
        dropout (`float`, *optional*, defaults to 0.0): Dropout on the attention probabilities.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: The output, of shape `(batch_size, query_length, num_heads, head_dim)`,
        and the attention probabilities, of shape `(batch_size, num_heads, query_length, kv_length)`.
    """
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class MosaicGPTAttention(nn.Module):
    """Multi-head self-attention with a fused `Wqkv` projection and optional LayerNorms on the full-width q and k."""

    def __init__(self, config: MosaicGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.scaling = (
            config.softmax_scale
            if config.softmax_scale is not None
            else 1 / math.sqrt(config.d_model / config.n_heads)
        )
        self.clip_qkv = config.attn_clip_qkv
        self.attention_dropout = config.attn_pdrop
        self.is_causal = True

        bias = not config.no_bias
        self.Wqkv = nn.Linear(config.d_model, 3 * config.d_model, bias=bias)
        if config.attn_qk_ln:
            self.q_ln = MosaicGPTLayerNorm(config.d_model, bias=bias, low_precision=config.low_precision_layernorm)
            self.k_ln = MosaicGPTLayerNorm(config.d_model, bias=bias, low_precision=config.low_precision_layernorm)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, query_length, d_model)`): Normalised inputs.
            attention_mask (`torch.Tensor` of shape `(batch_size, num_heads or 1, query_length, kv_length)`):
                Additive attention bias built by [`MosaicGPTModel`].
            cache (`Cache`, *optional*): Key/value cache, updated in place.

        Returns:
            `tuple[torch.Tensor, torch.Tensor | None]`: The output, of shape `(batch_size, query_length, d_model)`,
            and the attention probabilities (eager attention only).
        """
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, self.num_heads, self.head_dim)

        qkv = self.Wqkv(hidden_states)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        query, key, value = qkv.chunk(3, dim=-1)
        if self.config.attn_qk_ln:
            query = self.q_ln(query).to(qkv.dtype)
            key = self.k_ln(key).to(qkv.dtype)

        query = query.view(hidden_shape).transpose(1, 2)
        key = key.view(hidden_shape).transpose(1, 2)
        value = value.view(hidden_shape).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.out_proj(attn_output), attn_weights


class MosaicGPTMLP(nn.Module):
    """`mlp_down(GELU(mlp_up(x)))` with the exact (erf) GELU."""

    def __init__(self, config: MosaicGPTConfig):
        super().__init__()
        bias = not config.no_bias
        self.mlp_up = nn.Linear(config.d_model, config.mlp_ratio * config.d_model, bias=bias)
        self.mlp_act = nn.GELU(approximate="none")
        self.mlp_down = nn.Linear(config.mlp_ratio * config.d_model, config.d_model, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.mlp_down(self.mlp_act(self.mlp_up(hidden_states)))


class MosaicGPTBlock(GradientCheckpointingLayer):
    """Pre-LayerNorm decoder block: `x + drop(attn(ln_1(x)))`, then `x + drop(mlp(ln_2(x)))`."""

    def __init__(self, config: MosaicGPTConfig, layer_idx: int):
        super().__init__()
        bias = not config.no_bias
        self.ln_1 = MosaicGPTLayerNorm(config.d_model, bias=bias, low_precision=config.low_precision_layernorm)
        self.attn = MosaicGPTAttention(config, layer_idx)
        self.ln_2 = MosaicGPTLayerNorm(config.d_model, bias=bias, low_precision=config.low_precision_layernorm)
        self.mlp = MosaicGPTMLP(config)
        self.resid_attn_dropout = nn.Dropout(config.resid_pdrop)
        self.resid_mlp_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, query_length, d_model)`): The residual stream.
            attention_mask (`torch.Tensor` of shape `(batch_size, num_heads or 1, query_length, kv_length)`):
                Additive attention bias built by [`MosaicGPTModel`].
            cache (`Cache`, *optional*): Key/value cache, updated in place. [`MosaicGPTModel`] passes it under the
                installed transformers' name (`cache`, or `past_key_values` before 5.24), the one transformers'
                gradient checkpointing drops.
            use_cache (`bool`, *optional*): Unused; the cache is updated whenever it is given.
            past_key_values (`Cache`, *optional*): The cache under its name before transformers 5.24.

        Returns:
            `torch.Tensor` of shape `(batch_size, query_length, d_model)`: The updated residual stream.
        """
        cache = merge_cache_arguments(cache, past_key_values)
        attn_output, _ = self.attn(self.ln_1(hidden_states), attention_mask=attention_mask, cache=cache, **kwargs)
        hidden_states = hidden_states + self.resid_attn_dropout(attn_output)
        return hidden_states + self.resid_mlp_dropout(self.mlp(self.ln_2(hidden_states)))


class MosaicGPTPreTrainedModel(PreTrainedModel):
    config_class = MosaicGPTConfig
    config: MosaicGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MosaicGPTBlock"]
    _skip_keys_device_placement = [CACHE_NAME, LEGACY_CACHE_NAME]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_record_outputs = {"hidden_states": MosaicGPTBlock, "attentions": MosaicGPTAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)


class MosaicGPTModel(MosaicGPTPreTrainedModel):
    """The MosaicGPT decoder without the output projection (the remote code's `transformer` module dict).

    Args:
        config ([`MosaicGPTConfig`]): Model configuration.
    """

    def __init__(self, config: MosaicGPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        if not config.alibi:
            self.wpe = nn.Embedding(config.max_seq_len, config.d_model)
        self.emb_drop = nn.Dropout(config.emb_pdrop)
        self.blocks = nn.ModuleList([MosaicGPTBlock(config, layer_idx) for layer_idx in range(config.n_layers)])
        self.ln_f = MosaicGPTLayerNorm(
            config.d_model, bias=not config.no_bias, low_precision=config.low_precision_layernorm
        )
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def _position_ids(
        self, attention_mask: torch.Tensor | None, past_length: int, query_length: int, device: torch.device
    ) -> torch.Tensor:
        """Positions for the learned position embedding, counting only non-padding tokens (as the remote code)."""
        if attention_mask is None:
            return torch.arange(past_length, past_length + query_length, device=device).unsqueeze(0)
        positions = attention_mask.to(device=device, dtype=torch.long).cumsum(-1) - 1
        return positions[:, -query_length:].clamp(min=0)

    def _attention_bias(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None
    ) -> torch.Tensor:
        """Additive attention bias: ALiBi where attention is allowed (causal and not padding), the dtype's minimum
        elsewhere.

        Returns:
            `torch.Tensor` of shape `(batch_size, n_heads or 1, query_length, kv_length)` in `inputs_embeds.dtype`.
        """
        allowed = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            allow_is_causal_skip=False,
            **{CACHE_NAME: cache},
        )
        if allowed.dtype != torch.bool:
            allowed = allowed == 0
        dtype, device, kv_length = inputs_embeds.dtype, inputs_embeds.device, allowed.shape[-1]
        if self.config.alibi:
            bias = alibi_bias(self.config.n_heads, kv_length, self.config.alibi_bias_max, device).to(dtype)
        else:
            bias = torch.zeros((), dtype=dtype, device=device)
        return torch.where(allowed.to(device), bias, torch.finfo(dtype).min)

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, query_length)`, *optional*): Token ids.
            attention_mask (`torch.Tensor` of shape `(batch_size, kv_length)`, *optional*):
                1 for tokens to attend to, 0 for padding, over the cached and the new tokens.
            position_ids (`torch.LongTensor` of shape `(batch_size, query_length)`, *optional*):
                Only used by the learned position embedding (`alibi=False`); defaults to positions counted over the
                non-padding tokens. ALiBi needs no positions.
            cache (`Cache`, *optional*): Key/value cache of the previous tokens.
            inputs_embeds (`torch.Tensor` of shape `(batch_size, query_length, d_model)`, *optional*):
                Token embeddings, instead of `input_ids`.
            use_cache (`bool`, *optional*): Whether to create and return a `DynamicCache` if none is given.
            past_key_values (`Cache`, *optional*): The cache under its name before transformers 5.24.

        Returns:
            [`BaseModelOutputWithPast`]: `last_hidden_state` of shape `(batch_size, query_length, d_model)` (after
            `ln_f`) and the cache (under the installed transformers' name for it).
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        cache = merge_cache_arguments(cache, past_key_values)
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        hidden_states = inputs_embeds
        if not self.config.alibi:
            past_length = cache.get_seq_length() if cache is not None else 0
            query_length = inputs_embeds.shape[1]
            if past_length + query_length > self.config.max_seq_len:
                raise ValueError(
                    f"Sequence length {past_length + query_length} exceeds `max_seq_len` ({self.config.max_seq_len}) "
                    "of the learned position embedding."
                )
            if position_ids is None:
                position_ids = self._position_ids(attention_mask, past_length, query_length, inputs_embeds.device)
            hidden_states = hidden_states + self.wpe(position_ids)
        if self.config.embedding_fraction != 1:
            fraction = self.config.embedding_fraction
            hidden_states = hidden_states * fraction + hidden_states.detach() * (1 - fraction)
        hidden_states = self.emb_drop(hidden_states)

        attention_bias = self._attention_bias(inputs_embeds, attention_mask, cache)
        for block in self.blocks:
            hidden_states = block(
                hidden_states, attention_mask=attention_bias, use_cache=use_cache, **{CACHE_NAME: cache}, **kwargs
            )
        hidden_states = self.ln_f(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_NAME: cache})


class MosaicGPTForCausalLM(MosaicGPTPreTrainedModel, GenerationMixin):
    """MosaicGPT with its output projection: logits are `ln_f(x) @ wte.weight.T` (times `logit_scale` if set).

    `lm_head` shares its weight with `transformer.wte`; checkpoints of the remote code (which have no `lm_head` key)
    load without missing keys.

    Args:
        config ([`MosaicGPTConfig`]): Model configuration.
    """

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: MosaicGPTConfig):
        super().__init__(config)
        self.transformer = MosaicGPTModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.logit_scale == "inv_sqrt_d_model":
            self.logit_scale = 1 / math.sqrt(config.d_model)
        else:
            self.logit_scale = config.logit_scale
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, query_length)`, *optional*): Token ids.
            attention_mask (`torch.Tensor` of shape `(batch_size, kv_length)`, *optional*):
                1 for tokens to attend to, 0 for padding, over the cached and the new tokens.
            position_ids (`torch.LongTensor` of shape `(batch_size, query_length)`, *optional*):
                Only used by the learned position embedding (`alibi=False`).
            cache (`Cache`, *optional*): Key/value cache of the previous tokens.
            inputs_embeds (`torch.Tensor` of shape `(batch_size, query_length, d_model)`, *optional*):
                Token embeddings, instead of `input_ids`.
            labels (`torch.LongTensor` of shape `(batch_size, query_length)`, *optional*):
                Targets for the next-token loss; they are shifted inside the model, `-100` is ignored.
            use_cache (`bool`, *optional*): Whether to return the key/value cache.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
                If an `int`, compute logits for the last `logits_to_keep` positions only (0 keeps all); if a 1D
                tensor, the sequence positions to keep.
            past_key_values (`Cache`, *optional*): The cache under its name before transformers 5.24.
            kwargs: Passed to the loss (e.g. `num_items_in_batch`) and the attention implementation.

        Returns:
            [`CausalLMOutputWithPast`]: `logits` of shape `(batch_size, kept_length, vocab_size)`, `loss` when
            `labels` are given, and the cache (under the installed transformers' name for it).
        """
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=merge_cache_arguments(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            **{CACHE_NAME: cache_from_output(outputs)},
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["MosaicGPTForCausalLM", "MosaicGPTModel", "MosaicGPTPreTrainedModel"]
