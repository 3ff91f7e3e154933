"""`hf_flamingo.cpu_fast_path`, the opt-in CPU switch: inside it, float32 CPU products that autograd does not record
run on oneDNN, everything else unchanged; outside it (the default), the model runs PyTorch's own kernels and is
bit-identical to the bare language model with closed gates."""

import pytest
import torch
import torch.nn.functional as F
from model_testers import bare_language_model, build_model, interleaved_batch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hf_flamingo import cpu_fast_path
from hf_flamingo.cpu_kernels import OneDNNLinearMode, onednn_linear_applies

ONEDNN_LINEAR = "mkldnn._linear_pointwise.default"
ATEN_PRODUCTS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.linear.default"}


class _RecordOps(TorchDispatchMode):
    """Records the name of every operator that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _ops(run):
    with _RecordOps() as recorder:
        result = run()
    return result, recorder.names


def _products(ops):
    return ops.count("aten.mm.default") + ops.count("aten.addmm.default")


@pytest.fixture(autouse=True)
def onednn_for_tiny_weights(monkeypatch):
    """The tiny test models' weights are below the size from which oneDNN is used; these tests check the oneDNN
    path itself, so it is used for every size here (except where a test restores the threshold)."""
    from hf_flamingo import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "MIN_ONEDNN_WEIGHT_ELEMENTS", 0)


def test_small_weights_stay_on_sgemm(monkeypatch):
    from hf_flamingo import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "MIN_ONEDNN_WEIGHT_ELEMENTS", 2**16)
    inputs = torch.randn(3, 256)
    small, large = torch.randn(255, 256), torch.randn(256, 256)
    with torch.no_grad(), cpu_fast_path():
        result, ops = _ops(lambda: F.linear(inputs, small))
        _, large_ops = _ops(lambda: F.linear(inputs, large))
    assert "aten.mm.default" in ops and ONEDNN_LINEAR not in ops
    torch.testing.assert_close(result, inputs @ small.t(), atol=0, rtol=0)
    assert large_ops == [ONEDNN_LINEAR]


def test_this_machine_has_the_onednn_linear():
    # The rest of this file checks the oneDNN path itself; it must not silently test only the fallback.
    assert torch.backends.mkldnn.is_available()
    assert onednn_linear_applies(torch.ones(2, 3), torch.ones(4, 3)) is True


@pytest.mark.parametrize("shape", [(1, 48), (3, 48), (8, 1, 48), (2, 71, 48)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_switch_computes_f_linear_through_onednn(shape, with_bias):
    torch.manual_seed(0)
    weight, bias = torch.randn(80, 48), torch.randn(80) if with_bias else None
    inputs = torch.randn(*shape)
    expected = F.linear(inputs, weight, bias)
    with cpu_fast_path():
        result, ops = _ops(lambda: F.linear(inputs, weight, bias))
    assert ops == [ONEDNN_LINEAR]
    torch.testing.assert_close(result, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "case", ["float64", "bfloat16", "1-D input", "switched off", "meta device", "recorded by autograd", "disabled"]
)
def test_everything_else_runs_unchanged(case):
    weight, inputs = torch.randn(8, 4), torch.randn(3, 4)
    if case == "float64":
        weight, inputs = weight.double(), inputs.double()
    elif case == "bfloat16":
        weight, inputs = weight.bfloat16(), inputs.bfloat16()
    elif case == "1-D input":
        inputs = inputs[0]
    elif case == "meta device":
        weight, inputs = weight.to("meta"), inputs.to("meta")
    elif case == "recorded by autograd":
        weight.requires_grad_(True)
    with torch.backends.mkldnn.flags(enabled=case != "switched off"), cpu_fast_path(enabled=case != "disabled"):
        result, ops = _ops(lambda: F.linear(inputs, weight))
    assert ONEDNN_LINEAR not in ops
    assert result.shape == (*inputs.shape[:-1], 8)
    if case != "meta device":
        torch.testing.assert_close(result, F.linear(inputs, weight), atol=0, rtol=0)


def test_mode_routes_only_f_linear():
    torch.manual_seed(0)
    tower = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.LayerNorm(16))
    inputs = torch.randn(5, 7, 16)
    with torch.no_grad():
        expected = tower(inputs)
        with OneDNNLinearMode():
            result, ops = _ops(lambda: tower(inputs))
    assert ops.count(ONEDNN_LINEAR) == 2
    assert not ATEN_PRODUCTS & set(ops)
    assert "aten.gelu.default" in ops and "aten.native_layer_norm.default" in ops
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


def test_default_path_uses_no_onednn_and_closed_gates_are_bit_identical():
    """Without the switch, nothing in the model calls oneDNN's linear, and with closed gates the logits are exactly
    the bare language model's."""
    model = build_model("llama")
    batch = interleaved_batch()
    bare = bare_language_model(model)
    with torch.no_grad():
        logits, ops = _ops(
            lambda: (
                model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
                ).logits
            )
        )
        expected = bare(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert ONEDNN_LINEAR not in ops
    assert torch.equal(logits, expected)


def test_switch_routes_every_inference_product_of_the_model(llama_model):
    batch = interleaved_batch()
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.pixel_values}
    with torch.no_grad():
        reference, reference_ops = _ops(lambda: llama_model(**inputs).logits)
        with cpu_fast_path():
            logits, ops = _ops(lambda: llama_model(**inputs).logits)
        # Outside the block the language model runs its own kernels again: nothing was modified.
        _, bare_ops = _ops(lambda: llama_model.language_model(input_ids=batch.input_ids))
    # Tower, perceiver, blocks and the language model: every product went through oneDNN.
    assert ops.count(ONEDNN_LINEAR) == _products(reference_ops) > 0
    assert not {"aten.mm.default", "aten.addmm.default"} & set(ops)
    assert ONEDNN_LINEAR not in bare_ops
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def test_switch_leaves_products_autograd_records_alone(llama_model):
    """Training only the blocks: products autograd records keep PyTorch's kernels (so that gradient checkpointing
    recomputes the same operations); the frozen tower, perceiver and the decoder layers before the first block run
    on oneDNN."""
    batch = interleaved_batch()
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.pixel_values}
    with torch.no_grad():
        _, reference_ops = _ops(lambda: llama_model(**inputs))
    saved = [(parameter, parameter.requires_grad) for parameter in llama_model.parameters()]
    try:
        for name, parameter in llama_model.named_parameters():
            parameter.requires_grad_(name.startswith("gated_cross_attn_layers."))
        with torch.enable_grad(), cpu_fast_path():
            _, training_ops = _ops(lambda: llama_model(**inputs))
    finally:
        for parameter, flag in saved:
            parameter.requires_grad_(flag)
    first_block = min(int(index) for index in llama_model.gated_cross_attn_layers)
    layers = llama_model.language_model.get_submodule(llama_model.decoder_layers_path)
    lm_linears = sum(isinstance(module, nn.Linear) for module in llama_model.language_model.modules())
    unrecorded_lm = sum(isinstance(module, nn.Linear) for layer in layers[:first_block] for module in layer.modules())
    block_linears = sum(isinstance(m, nn.Linear) for m in llama_model.gated_cross_attn_layers.modules())
    assert first_block > 0 and unrecorded_lm > 0
    # Recorded: the blocks' products (trained weights) and the language model's from the first block on.
    recorded = lm_linears - unrecorded_lm + block_linears
    assert _products(training_ops) == recorded
    assert training_ops.count(ONEDNN_LINEAR) == _products(reference_ops) - recorded


def test_forward_and_generation_match_with_the_switch(llama_model):
    batch = interleaved_batch()
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.pixel_values}
    settings = dict(max_new_tokens=5, min_new_tokens=5, num_beams=2, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        logits = llama_model(**inputs).logits
        generated = llama_model.generate(**inputs, **settings)
        with cpu_fast_path():
            fast_logits = llama_model(**inputs).logits
            fast_generated = llama_model.generate(**inputs, **settings)
    torch.testing.assert_close(fast_logits, logits, atol=1e-5, rtol=1e-5)
    assert fast_generated.tolist() == generated.tolist()
