"""Attaches Flamingo's gated cross-attention to an unmodified causal language model.

This module is the only place that reaches into the language model. It finds the decoder layers, registers a forward
pre-hook on each layer that is preceded by a gated cross-attention block, and hands the per-forward conditioning to
those hooks. The language model's classes, modules and state-dict keys are never changed.

The conditioning of a forward pass is never stored on the language model's modules. `LanguageModelHooks.conditioning`
pushes it onto a stack private to the calling thread for the duration of the language model's call, and the hooks
read the top of that stack. Calls from several threads on one model therefore never see each other's images, and
the language model called on its own (no conditioning pushed in that thread) is the bare model. Gradient checkpointing
re-runs a layer's `forward` during backward, after the stack was popped; that is safe because transformers'
`GradientCheckpointingLayer` (every decoder layer of its causal LMs since 5.23) checkpoints `forward`, not `__call__`,
so the pre-hooks run once, outside the checkpoint. Language models that checkpoint their layers some other way are
refused (see `LanguageModelHooks.check_gradient_checkpointing`).
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

# Per thread: a stack of `{decoder layer index: CrossAttentionConditioning}`, one entry per active Flamingo forward.
_active = threading.local()


@dataclass
class CrossAttentionConditioning:
    """What a hooked decoder layer needs to run its gated cross-attention block for one forward pass.

    Args:
        block (`nn.Module`):
            The gated cross-attention block, looked up when the forward pass starts (so that a block replaced after
            construction, e.g. by PEFT's `modules_to_save`, is the one that runs).
        media (`torch.Tensor` of shape `(batch_size, num_images * num_latents, vision_hidden_size)`, *optional*):
            Flattened image latents from the Perceiver Resampler, projected to keys and values by the block; `None`
            when there are no images or when `key_values` are given.
        attention_bias (`torch.Tensor` of shape `(batch_size, 1, seq_len, num_keys)`, *optional*):
            Additive mask selecting, for every text token, the keys it may attend to; `None` when there is one image
            (or none).
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


def _active_conditionings() -> list[Mapping[int, CrossAttentionConditioning]]:
    stack = getattr(_active, "stack", None)
    if stack is None:
        stack = _active.stack = []
    return stack


def _cross_attention_pre_hook(
    layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, layer_index: int
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    stack = _active_conditionings()
    conditioning = stack[-1].get(layer_index) if stack else None
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


def _is_cross_attention_pre_hook(hook: Any) -> bool:
    return isinstance(hook, functools.partial) and hook.func is _cross_attention_pre_hook


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
            layer.register_forward_pre_hook(
                functools.partial(_cross_attention_pre_hook, layer_index=index), with_kwargs=True
            )
            self._hooked_layers[index] = layer

    def detach(self) -> None:
        """Removes the pre-hooks."""
        for layer in self._hooked_layers.values():
            for hook_id, hook in list(layer._forward_pre_hooks.items()):
                if _is_cross_attention_pre_hook(hook):
                    del layer._forward_pre_hooks[hook_id]
                    layer._forward_pre_hooks_with_kwargs.pop(hook_id, None)
        self._hooked_layers = {}

    @property
    def hooked_layers(self) -> Mapping[int, nn.Module]:
        return dict(self._hooked_layers)

    @contextmanager
    def conditioning(self, conditionings: Mapping[int, CrossAttentionConditioning]) -> Iterator[None]:
        """Makes the hooks apply `conditionings` (decoder layer index -> conditioning) to the language-model calls
        this thread makes inside the `with` block."""
        missing = sorted(set(self._hooked_layers) - set(conditionings))
        if missing:
            raise ValueError(f"No cross-attention conditioning for hooked decoder layers {missing}.")
        stack = _active_conditionings()
        stack.append(conditionings)
        try:
            yield
        finally:
            stack.pop()

    def check_gradient_checkpointing(self, language_model: nn.Module) -> None:
        """Refuses language models whose gradient checkpointing would re-run the pre-hooks during backward.

        transformers' `GradientCheckpointingLayer` checkpoints `forward`, so the hooks run once, in the forward
        pass. A layer checkpointed by other means (e.g. remote code calling `checkpoint(layer.__call__, ...)`) would
        re-run its hook during backward, when this forward's conditioning is gone, and compute different values.

        Raises:
            NotImplementedError: If `language_model` checkpoints and a hooked layer is not a
                `GradientCheckpointingLayer`.
        """
        if not any(getattr(module, "gradient_checkpointing", False) for module in language_model.modules()):
            return
        for index, layer in self._hooked_layers.items():
            if not isinstance(layer, GradientCheckpointingLayer):
                raise NotImplementedError(
                    f"Gradient checkpointing is on, but decoder layer {index} ({type(layer).__name__}) is not a "
                    "transformers `GradientCheckpointingLayer`: the language model would re-run the layer, and "
                    "Flamingo's cross-attention hook with it, during backward without the images. Use gradient "
                    "checkpointing only with language models whose layers subclass `GradientCheckpointingLayer`."
                )

    def __deepcopy__(self, memo: dict[int, Any]) -> LanguageModelHooks:
        # The copied model's layers carry copies of the hooks; map this object's layer references onto them.
        copied = LanguageModelHooks(self.layer_indices)
        copied.layers_path = self.layers_path
        copied._hooked_layers = {index: copy.deepcopy(layer, memo) for index, layer in self._hooked_layers.items()}
        return copied
