"""Attaches Flamingo's gated cross-attention to an unmodified causal language model.

This module is the only place that reaches into the language model. It finds the decoder layers, registers a forward
pre-hook on each layer that is preceded by a gated cross-attention block, and hands the per-forward conditioning to
those hooks. The language model's classes, modules and state-dict keys are never changed.

The conditioning is stored on the hooked layer objects themselves (outside `nn.Module`'s registries) rather than in a
closure or a context variable: gradient checkpointing may re-run a layer, and with it its pre-hooks, during the
backward pass, after the Flamingo forward has returned, possibly on another thread.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_CONDITIONING_ATTR = "_flamingo_conditioning"


@dataclass
class CrossAttentionConditioning:
    """What a hooked decoder layer needs to run its gated cross-attention block for one forward pass.

    Args:
        block (`nn.Module`):
            The gated cross-attention block, looked up when the forward pass starts (so that a block replaced after
            construction, e.g. by PEFT's `modules_to_save`, is the one that runs).
        media (`torch.Tensor` of shape `(batch_size, num_images * num_latents, vision_hidden_size)`, *optional*):
            Flattened image latents from the Perceiver Resampler, projected to keys and values by the block; `None`
            when no token has an image to attend to or when `key_values` are given.
        attention_bias (`torch.Tensor` of shape `(batch_size, 1, seq_len, num_keys)`, *optional*):
            Additive mask selecting, for every text token, the keys it may attend to; `None` when all are allowed.
        media_rows (`torch.Tensor` of shape `(batch_size, seq_len, 1)`, *optional*):
            `True` for tokens that have an image to attend to; the others get exactly zero attention output.
        key_values (`torch.Tensor` of shape `(batch_size, num_keys, 2 * heads * head_dim)`, *optional*):
            The block's keys and values, precomputed (e.g. once per `generate` call).
    """

    block: nn.Module
    media: torch.Tensor | None = None
    attention_bias: torch.Tensor | None = None
    media_rows: torch.Tensor | None = None
    key_values: torch.Tensor | None = None

    def apply(self, hidden_states: torch.Tensor) -> torch.Tensor:
        device = hidden_states.device
        output = self.block(
            hidden_states,
            _to_device(self.media, device),
            _to_device(self.attention_bias, device),
            _to_device(self.media_rows, device),
            _to_device(self.key_values, device),
        )
        return output.to(device=device, dtype=hidden_states.dtype)


def _to_device(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return tensor if tensor is None else tensor.to(device, non_blocking=True)


def _cross_attention_pre_hook(
    layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    conditioning: CrossAttentionConditioning | None = layer.__dict__.get(_CONDITIONING_ATTR)
    if conditioning is None:
        return None
    if args:
        return (conditioning.apply(args[0]), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": conditioning.apply(kwargs["hidden_states"])}
    raise TypeError(
        f"{type(layer).__name__} was called without positional arguments and without a `hidden_states` keyword "
        f"(got keywords {sorted(kwargs)}); Flamingo cannot tell which input is the residual stream."
    )


def _resolve_module_path(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as error:
        raise ValueError(
            f"`decoder_layers_attr={path!r}` does not name a submodule of {type(root).__name__}: {error}"
        ) from None


def find_decoder_layers(
    language_model: nn.Module, num_layers: int | None = None, decoder_layers_attr: str | None = None
) -> tuple[str, nn.ModuleList]:
    """Finds the `nn.ModuleList` holding a causal language model's decoder layers.

    Without `decoder_layers_attr`, the candidates are the module lists of `num_layers` modules of a single class; when
    several qualify, the one whose layers hold the most parameters wins (decoder layers dwarf per-layer norms or
    adapters).

    Args:
        language_model (`nn.Module`): The causal language model.
        num_layers (`int`, *optional*): Number of decoder layers its config declares.
        decoder_layers_attr (`str`, *optional*): Explicit dotted path of the layer list, e.g. `"model.layers"`.

    Returns:
        `tuple[str, nn.ModuleList]`: The dotted path and the layer list.

    Raises:
        ValueError: If the layers cannot be found, or the explicit path does not name a list of `num_layers` modules.
    """
    if decoder_layers_attr:
        layers = _resolve_module_path(language_model, decoder_layers_attr)
        if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
            raise ValueError(
                f"`decoder_layers_attr={decoder_layers_attr!r}` names a {type(layers).__name__}, expected the "
                "nn.ModuleList of decoder layers."
            )
        if num_layers is not None and len(layers) != num_layers:
            raise ValueError(
                f"`decoder_layers_attr={decoder_layers_attr!r}` holds {len(layers)} modules but the language model "
                f"config declares {num_layers} layers."
            )
        return decoder_layers_attr, layers

    candidates = []
    for name, module in language_model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if num_layers is not None and len(module) != num_layers:
            continue
        if len({type(layer) for layer in module}) != 1:
            continue
        params_per_layer = sum(p.numel() for p in module[0].parameters())
        candidates.append((params_per_layer, name, module))
    candidates.sort(key=lambda candidate: candidate[0], reverse=True)
    if candidates and (len(candidates) == 1 or candidates[0][0] > candidates[1][0]):
        _, name, module = candidates[0]
        return name, module

    found = ", ".join(f"{name!r}" for _, name, _ in candidates) or "none"
    raise ValueError(
        f"Could not find the decoder layers of {type(language_model).__name__}: expected exactly one nn.ModuleList "
        f"of {num_layers if num_layers is not None else 'N'} identical layers, found candidates: {found}. Set the "
        "path explicitly with `FlamingoConfig(decoder_layers_attr=...)` (e.g. `decoder_layers_attr='model.layers'`, "
        "relative to the language model), or pass `decoder_layers_attr=...` to `from_backbones`."
    )


class LanguageModelHooks:
    """Owns the forward pre-hooks that run gated cross-attention blocks in front of decoder layers.

    Args:
        layer_indices (`list[int]`): 0-based indices of the decoder layers preceded by a cross-attention block.
    """

    def __init__(self, layer_indices: list[int]):
        self.layer_indices = list(layer_indices)
        self.layers_path: str | None = None
        self._hooked_layers: dict[int, nn.Module] = {}

    def attach(
        self, language_model: nn.Module, num_layers: int | None = None, decoder_layers_attr: str | None = None
    ) -> None:
        """Registers the pre-hooks on `language_model`'s decoder layers, replacing any earlier attachment."""
        self.detach()
        self.layers_path, layers = find_decoder_layers(language_model, num_layers, decoder_layers_attr)
        out_of_range = [i for i in self.layer_indices if i >= len(layers)]
        if out_of_range:
            raise ValueError(
                f"Cross-attention layer indices {out_of_range} are out of range for {len(layers)} decoder layers."
            )
        for index in self.layer_indices:
            layer = layers[index]
            layer.register_forward_pre_hook(_cross_attention_pre_hook, with_kwargs=True)
            self._hooked_layers[index] = layer

    def detach(self) -> None:
        """Removes the pre-hooks and any stored conditioning."""
        for layer in self._hooked_layers.values():
            for hook_id, hook in list(layer._forward_pre_hooks.items()):
                if hook is _cross_attention_pre_hook:
                    del layer._forward_pre_hooks[hook_id]
                    layer._forward_pre_hooks_with_kwargs.pop(hook_id, None)
            layer.__dict__.pop(_CONDITIONING_ATTR, None)
        self._hooked_layers = {}

    @property
    def hooked_layers(self) -> Mapping[int, nn.Module]:
        return dict(self._hooked_layers)

    def layers_rerun_pre_hooks_in_backward(self) -> bool:
        """Whether checkpointed layers re-run their pre-hooks when recomputed during backward.

        That happens when gradient checkpointing wraps the layers' `__call__` (transformers <= 5.18); from 5.23 it
        wraps `forward`, and the hooks stay outside the checkpoint.
        """
        return any(
            getattr(layer, "gradient_checkpointing", False) and type(layer).__call__ is not nn.Module.__call__
            for layer in self._hooked_layers.values()
        )

    def set_conditioning(self, conditionings: Mapping[int, CrossAttentionConditioning]) -> None:
        """Stores each layer's conditioning for the coming forward pass (overwriting the previous one)."""
        for index, layer in self._hooked_layers.items():
            # object.__setattr__ keeps the state out of nn.Module's parameter/buffer/submodule registries.
            object.__setattr__(layer, _CONDITIONING_ATTR, conditionings[index])

    def clear_conditioning(self) -> None:
        """Forgets the stored conditioning, so that calling the language model alone runs the bare model."""
        for layer in self._hooked_layers.values():
            layer.__dict__.pop(_CONDITIONING_ATTR, None)

    def __deepcopy__(self, memo: dict[int, Any]) -> LanguageModelHooks:
        # The copied model's layers carry copies of the hooks; map this object's layer references onto them.
        copied = LanguageModelHooks(self.layer_indices)
        copied.layers_path = self.layers_path
        copied._hooked_layers = {index: copy.deepcopy(layer, memo) for index, layer in self._hooked_layers.items()}
        return copied
