"""The Perceiver Resampler: a fixed number of learned latents cross-attend to an image's (or video's) vision
features, `perceiver_depth` times, and become that image's tokens for the gated cross-attention blocks (OpenFlamingo
v2's `PerceiverResampler`, with its state-dict keys)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_flamingo import FlamingoConfig


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`(batch, length, heads * head_dim)` -> `(batch, heads, length, head_dim)`."""
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """`(batch, heads, length, head_dim)` -> `(batch, length, heads * head_dim)`."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


class FlamingoFeedForward(nn.Sequential):
    """`Linear(GELU(Linear(LayerNorm(x))))`, without biases; state-dict keys `0` (norm), `1` (up) and `3` (down)."""

    def __init__(self, dim: int, mult: int):
        inner_dim = dim * mult
        super().__init__(
            nn.LayerNorm(dim), nn.Linear(dim, inner_dim, bias=False), nn.GELU(), nn.Linear(inner_dim, dim, bias=False)
        )


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
        query = split_heads(self.to_q(latents), self.heads)
        key, value = self.to_kv(torch.cat((features, latents), dim=1)).chunk(2, dim=-1)
        attended = F.scaled_dot_product_attention(query, split_heads(key, self.heads), split_heads(value, self.heads))
        return self.to_out(merge_heads(attended))


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
