"""The tanh-gated cross-attention block that runs in front of a language-model decoder layer: text tokens attend to
the image latents (masked so that each token sees its image), then a gated feed-forward (OpenFlamingo v2's
`GatedCrossAttentionBlock`, with its state-dict keys). Gates start closed (0), so a new block is the identity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_flamingo import FlamingoConfig
from .perceiver import FlamingoFeedForward, merge_heads, split_heads


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
        query = split_heads(self.to_q(self.norm(hidden_states)), self.heads)
        key, value = key_values.chunk(2, dim=-1)
        attended = F.scaled_dot_product_attention(
            query,
            split_heads(key, self.heads),
            split_heads(value, self.heads),
            attn_mask=None if attention_bias is None else attention_bias.to(query.dtype),
        )
        return self.to_out(merge_heads(attended))


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
        return self.attn.to_kv(media.to(self.attn.to_kv.weight.dtype))

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
