"""Closing the gates: a Flamingo that behaves exactly as its bare language model, for baselines and checks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def closed_gates(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily sets every cross-attention and feed-forward gate to 0, which makes the model its bare LM.

    `tanh(0) = 0`, so each gated block adds exactly zero: the logits are bit-identical to the language model's and
    generation is token for token the same. The gate values are restored on exit, also after an exception.

    Example:

    ```python
    >>> with closed_gates(model):
    ...     baseline = model.generate(**inputs)  # what the language model alone writes
    ```

    Args:
        model ([`FlamingoModel`] or [`FlamingoForConditionalGeneration`]): The model (not wrapped by PEFT).
    """
    gates = [
        p for name, p in model.gated_cross_attn_layers.named_parameters() if name.endswith(("attn_gate", "ff_gate"))
    ]
    saved = [gate.detach().clone() for gate in gates]
    try:
        with torch.no_grad():
            for gate in gates:
                gate.zero_()
        yield model
    finally:
        with torch.no_grad():
            for gate, value in zip(gates, saved, strict=True):
                gate.copy_(value)
