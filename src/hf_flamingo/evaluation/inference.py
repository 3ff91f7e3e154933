"""The two model calls of evaluation, through the model's public API: `generate` for captioning and VQA, and the
mean log-likelihood of each class name for rank classification."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch
from PIL import Image
from transformers.cache_utils import Cache

from ..cache_compat import cache_from_output
from ..generation_flamingo import FlamingoGenerationImages
from .prompts import GenerationSettings

__all__ = ["autocast_for", "class_log_likelihoods", "generate_batch"]


def autocast_for(model: torch.nn.Module, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the model's device for `"amp_bf16"`, nothing for `"fp32"`."""
    if precision != "amp_bf16":
        return contextlib.nullcontext()
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


@torch.no_grad()
def generate_batch(
    model,
    processor,
    texts: list[str],
    images: list[list[Image.Image]],
    settings: GenerationSettings,
    precision: str = "fp32",
) -> list[str]:
    """Generates a continuation of each prompt, like OpenFlamingo's `get_outputs` (stops at `<|endofchunk|>`).

    Args:
        model (`FlamingoForConditionalGeneration`): The model.
        processor (`FlamingoProcessor`): Its processor (pads on the left).
        texts (`list[str]`): The prompts, one `<image>` per image.
        images (`list[list[PIL.Image.Image]]`): The images of each prompt.
        settings (`GenerationSettings`): Beams, lengths, length penalty.
        precision (`str`, defaults to `"fp32"`): `"fp32"` or `"amp_bf16"`.

    Returns:
        `list[str]`: The decoded new tokens of each prompt (special tokens skipped).
    """
    device = next(model.parameters()).device
    inputs = processor(images=images, text=texts, return_tensors="pt", padding_side="left").to(device)
    with autocast_for(model, precision):
        output_ids = model.generate(
            **inputs,
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=settings.min_new_tokens,
            num_beams=settings.num_beams,
            length_penalty=settings.length_penalty,
            do_sample=False,
            eos_token_id=processor.eoc_token_id,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    return processor.batch_decode(output_ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def class_log_likelihoods(
    model,
    processor,
    texts: list[str],
    images: list[list[Image.Image]],
    class_names: Sequence[str],
    use_cache: bool = True,
    precision: str = "fp32",
) -> torch.Tensor:
    """Mean per-token log-probability of each class name appended to each prompt (OpenFlamingo's rank classification).

    The class name is tokenised on its own (no special tokens) and appended to the prompt. The images are prepared
    once, as `generate` prepares them ([`~hf_flamingo.generation_flamingo.FlamingoGenerationImages`]: class-name
    tokens attend to the prompt's last image). With `use_cache`, the prompt minus its last token runs once and every
    class name continues from its cache (cropped back afterwards, or a copy for caches that cannot be cropped
    exactly); the result is the same as one full forward per class name.

    Args:
        model (`FlamingoForConditionalGeneration`): The model.
        processor (`FlamingoProcessor`): Its processor.
        texts (`list[str]`): The prompts (ending where the class name goes).
        images (`list[list[PIL.Image.Image]]`): The images of each prompt.
        class_names (`Sequence[str]`): The candidate names.
        use_cache (`bool`, defaults to True): Reuse the prompt's KV cache across class names.
        precision (`str`, defaults to `"fp32"`): `"fp32"` or `"amp_bf16"`.

    Returns:
        `torch.FloatTensor` of shape `(batch, num_classes)`.
    """
    device = next(model.parameters()).device
    name_ids = [_class_name_ids(processor.tokenizer, name).to(device) for name in class_names]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding_side="left").to(device)
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    scores = torch.empty(input_ids.shape[0], len(class_names))
    with autocast_for(model, precision):
        prompt_images = FlamingoGenerationImages(model, input_ids, pixel_values=inputs.get("pixel_values"))
        prompt_cache = _prompt_cache(model, prompt_images, input_ids, attention_mask) if use_cache else None
        for index, ids in enumerate(name_ids):
            full_ids = torch.cat([input_ids, ids.expand(input_ids.shape[0], -1)], dim=1)
            full_mask = torch.cat([attention_mask, torch.ones_like(full_ids[:, input_ids.shape[1] :])], dim=1)
            num_fed = ids.shape[1] + 1 if use_cache else full_ids.shape[1]
            logits = _continuation_logits(model, prompt_images, full_ids, full_mask, num_fed, prompt_cache)
            log_probs = torch.log_softmax(logits[:, -ids.shape[1] - 1 : -1].float(), dim=-1)
            token_log_probs = log_probs.gather(-1, full_ids[:, -ids.shape[1] :].unsqueeze(-1)).squeeze(-1)
            scores[:, index] = token_log_probs.mean(-1).cpu()
    return scores


def _class_name_ids(tokenizer, name: str) -> torch.LongTensor:
    ids = tokenizer(name, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError(f"class name {name!r} tokenises to nothing.")
    return ids


def _position_ids(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Positions counted over the attended tokens (left padding does not shift them), as `generate` builds them."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def _prompt_cache(
    model, prompt_images: FlamingoGenerationImages, input_ids: torch.LongTensor, attention_mask: torch.Tensor
) -> Cache:
    """The cache of every prompt token but the last (which is fed again with each class name)."""
    prefix_ids, prefix_mask = input_ids[:, :-1], attention_mask[:, :-1]
    outputs = model(
        input_ids=prefix_ids,
        attention_mask=prefix_mask,
        position_ids=_position_ids(prefix_mask),
        use_cache=True,
        **prompt_images.step_inputs(model, prefix_ids, prefix_ids.shape[1]),
    )
    return cache_from_output(outputs)


def _continuation_logits(
    model,
    prompt_images: FlamingoGenerationImages,
    full_ids: torch.LongTensor,
    full_mask: torch.Tensor,
    num_fed: int,
    prompt_cache: Cache | None,
) -> torch.Tensor:
    """Logits of the last `num_fed` tokens of `full_ids`, the earlier ones coming from `prompt_cache`, which is left
    as it was."""
    # Cropping restores a cache exactly only when every layer keeps every token; otherwise continue from a copy.
    crop = prompt_cache is not None and prompt_cache.is_croppable and not any(prompt_cache.is_sliding)
    cache = prompt_cache if crop or prompt_cache is None else copy.deepcopy(prompt_cache)
    outputs = model(
        input_ids=full_ids[:, -num_fed:],
        attention_mask=full_mask,
        position_ids=_position_ids(full_mask)[:, -num_fed:],
        cache=cache,
        use_cache=cache is not None,
        **prompt_images.step_inputs(model, full_ids, num_fed),
    )
    if crop:
        prompt_cache.crop(-num_fed)
    return outputs.logits
