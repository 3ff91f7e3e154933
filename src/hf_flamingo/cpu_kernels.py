"""Float32 linear layers on CPU through oneDNN, for inference and training.

PyTorch's x86 builds compute a float32 `F.linear` with MKL's sgemm. oneDNN, which PyTorch ships and uses for the CPU
code `torch.compile` generates, computes the same products faster on the shapes Flamingo runs (measured on a 2-core
AMD EPYC, torch 2.14, 2 threads): 10-25 % on the vision tower's and the perceiver's products, 1.5-3x on the few-row
products of decoding (one token per sample or beam). The results differ from sgemm's only in the order of the
summation (about 1e-6 relative).

Flamingo's own layers (perceiver, gated blocks) call [`linear`] directly. The vision tower and the language model are
not Flamingo's: during Flamingo's calls into them, [`OneDNNLinearMode`] routes their `F.linear` products that
autograd does not record (inference, frozen towers), leaving the modules untouched. For decoding with a few rows per
step this cuts the language model's decoding time by about 40 % (bare SmolLM2-135M, 3 beams, 20 tokens: 2.3 -> 1.4 s).

oneDNN's linear has no autograd formula of its own; where autograd records the product (training), an
`autograd.Function` computes the forward and the input gradient with oneDNN and the weight gradient with
`torch.matmul`. Everything else (other devices and dtypes, tensor subclasses such as quantized weights,
`torch.compile` tracing) goes through `F.linear` unchanged.
`with torch.backends.mkldnn.flags(enabled=False):` turns the oneDNN path off, e.g. to compare against sgemm.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)

MIN_ONEDNN_WEIGHT_ELEMENTS = 2**16
"""Products with smaller weights stay on sgemm: oneDNN costs about 15 us more per call, which only pays off from
about 256 x 256 weights on (measured on a 2-core AMD EPYC for 1 to 128 rows)."""
_UNRESOLVED = object()
_onednn_linear_op: Any = _UNRESOLVED


def _onednn_linear() -> Any | None:
    """The `mkldnn::_linear_pointwise` operator, or `None` when this PyTorch build has no oneDNN linear."""
    global _onednn_linear_op
    if _onednn_linear_op is _UNRESOLVED:
        try:
            _onednn_linear_op = torch.ops.mkldnn._linear_pointwise.default
        except (AttributeError, RuntimeError):
            _onednn_linear_op = None
    return _onednn_linear_op


def _is_plain_cpu_float32(tensor: torch.Tensor) -> bool:
    return type(tensor) in _PLAIN_TENSOR_TYPES and tensor.dtype == torch.float32 and tensor.device.type == "cpu"


def _autograd_records(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an operation on `tensors` (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad for tensor in tensors)


def onednn_linear_applies(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether [`linear`] computes `F.linear(input, weight, bias)` with oneDNN."""
    tensors = (input, weight) if bias is None else (input, weight, bias)
    return (
        input.dim() >= 2
        and weight.dim() == 2
        and weight.numel() >= MIN_ONEDNN_WEIGHT_ELEMENTS
        and input.numel() > 0
        and all(_is_plain_cpu_float32(tensor) for tensor in tensors)
        and torch.backends.mkldnn.enabled
        and torch.backends.mkldnn.is_available()
        and not torch.compiler.is_compiling()
        and _onednn_linear() is not None
    )


def _onednn_product(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _onednn_linear()(input, weight, bias, "none", [], "")


class _OneDNNLinearFunction(torch.autograd.Function):
    """`F.linear` whose forward and input gradient are oneDNN products; the weight gradient is `torch.matmul` (oneDNN
    was not faster there). The backward is built from differentiable operations, so double backward works."""

    @staticmethod
    def forward(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _onednn_product(input, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        input, weight, bias = inputs
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        input, weight = ctx.saved_tensors
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = linear(grad_output, weight.t())
        if ctx.needs_input_grad[1]:
            grad_weight = torch.matmul(grad_rows.t(), input.reshape(-1, input.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_input, grad_weight, grad_bias


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(input, weight, bias)`, through oneDNN for float32 CPU tensors.

    Where autograd records the product, the forward and the input gradient use oneDNN and the weight gradient
    `torch.matmul`.

    Args:
        input (`torch.Tensor` of shape `(*, in_features)`): The input.
        weight (`torch.Tensor` of shape `(out_features, in_features)`): The weight.
        bias (`torch.Tensor` of shape `(out_features,)`, *optional*): The bias.

    Returns:
        `torch.Tensor` of shape `(*, out_features)`.
    """
    if not onednn_linear_applies(input, weight, bias):
        return F.linear(input, weight, bias)
    if _autograd_records(input, weight, bias):
        return _OneDNNLinearFunction.apply(input, weight, bias)
    return _onednn_product(input, weight, bias)


def _has_hooks(layer: nn.Module) -> bool:
    module = nn.modules.module
    return bool(
        layer._forward_hooks
        or layer._forward_pre_hooks
        or layer._backward_hooks
        or layer._backward_pre_hooks
        or hasattr(layer, "_hf_hook")
        or module._global_forward_hooks
        or module._global_forward_pre_hooks
        or module._global_backward_hooks
        or module._global_backward_pre_hooks
    )


def module_linear(layer: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """`layer(input)`, computed by [`linear`] when `layer` is a plain `nn.Linear` that nothing else intercepts (whose
    forward is exactly `F.linear`); otherwise the layer is called normally.

    Layers with hooks (accelerate's offloading, DeepSpeed, user probes) and `nn.Linear` subclasses (quantized or adapter
    layers) are always called normally.
    """
    if type(layer) is nn.Linear and not _has_hooks(layer):
        return linear(input, layer.weight, layer.bias)
    return layer(input)


class OneDNNLinearMode(TorchFunctionMode):
    """While active, the `F.linear` calls that autograd does not record (e.g. of a frozen vision tower's `nn.Linear`
    layers) run through oneDNN.

    Used around modules Flamingo does not own, so that they run with oneDNN without being modified. Example:

    ```python
    with OneDNNLinearMode():
        outputs = vision_model(pixel_values=pixel_values)
    ```
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return _linear_unless_recorded(*args, **kwargs)
        return func(*args, **kwargs)


def onednn_linears_on(device: torch.device) -> contextlib.AbstractContextManager:
    """[`OneDNNLinearMode`] for computations on the CPU (outside `torch.compile` tracing); a no-op context elsewhere."""
    if device.type == "cpu" and not torch.compiler.is_compiling():
        return OneDNNLinearMode()
    return contextlib.nullcontext()


def _linear_unless_recorded(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """oneDNN only where autograd records nothing; `F.linear` otherwise.

    [`OneDNNLinearMode`] is active only around the call it wraps, while gradient checkpointing may recompute the
    wrapped layers later, outside of it. Products that autograd records must therefore be the same `F.linear` both
    times (checkpointing checks that the recomputation saves the same tensors).
    """
    if _autograd_records(input, weight, bias) or not onednn_linear_applies(input, weight, bias):
        return F.linear(input, weight, bias)
    return _onednn_product(input, weight, bias)
