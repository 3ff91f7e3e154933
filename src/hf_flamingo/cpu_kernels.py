"""An opt-in CPU fast path: float32 products on oneDNN, switched on for a block of code.

PyTorch's x86 builds compute a float32 `F.linear` with MKL's sgemm. oneDNN, which PyTorch ships and uses for the CPU
code `torch.compile` generates, computes the same products faster on the shapes Flamingo runs (measured on a 2-core
AMD EPYC, torch 2.14, 2 threads): 10-25 % on the vision tower's and the perceiver's products, 1.5-3x on the few-row
products of decoding (one token per sample or beam). The results differ from sgemm's only in the order of the
summation (about 1e-6 relative).

The models never use it on their own. [`cpu_fast_path`] switches it on for everything called inside its block:

```python
>>> from hf_flamingo import cpu_fast_path
>>> with cpu_fast_path():
...     generated = model.generate(**inputs, num_beams=3, max_new_tokens=20)
```

Inside the block, a `TorchFunctionMode` ([`OneDNNLinearMode`]) routes every `F.linear` that autograd does not record
(inference, frozen towers during training) on float32 CPU tensors to oneDNN's linear; everything else (other devices
and dtypes, tensor subclasses such as quantized weights, products autograd records, `torch.compile` tracing) runs as
usual. The modules are not modified. It relies on a private oneDNN operator (`torch.ops.mkldnn._linear_pointwise`):
on a build without it, the block changes nothing. hf_flamingo's own CPU entry points (the `hf-flamingo` command, the
quick-start, `hf_flamingo.evaluation.evaluate`, the benchmark) switch it on; `with
torch.backends.mkldnn.flags(enabled=False):` inside the block turns it off again.
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
    """Whether oneDNN can compute `F.linear(input, weight, bias)`: plain float32 CPU tensors, a weight of at least
    `MIN_ONEDNN_WEIGHT_ELEMENTS`, oneDNN enabled and available, not while `torch.compile` traces."""
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


class OneDNNLinearMode(TorchFunctionMode):
    """While active, the `F.linear` calls that autograd does not record (inference, frozen layers) and oneDNN can
    compute ([`onednn_linear_applies`]) run through oneDNN; every other call runs unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return _linear_unless_recorded(*args, **kwargs)
        return func(*args, **kwargs)


def cpu_fast_path(enabled: bool = True) -> contextlib.AbstractContextManager:
    """The switch: a context manager inside which float32 CPU products that autograd does not record run on oneDNN
    (see the module's documentation). A no-op context when `enabled` is false or while `torch.compile` traces.

    Args:
        enabled (`bool`, *optional*, defaults to `True`): Switch it on; `False` gives a no-op context (convenient
            for a command-line flag).
    """
    if enabled and not torch.compiler.is_compiling():
        return OneDNNLinearMode()
    return contextlib.nullcontext()


def _linear_unless_recorded(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """oneDNN only where autograd records nothing; `F.linear` otherwise.

    Gradient checkpointing may recompute layers during the backward pass, outside the block: products that autograd
    records must be the same `F.linear` both times (checkpointing checks that the recomputation saves the same
    tensors).
    """
    if _autograd_records(input, weight, bias) or not onednn_linear_applies(input, weight, bias):
        return F.linear(input, weight, bias)
    return _onednn_product(input, weight, bias)
