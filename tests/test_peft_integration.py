"""The cross-attention hooks follow PEFT's module replacement (the block is looked up at every forward)."""

from __future__ import annotations

import pytest
import torch
from model_testers import build_model, interleaved_batch, open_gates

peft = pytest.importorskip("peft")


def test_modules_to_save_copies_are_the_ones_that_run():
    model = build_model("llama")
    open_gates(model)
    batch = interleaved_batch()
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values)
    with torch.no_grad():
        before = model(**inputs).logits

    config = peft.LoraConfig(
        r=4,
        target_modules=r".*language_model.*\.(q_proj|v_proj)",
        modules_to_save=["gated_cross_attn_layers.1", "gated_cross_attn_layers.3", "perceiver"],
        init_lora_weights=True,
    )
    peft_model = peft.get_peft_model(model, config)
    lora_layers = [name for name, _ in peft_model.named_modules() if name.endswith("lora_A")]
    assert lora_layers and all(".language_model." in name for name in lora_layers)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, before, atol=1e-6, rtol=0)

    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert "base_model.model.gated_cross_attn_layers.1.modules_to_save.default.attn_gate" in trainable
    # Closing the gate of the trained copy must change the output: the hook runs the copy, not the frozen original.
    wrapper = peft_model.base_model.model.gated_cross_attn_layers["1"]
    with torch.no_grad():
        wrapper.modules_to_save["default"].attn_gate.zero_()
        wrapper.modules_to_save["default"].ff_gate.zero_()
        after = peft_model(**inputs).logits
    assert (after - before).abs().max() > 1e-4
    assert wrapper.original_module.attn_gate.item() != 0  # the original stays untouched

    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    peft_model.train()
    loss = peft_model(**inputs, labels=labels).loss
    loss.backward()
    open_wrapper = peft_model.base_model.model.gated_cross_attn_layers["3"]  # its gates are still open
    copy_grad = open_wrapper.modules_to_save["default"].attn.to_q.weight.grad
    assert copy_grad is not None and copy_grad.abs().sum() > 0
    assert open_wrapper.original_module.attn.to_q.weight.grad is None
