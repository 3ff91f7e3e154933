"""Helpers for Flamingo models whose language model is quantized with bitsandbytes.

This module only imports torch (bitsandbytes is touched lazily and only when a 4-bit layer is present), so that it can
be shipped as remote code next to a checkpoint.
"""

from torch import nn


def keep_4bit_layers_differentiable(model: nn.Module) -> int:
    """
    Keeps the backward pass of every bitsandbytes 4-bit linear layer of `model` available after inference.

    On CPUs with AVX512-BF16, bitsandbytes' `Linear4bit.forward` permanently repacks its weight for a fast inference
    kernel the first time it runs in eval mode on an input that does not require grad (e.g. `generate`, or evaluation
    under `torch.no_grad()`). That kernel has no autograd: from then on, backward through the layer silently produces
    no gradient, also in train mode, so the Perceiver Resampler and the cross-attention blocks in front of the frozen
    language model stop learning without any error. This function turns the repacking off (the layer's
    `support_avx512bf16_for_cpu` flag) and undoes it where it already happened. Layers then always run the regular
    dequantize-and-matmul path, which supports backward; CPU inference through 4-bit layers is slower. The flag only
    affects CPU inputs, so the call is harmless on CUDA and other accelerators.

    [`FlamingoForConditionalGeneration.from_pretrained`] and [`~FlamingoForConditionalGeneration.from_backbones`]
    call it on every model they return. Set `module.support_avx512bf16_for_cpu = True` on the `Linear4bit` modules
    again for inference-only use on a CPU.

    Args:
        model (`torch.nn.Module`): Any model; only its `bitsandbytes.nn.Linear4bit` modules are changed.

    Returns:
        `int`: The number of 4-bit layers found.
    """
    count = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = getattr(module, "weight", None)
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is not None and getattr(quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, quant_state)
        count += 1
    return count


__all__ = ["keep_4bit_layers_differentiable"]
