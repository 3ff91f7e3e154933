"""bitsandbytes 8-bit / 4-bit language models: only the LM's linears are quantized; forward, generate and training work;
gradients reach the bridge after an eval-mode forward (the AVX512-BF16 4-bit trap); the 4-bit LM is small."""

from __future__ import annotations

import pytest
import torch
from model_testers import (
    EOC_TOKEN_ID,
    MEDIA_TOKEN_ID,
    build_model,
    interleaved_batch,
    open_gates,
    text_config_for,
    vision_config_for,
)
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, CLIPVisionModel, LlamaConfig

from hf_flamingo import FlamingoForConditionalGeneration
from hf_flamingo.quantization_utils import keep_4bit_layers_differentiable

bnb = pytest.importorskip("bitsandbytes")

QUANTIZATION = {
    "8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "4bit": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
}
BNB_LAYER = {"8bit": bnb.nn.Linear8bitLt, "4bit": bnb.nn.Linear4bit}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A saved tiny Flamingo with open gates, and separately saved vision / language backbones."""
    root = tmp_path_factory.mktemp("quantization")
    model = build_model("llama")
    open_gates(model)
    model.save_pretrained(root / "flamingo")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(text_config_for("llama")).save_pretrained(root / "lm")
    CLIPVisionModel(vision_config_for("clip")).save_pretrained(root / "vision")
    return root


def _load(checkpoints, bits: str, how: str, **kwargs) -> FlamingoForConditionalGeneration:
    if how == "from_pretrained":
        return FlamingoForConditionalGeneration.from_pretrained(
            checkpoints / "flamingo", quantization_config=QUANTIZATION[bits](), **kwargs
        )
    model = FlamingoForConditionalGeneration.from_backbones(
        checkpoints / "vision",
        checkpoints / "lm",
        quantization_config=QUANTIZATION[bits](),
        media_token_id=MEDIA_TOKEN_ID,
        eoc_token_id=EOC_TOKEN_ID,
        cross_attn_every_n_layers=2,
        perceiver_depth=1,
        perceiver_num_latents=4,
        **kwargs,
    )
    open_gates(model)
    return model


def _inputs(labels: bool = False) -> dict[str, torch.Tensor]:
    batch = interleaved_batch()
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values)
    if labels:
        inputs["labels"] = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    return inputs


def _bridge_grads(model: FlamingoForConditionalGeneration) -> dict[str, torch.Tensor]:
    return {
        name: param.grad.detach().clone()
        for name, param in model.named_parameters()
        if name.startswith(("perceiver.", "gated_cross_attn_layers.")) and param.grad is not None
    }


@pytest.mark.parametrize("how", ["from_pretrained", "from_backbones"])
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_only_language_model_linears_are_quantized(checkpoints, bits, how):
    model = _load(checkpoints, bits, how, dtype=torch.bfloat16)
    quantized, plain = [], []
    for name, module in model.named_modules():
        if isinstance(module, BNB_LAYER[bits]):
            quantized.append(name)
        elif isinstance(module, nn.Linear):
            assert type(module) is nn.Linear, name  # no other bitsandbytes layer type anywhere
            assert module.weight.dtype == torch.bfloat16, name  # the compute dtype, not upcast
            plain.append(name)
    # 4 decoder layers x (q, k, v, o, gate, up, down).
    assert len(quantized) == 28
    assert all(name.startswith("language_model.model.layers.") for name in quantized)
    assert "language_model.lm_head" in plain
    for prefix in ("vision_model.", "perceiver.", "gated_cross_attn_layers."):
        assert any(name.startswith(prefix) for name in plain), prefix
    assert model.perceiver.latents.dtype == torch.bfloat16
    assert model.gated_cross_attn_layers["1"].attn_gate.dtype == torch.bfloat16


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_forward_generate_and_training_step_after_inference(checkpoints, bits):
    """Forward and `generate` work; a train step after them gets the same bridge gradients as a model that never ran
    inference (the AVX512-BF16 4-bit trap would silently change them), and updates the bridge."""
    fresh = _load(checkpoints, bits, "from_pretrained").train()
    fresh(**_inputs(labels=True)).loss.backward()
    expected = _bridge_grads(fresh)

    model = _load(checkpoints, bits, "from_pretrained")  # returned in eval mode
    if bits == "4bit":
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    inputs = _inputs()
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype.is_floating_point for p in trainable)
    before = [p.detach().clone() for p in trainable]
    model(**_inputs(labels=True)).loss.backward()
    grads = _bridge_grads(model)
    assert grads.keys() == expected.keys()
    assert any(name.startswith("perceiver.") and g.abs().sum() > 0 for name, g in grads.items())
    for name in expected:
        assert torch.isfinite(grads[name]).all(), name
        torch.testing.assert_close(grads[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    torch.optim.SGD(trainable, lr=1e-2).step()
    assert any(not torch.equal(p, b) for p, b in zip(trainable, before, strict=True))


def _save_llama_and_clip(directory, hidden_size: int, intermediate_size: int, num_layers: int) -> None:
    """Saves a random untied Llama (`directory/lm`) and a tiny CLIP tower (`directory/vision`)."""
    config = LlamaConfig(
        vocab_size=99,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory / "lm")
    CLIPVisionModel(vision_config_for("clip")).save_pretrained(directory / "vision")


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="the trap only exists on CPUs with AVX512-BF16")
def test_the_4bit_trap_is_real_without_the_fix(tmp_path):
    """Control: with bitsandbytes' default CPU repacking, an eval forward silently changes the gradients."""
    _save_llama_and_clip(tmp_path, hidden_size=64, intermediate_size=128, num_layers=2)

    def load():
        model = FlamingoForConditionalGeneration.from_backbones(
            tmp_path / "vision",
            tmp_path / "lm",
            quantization_config=QUANTIZATION["4bit"](),
            media_token_id=MEDIA_TOKEN_ID,
            eoc_token_id=EOC_TOKEN_ID,
            cross_attn_every_n_layers=1,
            perceiver_depth=1,
            perceiver_num_latents=4,
        )
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if name.startswith(("perceiver.", "gated_cross_attn_layers.")):
                param.data.normal_(std=0.1)
        open_gates(model)
        return model

    fresh = load().train()
    fresh(**_inputs(labels=True)).loss.backward()
    expected = _bridge_grads(fresh)

    model = load()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True  # bitsandbytes' default
    with torch.no_grad():
        model(**_inputs())
    model.train()
    model(**_inputs(labels=True)).loss.backward()
    trapped_error = _relative_error(_bridge_grads(model), expected)
    assert trapped_error > 0.1

    # The helper also repairs a model whose weights were already repacked (up to the bfloat16 rounding of the
    # quantization scales that bitsandbytes' repacking applies).
    assert keep_4bit_layers_differentiable(model) == 14
    model.zero_grad()
    model(**_inputs(labels=True)).loss.backward()
    repaired_error = _relative_error(_bridge_grads(model), expected)
    print(f"relative gradient error: trapped {trapped_error:.3f}, repaired {repaired_error:.4f}")
    assert repaired_error < 0.02


