"""`hf_flamingo.cpu_kernels`: float32 CPU linears through oneDNN where autograd records nothing, `F.linear` (or the
module itself) everywhere else; and the model using them without changing its results or its gradients."""

import pytest
import torch
import torch.nn.functional as F
from model_testers import interleaved_batch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hf_flamingo.cpu_kernels import OneDNNLinearMode, linear, module_linear, onednn_linear_applies

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
    result, ops = _ops(lambda: linear(inputs, small))
    assert "aten.mm.default" in ops and ONEDNN_LINEAR not in ops
    torch.testing.assert_close(result, F.linear(inputs, small), atol=0, rtol=0)
    _, ops = _ops(lambda: linear(inputs, large))
    assert ops == [ONEDNN_LINEAR]


def test_this_machine_has_the_onednn_linear():
    # The rest of this file checks the oneDNN path itself; it must not silently test only the fallback.
    assert torch.backends.mkldnn.is_available()
    assert onednn_linear_applies(torch.ones(2, 3), torch.ones(4, 3)) is True


@pytest.mark.parametrize("shape", [(1, 48), (3, 48), (8, 1, 48), (2, 71, 48), (0, 48)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_linear_equals_f_linear_through_onednn(shape, with_bias):
    torch.manual_seed(0)
    weight, bias = torch.randn(80, 48), torch.randn(80) if with_bias else None
    inputs = torch.randn(*shape)
    result, ops = _ops(lambda: linear(inputs, weight, bias))
    torch.testing.assert_close(result, F.linear(inputs, weight, bias), atol=2e-5, rtol=1e-5)
    assert result.shape == (*shape[:-1], 80)
    if inputs.numel():
        assert ops == [ONEDNN_LINEAR]
    # A transposed (non-contiguous) input gives the same numbers.
    if len(shape) == 2 and shape[0] > 1:
        transposed = inputs.t().contiguous().t()
        torch.testing.assert_close(linear(transposed, weight, bias), result, atol=1e-6, rtol=0)


def test_linear_under_autograd_gives_f_linear_gradients():
    torch.manual_seed(0)
    weight = torch.randn(80, 48, requires_grad=True)
    bias = torch.randn(80, requires_grad=True)
    inputs = torch.randn(2, 5, 48, requires_grad=True)
    grad_output = torch.randn(2, 5, 80)
    result, ops = _ops(lambda: linear(inputs, weight, bias))
    assert ops == [ONEDNN_LINEAR]
    assert result.requires_grad
    gradients = torch.autograd.grad(result, (inputs, weight, bias), grad_output, create_graph=True)
    expected_result = F.linear(inputs, weight, bias)
    expected = torch.autograd.grad(expected_result, (inputs, weight, bias), grad_output, create_graph=True)
    torch.testing.assert_close(result, expected_result, atol=2e-5, rtol=1e-5)
    for gradient, reference in zip(gradients, expected, strict=True):
        torch.testing.assert_close(gradient, reference, atol=5e-5, rtol=1e-5)

    # Double backward (e.g. a gradient penalty) goes through differentiable operations.
    penalty = sum(gradient.square().sum() for gradient in gradients[:2])
    expected_penalty = sum(gradient.square().sum() for gradient in expected[:2])
    torch.testing.assert_close(
        torch.autograd.grad(penalty, weight)[0], torch.autograd.grad(expected_penalty, weight)[0], atol=1e-3, rtol=1e-4
    )

    # Only the input needs a gradient (a frozen layer inside a trained model): the input gradient is oneDNN's too.
    frozen_weight = weight.detach()
    inputs_gradient = torch.autograd.grad(linear(inputs, frozen_weight).sum(), inputs)[0]
    torch.testing.assert_close(
        inputs_gradient, torch.autograd.grad(F.linear(inputs, frozen_weight).sum(), inputs)[0], atol=5e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "case",
    ["float64", "bfloat16", "1-D input", "switched off", "meta device"],
)
def test_linear_falls_back_outside_float32_cpu(case):
    weight, inputs = torch.randn(8, 4), torch.randn(3, 4)
    if case == "float64":
        weight, inputs = weight.double(), inputs.double()
    elif case == "bfloat16":
        weight, inputs = weight.bfloat16(), inputs.bfloat16()
    elif case == "1-D input":
        inputs = inputs[0]
    elif case == "meta device":
        weight, inputs = weight.to("meta"), inputs.to("meta")
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=case != "switched off"):
        assert not onednn_linear_applies(inputs, weight)
        result, ops = _ops(lambda: linear(inputs, weight))
    assert ONEDNN_LINEAR not in ops
    assert result.shape == (*inputs.shape[:-1], 8)
    if case != "meta device":
        torch.testing.assert_close(result, F.linear(inputs, weight), atol=0, rtol=0)


def test_module_linear_keeps_hooks_and_subclasses():
    torch.manual_seed(0)
    layer = nn.Linear(48, 80, bias=False)
    inputs = torch.randn(3, 1, 48)
    with torch.no_grad():
        result, ops = _ops(lambda: module_linear(layer, inputs))
        assert ops == [ONEDNN_LINEAR]
        torch.testing.assert_close(result, layer(inputs), atol=2e-5, rtol=1e-5)

        seen = []
        handle = layer.register_forward_hook(lambda module, args, output: seen.append(output.shape))
        module_linear(layer, inputs)
        handle.remove()
        assert seen == [(3, 1, 80)]

        backward_seen = []
        layer.register_full_backward_hook(lambda module, grad_input, grad_output: backward_seen.append(True))
    with torch.enable_grad():
        module_linear(layer, inputs.requires_grad_()).sum().backward()
    assert backward_seen == [True]
    inputs = inputs.detach()
    with torch.no_grad():

        class ScaledLinear(nn.Linear):
            def forward(self, hidden_states):
                return 2 * super().forward(hidden_states)

        scaled = ScaledLinear(48, 80, bias=False)
        scaled.weight.copy_(layer.weight)
        torch.testing.assert_close(module_linear(scaled, inputs), 2 * layer(inputs), atol=0, rtol=0)


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


def test_image_features_use_onednn_and_match_sgemm(llama_model):
    pixel_values = interleaved_batch().pixel_values
    with torch.no_grad():
        result, ops = _ops(lambda: llama_model.get_image_features(pixel_values))
        with torch.backends.mkldnn.flags(enabled=False):
            reference, reference_ops = _ops(lambda: llama_model.get_image_features(pixel_values))
    # Every product of the tower's and the perceiver's linears went through oneDNN; attention keeps its own kernels.
    assert ops.count(ONEDNN_LINEAR) == reference_ops.count("aten.addmm.default") + reference_ops.count(
        "aten.mm.default"
    )
    assert ops.count(ONEDNN_LINEAR) > 0
    assert not {"aten.addmm.default", "aten.mm.default"} & set(ops)
    torch.testing.assert_close(result, reference, atol=1e-5, rtol=1e-5)


def test_language_model_products_use_onednn_during_flamingo_inference_only(llama_model):
    batch = interleaved_batch()
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.pixel_values}
    with torch.no_grad():
        _, ops = _ops(lambda: llama_model(**inputs))
        with torch.backends.mkldnn.flags(enabled=False):
            _, reference_ops = _ops(lambda: llama_model(**inputs))
        # Called alone afterwards, the language model runs its own kernels: it is not modified.
        _, bare_ops = _ops(lambda: llama_model.language_model(input_ids=batch.input_ids))
    lm_linears = sum(isinstance(module, nn.Linear) for module in llama_model.language_model.modules())
    reference_products = reference_ops.count("aten.mm.default") + reference_ops.count("aten.addmm.default")
    # Tower, perceiver, blocks and the language model: every product went through oneDNN.
    assert ops.count(ONEDNN_LINEAR) == reference_products
    assert not {"aten.mm.default", "aten.addmm.default"} & set(ops)
    assert ONEDNN_LINEAR not in bare_ops
    assert bare_ops.count("aten.mm.default") + bare_ops.count("aten.addmm.default") == lm_linears

    # Training only the blocks: every language-model product then has an input that requires grad, so autograd records
    # it and it keeps the language model's kernels; the frozen tower and perceiver stay on oneDNN, and the blocks use
    # the oneDNN autograd function.
    saved = [(parameter, parameter.requires_grad) for parameter in llama_model.parameters()]
    try:
        for name, parameter in llama_model.named_parameters():
            parameter.requires_grad_(name.startswith("gated_cross_attn_layers."))
        with torch.enable_grad():
            _, training_ops = _ops(lambda: llama_model(**inputs))
    finally:
        for parameter, flag in saved:
            parameter.requires_grad_(flag)
    # Decoder layers before the first block see no input that requires grad: nothing recorded there, so oneDNN.
    first_block = min(int(index) for index in llama_model.gated_cross_attn_layers)
    layers = llama_model.language_model.get_submodule(llama_model.decoder_layers_path)
    unrecorded_lm = sum(isinstance(module, nn.Linear) for layer in layers[:first_block] for module in layer.modules())
    assert first_block > 0 and unrecorded_lm > 0
    recorded_lm = lm_linears - unrecorded_lm
    assert training_ops.count("aten.mm.default") + training_ops.count("aten.addmm.default") == recorded_lm
    assert training_ops.count(ONEDNN_LINEAR) == reference_products - recorded_lm


