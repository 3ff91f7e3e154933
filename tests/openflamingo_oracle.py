"""The test oracle: real OpenFlamingo 2.0.1 models built from local objects, and checkpoints saved its way.

OpenFlamingo's factory downloads CLIP and the LM, so `build_openflamingo` follows its steps with a tiny open_clip ViT
and a given tiny LM instead. Under transformers 5 OpenFlamingo needs three small runtime patches (see
`patch_openflamingo_for_transformers5`); nothing in site-packages is edited, and nothing here touches hf_flamingo.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import types
from typing import Any

import open_clip
import torch
from open_flamingo.src.flamingo import Flamingo
from open_flamingo.src.flamingo_lm import FlamingoLayer, FlamingoLMMixin
from open_flamingo.src.utils import extend_instance

TINY_OPEN_CLIP_NAME = "ViT-Tiny-OpenFlamingo-Oracle"
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}

_original_lm_forward = FlamingoLMMixin.forward
_patched = False


def register_tiny_open_clip() -> dict[str, Any]:
    """Registers the tiny ViT under `TINY_OPEN_CLIP_NAME` (open_clip's public `add_model_config`) and returns it."""
    if TINY_OPEN_CLIP_NAME not in open_clip.list_models():
        directory = tempfile.mkdtemp(prefix="open_clip_configs_")
        with open(os.path.join(directory, f"{TINY_OPEN_CLIP_NAME}.json"), "w") as file:
            json.dump(TINY_OPEN_CLIP_CONFIG, file)
        open_clip.add_model_config(directory)
    return open_clip.get_model_config(TINY_OPEN_CLIP_NAME)


def _lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
    # transformers 5 `generate` omits an all-ones attention mask, and builds left-padding-aware position ids only
    # for models whose forward signature names `position_ids`.
    parameters = _base_forward_parameters(self)
    if position_ids is not None and "position_ids" in parameters:
        kwargs["position_ids"] = position_ids
    # transformers 5.24 renamed the cache argument to `cache`; OpenFlamingo passes it (often as None) under the old
    # name, which the language model now warns about.
    if "past_key_values" in kwargs and "past_key_values" not in parameters:
        legacy_cache = kwargs.pop("past_key_values")
        if legacy_cache is not None:
            kwargs["cache"] = legacy_cache
    return _original_lm_forward(self, input_ids, attention_mask, **kwargs)


def _base_forward_parameters(lm: torch.nn.Module) -> set[str]:
    import inspect

    base_class = type(lm).__mro__[2]  # (extended class, FlamingoLMMixin, the LM's own class, ...)
    return set(inspect.signature(base_class.forward).parameters)


def _layer_forward(self, lang_x, *args, **kwargs):
    # transformers 5 calls some decoder layers (GPT-2) with extra positional arguments.
    if self.gated_cross_attn_layer is not None:
        if self.vis_x is None or self.media_locations is None:
            raise ValueError("vis_x and media_locations must be conditioned before the forward pass")
        lang_x = self.gated_cross_attn_layer(
            lang_x, self.vis_x, media_locations=self.media_locations, use_cached_media=self.use_cached_media
        )
    return self.decoder_layer(lang_x, *args, **kwargs)


def patch_openflamingo_for_transformers5() -> None:
    """Makes OpenFlamingo 2.0.1 run under transformers 5 (idempotent)."""
    global _patched
    if not _patched:
        FlamingoLMMixin.forward = _lm_forward
        FlamingoLayer.forward = _layer_forward
        _patched = True


def add_openflamingo_special_tokens(tokenizer: Any) -> tuple[int, int]:
    """OpenFlamingo's factory: `<|endofchunk|>`, `<image>`, then `<PAD>` if there is no pad token.

    Returns:
        `(eoc_token_id, media_token_id)`, read back as the factory does (last id of each encoding).
    """
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    return tokenizer.encode("<|endofchunk|>")[-1], tokenizer.encode("<image>")[-1]


def build_openflamingo(
    language_model: torch.nn.Module,
    tokenizer: Any,
    *,
    decoder_layers_attr: str,
    cross_attn_every_n_layers: int,
    seed: int = 0,
    clip_model_name: str = TINY_OPEN_CLIP_NAME,
    train_input_embeddings: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[Flamingo, Any]:
    """Builds a real OpenFlamingo `Flamingo` around `language_model` (modified in place, as OpenFlamingo does).

    The open_clip tower (random weights; by default the tiny registered ViT) returns its patch tokens before
    `ln_post` (`final_ln_after_pool=True`), as the released models were trained. Gates are opened to random non-zero
    values and the Flamingo LayerNorms randomised, so every parameter matters. `train_input_embeddings` is the
    factory's `not freeze_lm_embeddings`. The new modules (tower, perceiver, cross-attention blocks) are created on
    `device`, where `language_model` must already be.

    Returns:
        `(flamingo, clip_model)`; `tokenizer` gains OpenFlamingo's special tokens.
    """
    patch_openflamingo_for_transformers5()
    if clip_model_name == TINY_OPEN_CLIP_NAME:
        register_tiny_open_clip()
    torch.manual_seed(seed)
    with torch.device(device):
        clip_model = open_clip.create_model(clip_model_name, pretrained=None, device=device)
    clip_model.visual.output_tokens = True
    clip_model.visual.final_ln_after_pool = True
    _randomize_layer_norms(clip_model.visual, seed + 1)

    eoc_token_id, media_token_id = add_openflamingo_special_tokens(tokenizer)
    extend_instance(language_model, FlamingoLMMixin)
    language_model.set_decoder_layers_attr_name(decoder_layers_attr)
    language_model.resize_token_embeddings(len(tokenizer))
    with torch.device(device):
        flamingo = Flamingo(
            clip_model,
            language_model,
            eoc_token_id,
            media_token_id,
            vis_dim=clip_model.visual.transformer.width,
            cross_attn_every_n_layers=cross_attn_every_n_layers,
        )
    # The factory's freezing (freeze_lm_embeddings=False).
    flamingo.requires_grad_(False)
    flamingo.perceiver.requires_grad_(True)
    flamingo.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    flamingo.lang_encoder.get_input_embeddings().requires_grad_(train_input_embeddings)

    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for block in flamingo.lang_encoder.gated_cross_attn_layers:
            if block is not None:
                for gate in (block.attn_gate, block.ff_gate):
                    sign = 1.0 if torch.rand((), generator=generator) > 0.5 else -1.0
                    gate.fill_(sign * (0.5 + torch.rand((), generator=generator).item()))
    _randomize_layer_norms(flamingo.perceiver, seed + 3)
    _randomize_layer_norms(flamingo.lang_encoder.gated_cross_attn_layers, seed + 4)
    return flamingo.eval(), clip_model


def _randomize_layer_norms(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer_norm in (m for m in module.modules() if isinstance(m, torch.nn.LayerNorm)):
            layer_norm.weight.copy_(1 + 0.2 * torch.randn(layer_norm.weight.shape, generator=generator))
            layer_norm.bias.copy_(0.2 * torch.randn(layer_norm.bias.shape, generator=generator))


def _training_utils():
    # `open_flamingo.train.train_utils` imports wandb at module level for logging; its checkpoint filter does not
    # use it, so an empty stand-in module is enough.
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))
    from open_flamingo.train import train_utils

    return train_utils


def openflamingo_state_dict(flamingo: Flamingo, layout: str = "trainable") -> dict[str, torch.Tensor]:
    """The state dict OpenFlamingo's training code writes.

    Args:
        layout: `"trainable"` — DDP training (`train_utils.filter_state_dict_to_trainable`: trainable parameters and
            every `embed` tensor, aliases and the vision encoder removed; the 3B and 9B releases);
            `"full_language_model"` — an unfiltered FSDP dump without the vision encoder, alias keys included (the
            4B releases); `"full"` — the unfiltered `state_dict()` including the open_clip vision encoder.
    """
    state_dict = flamingo.state_dict()
    if layout == "trainable":
        return _training_utils().filter_state_dict_to_trainable(flamingo, state_dict)
    if layout == "full_language_model":
        return {k: v for k, v in state_dict.items() if not k.startswith("vision_encoder.")}
    if layout == "full":
        return dict(state_dict)
    raise ValueError(f"unknown layout {layout!r}")


def save_openflamingo_checkpoint(flamingo: Flamingo, path: str | os.PathLike, layout: str = "trainable") -> None:
    """`torch.save`s the state dict as the released `checkpoint.pt` files are stored (a flat dict of tensors)."""
    torch.save(openflamingo_state_dict(flamingo, layout), path)
