"""PEFT recipes for Flamingo: LoRA / QLoRA on the language model plus a fully trained bridge."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .modeling_flamingo import FlamingoForConditionalGeneration


def flamingo_lora_config(
    model: FlamingoForConditionalGeneration,
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    train_bridge: bool = True,
    train_new_token_embeddings: bool = False,
    **kwargs: Any,
):
    r"""
    Builds a `peft.LoraConfig` for a Flamingo: LoRA adapters on the language model only, and the Perceiver Resampler
    and every gated cross-attention block fully trained and saved with the adapter.

    The LoRA targets are a regular expression scoped to the language model (e.g.
    `r"language_model\..*\.(?:q_proj|v_proj)"`), so that same-named layers of the vision tower or of the bridge are
    never adapted. The bridge goes into `modules_to_save` block by block (`"perceiver"`,
    `"gated_cross_attn_layers.1"`, ...): PEFT trains a copy of each, the model's hooks run the copy, and
    `PeftModel.save_pretrained` stores them next to the adapter, so an adapter directory holds everything that was
    trained. Works the same on a quantized language model (QLoRA).

    Example:

    ```python
    >>> from peft import get_peft_model
    >>> model = FlamingoForConditionalGeneration.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    >>> peft_model = get_peft_model(model, flamingo_lora_config(model, r=16))
    >>> peft_model.print_trainable_parameters()
    ```

    Args:
        model ([`FlamingoForConditionalGeneration`]):
            The model to adapt (not yet wrapped by PEFT).
        r (`int`, *optional*, defaults to 8):
            LoRA rank.
        lora_alpha (`int`, *optional*, defaults to 16):
            LoRA scaling numerator.
        lora_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the LoRA input.
        target_modules (`Sequence[str]`, *optional*):
            Names (last component) of the language-model layers to adapt, e.g. `("q_proj", "v_proj")`. Defaults to
            PEFT's choice for the language model's `model_type`.
        train_bridge (`bool`, *optional*, defaults to `True`):
            Put the Perceiver Resampler and the gated cross-attention blocks in `modules_to_save`.
        train_new_token_embeddings (`bool`, *optional*, defaults to `False`):
            Also train the input-embedding rows of `<image>` and `<|endofchunk|>` (`trainable_token_indices`).
        **kwargs:
            Further `LoraConfig` arguments (e.g. `use_rslora=True`, `init_lora_weights=...`).

    Returns:
        `peft.LoraConfig`

    Raises:
        `ValueError`: If `target_modules` is not given and PEFT has no default for the language model, or if a name
            matches no layer of the language model.
    """
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    if not isinstance(model, FlamingoForConditionalGeneration):
        raise TypeError(
            f"`model` must be a FlamingoForConditionalGeneration (before `get_peft_model`), got {type(model).__name__}."
        )
    model_type = model.config.text_config.model_type
    if target_modules is None:
        target_modules = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if target_modules is None:
            raise ValueError(
                f"PEFT has no default LoRA target modules for language models of type {model_type!r}; pass "
                "`target_modules`, e.g. `target_modules=('q_proj', 'v_proj')`."
            )
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    target_modules = list(target_modules)
    if not target_modules:
        raise ValueError("`target_modules` must name at least one layer of the language model.")
    pattern = r"language_model\..*\.(?:" + "|".join(re.escape(name) for name in target_modules) + ")"
    found = {
        name.rsplit(".", 1)[-1]
        for name, _ in model.named_modules(prefix="")
        if re.fullmatch(pattern, name) is not None
    }
    missing = [name for name in target_modules if name not in found]
    if missing:
        raise ValueError(f"No layer of the language model is named {missing}; check `target_modules`.")

    modules_to_save = list(kwargs.pop("modules_to_save", None) or [])
    if train_bridge:
        modules_to_save += ["perceiver"] + [f"gated_cross_attn_layers.{key}" for key in model.gated_cross_attn_layers]
    if train_new_token_embeddings:
        token_ids = [i for i in (model.config.media_token_id, model.config.eoc_token_id) if i is not None]
        kwargs.setdefault("trainable_token_indices", token_ids)
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=pattern,
        modules_to_save=modules_to_save or None,
        **kwargs,
    )


__all__ = ["flamingo_lora_config"]