def _relative_error(grads: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert grads.keys() == expected.keys()
    difference = torch.cat([(grads[n] - expected[n]).flatten() for n in expected])
    reference = torch.cat([expected[n].flatten() for n in expected])
    return (difference.norm() / reference.norm()).item()


def test_4bit_language_model_footprint(tmp_path):
    """A 4-bit LM (hidden 256, 4 layers) takes at most 0.35x its bfloat16 memory."""
    _save_llama_and_clip(tmp_path, hidden_size=256, intermediate_size=1024, num_layers=4)
    footprints = {}
    for name, quantization_config in (("bf16", None), ("4bit", QUANTIZATION["4bit"]())):
        model = FlamingoForConditionalGeneration.from_backbones(
            tmp_path / "vision",
            tmp_path / "lm",
            dtype=torch.bfloat16,
            quantization_config=quantization_config,
            media_token_id=97,
            eoc_token_id=98,
            cross_attn_every_n_layers=2,
        )
        footprints[name] = model.language_model.get_memory_footprint()
    ratio = footprints["4bit"] / footprints["bf16"]
    print(f"4-bit / bf16 LM footprint: {footprints['4bit']} / {footprints['bf16']} bytes = {ratio:.3f}")
    assert ratio <= 0.35


def test_trainer_with_a_quantized_language_model(checkpoints, tmp_path):
    """`from_backbones` composes a quantized LM (the Flamingo is not marked quantized): Trainer trains the bridge
    directly. A Flamingo loaded quantized by `from_pretrained` is marked quantized: Trainer requires a PEFT adapter
    (transformers' rule for quantized models), see tests/test_training.py for the QLoRA recipe."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    features = [{key: value[row] for key, value in _inputs(labels=True).items()} for row in range(2)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True
    )
    composed = _load(checkpoints, "8bit", "from_backbones")
    before = composed.perceiver.latents.detach().clone()
    Trainer(model=composed, args=args, train_dataset=features, data_collator=default_data_collator).train()
    assert not torch.equal(composed.perceiver.latents, before)

    loaded = _load(checkpoints, "8bit", "from_pretrained")
    assert loaded.is_quantized
    with pytest.raises(ValueError, match="purely quantized models"):
        Trainer(model=loaded, args=args, train_dataset=features, data_collator=default_data_collator)


def test_float16_loading_keeps_vision_and_bridge_in_float32(checkpoints):
    """The documented side effect of `_keep_in_fp32_modules`: float16 loads keep these modules in float32 (bfloat16
    and float32 loads do not upcast, see `test_only_language_model_linears_are_quantized`); mixed dtypes run."""
    reference = FlamingoForConditionalGeneration.from_pretrained(checkpoints / "flamingo")
    model = FlamingoForConditionalGeneration.from_pretrained(checkpoints / "flamingo", dtype=torch.float16)
    dtypes = {}
    for name, param in model.named_parameters():
        dtypes.setdefault(name.split(".")[0], set()).add(param.dtype)
    assert dtypes == {
        "vision_model": {torch.float32},
        "perceiver": {torch.float32},
        "gated_cross_attn_layers": {torch.float32},
        "language_model": {torch.float16},
    }
    with torch.no_grad():
        logits = model(**_inputs()).logits
        expected = reference(**_inputs()).logits
    torch.testing.assert_close(logits.float(), expected, atol=5e-3, rtol=0)