def test_forward_and_generation_match_sgemm(llama_model):
    batch = interleaved_batch()
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.pixel_values}
    settings = dict(max_new_tokens=5, min_new_tokens=5, num_beams=2, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        logits = llama_model(**inputs).logits
        generated = llama_model.generate(**inputs, **settings)
        with torch.backends.mkldnn.flags(enabled=False):
            reference_logits = llama_model(**inputs).logits
            reference_generated = llama_model.generate(**inputs, **settings)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=1e-5)
    assert generated.tolist() == reference_generated.tolist()


def test_training_gradients_match_sgemm(llama_model):
    """A training step with oneDNN (forward and input gradients of the perceiver's and blocks' linears, the frozen
    tower's forward) gives the gradients of the same step with oneDNN switched off."""
    batch = interleaved_batch()
    trainable = [p for name, p in llama_model.named_parameters() if name.startswith(("perceiver", "gated_cross_attn"))]
    frozen = [p for name, p in llama_model.named_parameters() if name.startswith(("vision_model", "language_model"))]
    saved = [(p, p.requires_grad) for p in trainable + frozen]
    for parameter in frozen:
        parameter.requires_grad_(False)
    for parameter in trainable:
        parameter.requires_grad_(True)
    try:
        gradients = []
        for enabled in (True, False):
            llama_model.zero_grad(set_to_none=True)
            with torch.backends.mkldnn.flags(enabled=enabled):
                loss = llama_model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    pixel_values=batch.pixel_values,
                    labels=batch.input_ids,
                ).loss
                loss.backward()
            gradients.append([p.grad.clone() for p in trainable])
    finally:
        llama_model.zero_grad(set_to_none=True)
        for parameter, flag in saved:
            parameter.requires_grad_(flag)
    assert all(gradient.abs().sum() > 0 for gradient in gradients[0])
    for with_onednn, without in zip(*gradients, strict=True):
        torch.testing.assert_close(with_onednn, without, atol=1e-5, rtol=1e-4)
