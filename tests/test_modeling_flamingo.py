"""Model-level tests of `FlamingoForConditionalGeneration` (tiny random llama unless stated): serialisation, missing
weights, gradient checkpointing, embeddings, freezing, `from_backbones`, input validation, hook state, video inputs
and manual cache continuation."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_tokenizer
from model_testers import (
    BOS_TOKEN_ID,
    EOC_TOKEN_ID,
    IMAGE_SIZE,
    MEDIA_TOKEN_ID,
    VOCAB_SIZE,
    bare_language_model,
    build_model,
    flamingo_config,
    interleaved_batch,
    open_gates,
    random_pixels,
    text_config_for,
    vision_config_for,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionModel,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

import hf_flamingo  # noqa: F401  (registers the Auto classes)
from hf_flamingo import FlamingoConfig, FlamingoForConditionalGeneration
from hf_flamingo.cache_compat import cache_from_output

NUM_LATENTS = 8  # `perceiver_num_latents` of the tiny configs
VISION_DIM = 32  # hidden size of the tiny vision encoders
EXACT = dict(rtol=0.0, atol=0.0)


# --------------------------------------------------------------------------------------------------------------------
# Helpers


def flamingo_logits(model, batch, pixel_values=None, **kwargs) -> torch.Tensor:
    pixel_values = batch.pixel_values if pixel_values is None else pixel_values
    with torch.no_grad():
        return model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixel_values, **kwargs
        ).logits


def lm_logits(language_model, batch) -> torch.Tensor:
    with torch.no_grad():
        return language_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def checkpoint_keys(directory: str | os.PathLike) -> list[str]:
    """Every tensor key of every safetensors file in `directory`, with repetitions."""
    keys = []
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            keys.extend(handle.keys())
    return keys


def strip_checkpoint(directory: str | os.PathLike, prefixes: tuple[str, ...]) -> None:
    """Rewrites `model.safetensors` without the keys starting with any of `prefixes`."""
    path = os.path.join(directory, "model.safetensors")
    state_dict = load_file(path)
    kept = {key: value for key, value in state_dict.items() if not key.startswith(prefixes)}
    assert len(kept) < len(state_dict)
    save_file(kept, path, metadata={"format": "pt"})


def gates(model) -> list[torch.Tensor]:
    return [p for block in model.gated_cross_attn_layers.values() for p in (block.attn_gate, block.ff_gate)]


# --------------------------------------------------------------------------------------------------------------------
# 1. Save / load round trip


@pytest.mark.parametrize("max_shard_size", [None, "40KB"], ids=["single_file", "sharded"])
def test_save_load_round_trip(tmp_path, max_shard_size):
    model = build_model("llama")
    open_gates(model)
    batch = interleaved_batch()
    expected = flamingo_logits(model, batch)

    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(tmp_path, **save_kwargs)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if max_shard_size is None:
        assert files == ["model.safetensors"]
    else:
        assert len(files) > 1
        weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
        assert sorted(set(weight_map.values())) == files

    # Every key exactly once; the LM's keys are the bare LM's, under `language_model.`.
    keys = checkpoint_keys(tmp_path)
    assert len(keys) == len(set(keys))
    assert set(keys) == set(model.state_dict())
    bare_keys = {f"language_model.{key}" for key in bare_language_model(model).state_dict()}
    assert {key for key in keys if key.startswith("language_model.")} == bare_keys
    other_prefixes = {key.split(".")[0] for key in keys if not key.startswith("language_model.")}
    assert other_prefixes == {"vision_model", "perceiver", "gated_cross_attn_layers"}

    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, FlamingoConfig)
    assert config.media_token_id == MEDIA_TOKEN_ID and config.eoc_token_id == EOC_TOKEN_ID
    assert config.cross_attention_layer_indices() == [1, 3]
    assert config.text_config.to_dict() == model.config.text_config.to_dict()

    loaded = [
        FlamingoForConditionalGeneration.from_pretrained(tmp_path),
        AutoModelForImageTextToText.from_pretrained(tmp_path),
        AutoModelForImageTextToText.from_pretrained(tmp_path, config=config),
    ]
    for reloaded in loaded:
        assert type(reloaded) is FlamingoForConditionalGeneration
        assert not reloaded.training
        assert reloaded.decoder_layers_path == "model.layers"
        assert sorted(reloaded.gated_cross_attn_layers) == ["1", "3"]
        torch.testing.assert_close(flamingo_logits(reloaded, batch), expected, **EXACT)
        # The cross-attention hooks are live after loading: other images change the logits.
        other = flamingo_logits(reloaded, batch, pixel_values=random_pixels(2, 3, seed=5))
        assert (other - expected).abs().max() > 1e-3


def test_save_load_tied_language_model(tmp_path):
    model = build_model("qwen2")
    open_gates(model)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    batch = interleaved_batch()
    expected = flamingo_logits(model, batch)
    model.save_pretrained(tmp_path)

    keys = checkpoint_keys(tmp_path)
    assert len(keys) == len(set(keys))
    lm_keys = {key for key in keys if key.startswith("language_model.")}
    bare_keys = {f"language_model.{key}" for key in bare_language_model(model).state_dict()}
    assert lm_keys <= bare_keys
    assert bare_keys - lm_keys <= {"language_model.lm_head.weight"}

    for reloaded in (
        FlamingoForConditionalGeneration.from_pretrained(tmp_path),
        AutoModelForImageTextToText.from_pretrained(tmp_path),
    ):
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
        torch.testing.assert_close(flamingo_logits(reloaded, batch), expected, **EXACT)
        other = flamingo_logits(reloaded, batch, pixel_values=random_pixels(2, 3, seed=5))
        assert (other - expected).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------------------
# 2. Checkpoints without the new modules


def test_checkpoint_without_cross_attention_weights(tmp_path):
    model = build_model("llama")
    open_gates(model)
    model.save_pretrained(tmp_path)
    strip_checkpoint(tmp_path, ("gated_cross_attn_layers.",))
    bare = bare_language_model(model)
    batch = interleaved_batch()
    expected = lm_logits(bare, batch)

    for _ in range(3):  # uninitialised memory is intermittent
        reloaded = FlamingoForConditionalGeneration.from_pretrained(tmp_path)
        for gate in gates(reloaded):
            assert torch.equal(gate.detach(), torch.zeros(1))
        for name, param in reloaded.named_parameters():
            assert torch.isfinite(param).all(), name
        # The perceiver came from the checkpoint.
        torch.testing.assert_close(reloaded.perceiver.latents, model.perceiver.latents, **EXACT)
        torch.testing.assert_close(flamingo_logits(reloaded, batch), expected, rtol=0.0, atol=1e-6)


def test_checkpoint_without_cross_attention_and_perceiver_weights(tmp_path):
    model = build_model("llama")
    open_gates(model)
    model.save_pretrained(tmp_path)
    strip_checkpoint(tmp_path, ("gated_cross_attn_layers.", "perceiver."))
    bare = bare_language_model(model)
    batch = interleaved_batch()
    expected = lm_logits(bare, batch)

    for _ in range(3):
        reloaded = FlamingoForConditionalGeneration.from_pretrained(tmp_path)
        for gate in gates(reloaded):
            assert torch.equal(gate.detach(), torch.zeros(1))
        for name, param in reloaded.named_parameters():
            assert torch.isfinite(param).all(), name
        latents = reloaded.perceiver.latents.detach()
        assert torch.isfinite(latents).all()
        assert 0.7 < latents.std().item() < 1.3
        for layer in reloaded.perceiver.layers:
            attention = layer[0]
            torch.testing.assert_close(attention.norm_media.weight.detach(), torch.ones(VISION_DIM), **EXACT)
            torch.testing.assert_close(attention.norm_media.bias.detach(), torch.zeros(VISION_DIM), **EXACT)
        torch.testing.assert_close(flamingo_logits(reloaded, batch), expected, rtol=0.0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# 3. Gradient checkpointing


def _trainable_grads(model, batch, labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    output = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values, labels=labels
    )
    output.loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            grads[name] = param.grad.detach().clone()
    return output.loss.detach(), grads


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_same_gradients(use_reentrant):
    model = build_model("llama")
    assert model.config.text_config.attention_dropout == 0.0
    open_gates(model)
    model.train()
    model.freeze_backbones()
    batch = interleaved_batch()
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)

    loss_plain, grads_plain = _trainable_grads(model, batch, labels)

    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.is_activation_checkpointing
    assert model.language_model.model.layers[1].gradient_checkpointing
    loss_ckpt, grads_ckpt = _trainable_grads(model, batch, labels)

    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0.0, atol=1e-6)
    assert grads_ckpt.keys() == grads_plain.keys()
    assert all(name.startswith(("perceiver.", "gated_cross_attn_layers.")) for name in grads_plain)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=0.0, atol=1e-6, msg=name)

    nonzero = {name for name, grad in grads_ckpt.items() if grad.abs().max() > 0}
    assert any(name.startswith("perceiver.") for name in nonzero)
    assert any(name.startswith("gated_cross_attn_layers.") for name in nonzero)
    for index in ("1", "3"):
        for suffix in ("attn_gate", "ff_gate", "attn.to_kv.weight", "attn.to_q.weight", "ff.1.weight"):
            assert f"gated_cross_attn_layers.{index}.{suffix}" in nonzero
    assert "perceiver.latents" in nonzero

    model.activation_checkpointing_disable()
    _, grads_again = _trainable_grads(model, batch, labels)
    for name in grads_plain:
        torch.testing.assert_close(grads_again[name], grads_plain[name], rtol=0.0, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------------------------------
# 4. Resizing the token embeddings


def test_resize_token_embeddings_untied(tmp_path):
    model = build_model("llama")
    open_gates(model)
    model.resize_token_embeddings(120)

    assert model.get_input_embeddings().weight.shape == (120, 32)
    assert model.get_output_embeddings().weight.shape[0] == 120
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert model.config.text_config.vocab_size == 120
    assert model.language_model.config.vocab_size == 120

    batch = interleaved_batch()
    logits = flamingo_logits(model, batch)
    assert logits.shape == (2, batch.input_ids.shape[1], 120)

    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).text_config.vocab_size == 120
    reloaded = FlamingoForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.get_input_embeddings().weight.shape == (120, 32)
    assert reloaded.get_output_embeddings().weight.shape == (120, 32)
    assert reloaded.config.text_config.vocab_size == 120 == reloaded.language_model.config.vocab_size
    torch.testing.assert_close(flamingo_logits(reloaded, batch), logits, **EXACT)


# --------------------------------------------------------------------------------------------------------------------
# 5. Freezing


def test_freeze_backbones():
    model = build_model("llama")
    model.freeze_backbones()
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable
    assert all(name.startswith(("perceiver.", "gated_cross_attn_layers.")) for name in trainable)
    assert any(name.startswith("perceiver.") for name in trainable)
    assert any(name.startswith("gated_cross_attn_layers.") for name in trainable)
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    assert not any(p.requires_grad for p in model.language_model.parameters())
    n_new = sum(p.numel() for p in model.perceiver.parameters()) + sum(
        p.numel() for p in model.gated_cross_attn_layers.parameters()
    )
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_new


def test_freeze_backbones_train_new_token_embeddings():
    model = build_model("llama")
    open_gates(model)
    model.freeze_backbones(train_new_token_embeddings=True)
    embedding = model.get_input_embeddings().weight
    assert embedding.requires_grad
    assert not model.get_output_embeddings().weight.requires_grad
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    extra = {name for name in trainable if not name.startswith(("perceiver.", "gated_cross_attn_layers."))}
    assert extra == {"language_model.model.embed_tokens.weight"}

    batch = interleaved_batch()
    assert (batch.input_ids == MEDIA_TOKEN_ID).any() and (batch.input_ids == EOC_TOKEN_ID).any()
    model.train()
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    loss = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values, labels=labels
    ).loss
    loss.backward()
    nonzero_rows = embedding.grad.abs().sum(dim=-1).nonzero().flatten().tolist()
    assert nonzero_rows == [MEDIA_TOKEN_ID, EOC_TOKEN_ID]

    # Calling it again without the flag removes the row-mask hook and freezes the embeddings.
    model.freeze_backbones()
    assert not embedding.requires_grad


# --------------------------------------------------------------------------------------------------------------------
# 6. from_backbones


def _tiny_backbones(vision: str = "clip", seed: int = 0):
    torch.manual_seed(seed)
    vision_cls = CLIPVisionModel if vision == "clip" else SiglipVisionModel
    vision_model = vision_cls(vision_config_for(vision)).eval()
    language_model = LlamaForCausalLM(text_config_for("llama")).eval()
    return vision_model, language_model


_BACKBONE_OVERRIDES = dict(
    cross_attn_every_n_layers=2,
    perceiver_depth=2,
    perceiver_num_latents=NUM_LATENTS,
    perceiver_heads=2,
    perceiver_dim_head=8,
    xattn_heads=2,
    xattn_dim_head=8,
)


def _assert_same_state(module_a: nn.Module, module_b: nn.Module) -> None:
    state_a, state_b = module_a.state_dict(), module_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_from_backbones_instances_clip():
    vision_model, language_model = _tiny_backbones("clip")
    reference_lm = copy.deepcopy(language_model)
    reference_vision = copy.deepcopy(vision_model)
    model = FlamingoForConditionalGeneration.from_backbones(
        vision_model, language_model, media_token_id=MEDIA_TOKEN_ID, eoc_token_id=EOC_TOKEN_ID, **_BACKBONE_OVERRIDES
    )
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.media_token_id == MEDIA_TOKEN_ID and model.config.eoc_token_id == EOC_TOKEN_ID
    assert model.language_model is language_model and model.vision_model is vision_model
    _assert_same_state(model.language_model, reference_lm)
    _assert_same_state(model.vision_model, reference_vision)
    for gate in gates(model):
        assert torch.equal(gate.detach(), torch.zeros(1))
    # Only the new modules are trainable.
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable and all(name.startswith(("perceiver.", "gated_cross_attn_layers.")) for name in trainable)

    # (e) Closed gates: exactly the language model, with or without images.
    model.eval()
    batch = interleaved_batch()
    torch.testing.assert_close(flamingo_logits(model, batch), lm_logits(reference_lm, batch), rtol=0.0, atol=1e-6)
    image_features = model.get_image_features(batch.pixel_values)
    # CLIP: 25 patches + CLS, the CLS dropped -> the perceiver still outputs NUM_LATENTS latents per image.
    assert image_features.shape == (2, 3, NUM_LATENTS, VISION_DIM)


def test_from_backbones_instances_siglip():
    vision_model, language_model = _tiny_backbones("siglip")
    reference_lm = copy.deepcopy(language_model)
    model = FlamingoForConditionalGeneration.from_backbones(
        vision_model, language_model, media_token_id=MEDIA_TOKEN_ID, **_BACKBONE_OVERRIDES
    ).eval()
    assert model.config.vision_feature_select_strategy == "full"
    with torch.no_grad():
        image_features = model.get_image_features(random_pixels(2, 3))
    assert image_features.shape == (2, 3, NUM_LATENTS, VISION_DIM)
    assert torch.isfinite(image_features).all()
    batch = interleaved_batch()
    torch.testing.assert_close(flamingo_logits(model, batch), lm_logits(reference_lm, batch), rtol=0.0, atol=1e-6)


def test_from_backbones_local_dirs_with_dtype(tmp_path):
    vision_model, language_model = _tiny_backbones("clip")
    vision_model.save_pretrained(tmp_path / "vision")
    language_model.save_pretrained(tmp_path / "lm")
    model = FlamingoForConditionalGeneration.from_backbones(
        str(tmp_path / "vision"),
        str(tmp_path / "lm"),
        dtype=torch.bfloat16,
        media_token_id=MEDIA_TOKEN_ID,
        **_BACKBONE_OVERRIDES,
    ).eval()
    assert {p.dtype for p in model.language_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.vision_model.parameters()} == {torch.bfloat16}
    assert model.config.vision_feature_select_strategy == "default"
    for name, param in model.language_model.state_dict().items():
        assert torch.equal(param, language_model.state_dict()[name].to(torch.bfloat16)), name

    batch = interleaved_batch()
    logits = flamingo_logits(model, batch)
    assert logits.dtype == torch.bfloat16
    bare = LlamaForCausalLM.from_pretrained(tmp_path / "lm", dtype=torch.bfloat16).eval()
    torch.testing.assert_close(logits, lm_logits(bare, batch), **EXACT)


def _tiny_clip_model(seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = CLIPConfig(
        text_config=text_config.to_dict(), vision_config=vision_config_for("clip").to_dict(), projection_dim=16
    )
    return CLIPModel(config).eval()


def test_from_backbones_composite_clip_instance():
    clip = _tiny_clip_model()
    _, language_model = _tiny_backbones("clip")
    model = FlamingoForConditionalGeneration.from_backbones(
        clip, language_model, media_token_id=MEDIA_TOKEN_ID, **_BACKBONE_OVERRIDES
    ).eval()
    assert isinstance(model.vision_model, CLIPVisionModel)
    assert model.config.vision_config.model_type == "clip_vision_model"
    assert model.config.vision_feature_select_strategy == "default"
    _assert_same_state(model.vision_model, clip.vision_model)
    with torch.no_grad():
        expected = clip.vision_model(pixel_values=random_pixels(1, 1)[0]).last_hidden_state
        actual = model.vision_model(pixel_values=random_pixels(1, 1)[0]).last_hidden_state
    torch.testing.assert_close(actual, expected, **EXACT)


def test_from_backbones_composite_clip_directory(tmp_path):
    clip = _tiny_clip_model()
    clip.save_pretrained(tmp_path / "clip")
    _, language_model = _tiny_backbones("clip")
    model = FlamingoForConditionalGeneration.from_backbones(
        str(tmp_path / "clip"), language_model, media_token_id=MEDIA_TOKEN_ID, **_BACKBONE_OVERRIDES
    ).eval()
    assert isinstance(model.vision_model, CLIPVisionModel)
    _assert_same_state(model.vision_model, clip.vision_model)


def _tokenizer_with_flamingo_tokens():
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<|endofchunk|>"], "pad_token": "<PAD>"})
    return tokenizer


def test_from_backbones_with_tokenizer():
    tokenizer = _tokenizer_with_flamingo_tokens()
    vision_model, language_model = _tiny_backbones("clip")
    reference_lm = copy.deepcopy(language_model)
    model = FlamingoForConditionalGeneration.from_backbones(
        vision_model, language_model, tokenizer=tokenizer, **_BACKBONE_OVERRIDES
    ).eval()
    media_id = tokenizer.convert_tokens_to_ids("<image>")
    eoc_id = tokenizer.convert_tokens_to_ids("<|endofchunk|>")
    assert media_id != eoc_id
    assert model.config.media_token_id == media_id
    assert model.config.eoc_token_id == eoc_id
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    assert model.config.text_config.vocab_size == len(tokenizer) == model.language_model.config.vocab_size
    # The old rows are kept.
    torch.testing.assert_close(
        model.get_input_embeddings().weight[:VOCAB_SIZE],
        reference_lm.get_input_embeddings().weight,
        **EXACT,
    )

    input_ids = torch.tensor([[BOS_TOKEN_ID, 5, media_id, 7, 8, eoc_id, 9]])
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=random_pixels(1, 1)).logits
    assert logits.shape == (1, 7, len(tokenizer))
    with torch.no_grad():
        bare = model.language_model(input_ids=input_ids).logits
    torch.testing.assert_close(logits, bare, rtol=0.0, atol=1e-6)


def test_from_backbones_tokenizer_without_image_token():
    tokenizer = build_tiny_tokenizer()
    vision_model, language_model = _tiny_backbones("clip")
    with pytest.raises(ValueError, match="<image>"):
        FlamingoForConditionalGeneration.from_backbones(vision_model, language_model, tokenizer=tokenizer)


def test_from_backbones_rejects_non_models():
    vision_model, language_model = _tiny_backbones("clip")
    with pytest.raises(TypeError, match="`vision_model` must be"):
        FlamingoForConditionalGeneration.from_backbones(object(), language_model, media_token_id=MEDIA_TOKEN_ID)
    with pytest.raises(TypeError, match="`language_model` must be"):
        FlamingoForConditionalGeneration.from_backbones(vision_model, object(), media_token_id=MEDIA_TOKEN_ID)


# --------------------------------------------------------------------------------------------------------------------
# 7. Bad inputs


def test_more_image_tokens_than_images(llama_model):
    batch = interleaved_batch()
    with pytest.raises(ValueError, match=r"Sample 0 has 3 `<image>` tokens but only 2 image\(s\) per sample"):
        flamingo_logits(llama_model, batch, pixel_values=batch.pixel_values[:, :2])


def test_images_without_image_token(llama_model):
    input_ids = torch.tensor([[BOS_TOKEN_ID, 5, 6, 7], [BOS_TOKEN_ID, 8, 9, 10]])
    with pytest.raises(ValueError, match=r"Images were given but `input_ids` contains no `<image>` token \(id 97\)"):
        llama_model(input_ids=input_ids, pixel_values=random_pixels(2, 1))


def test_image_tokens_without_images(llama_model):
    batch = interleaved_batch()
    with pytest.raises(ValueError, match=r"contains `<image>` tokens \(id 97\) but no `pixel_values`"):
        llama_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)


@pytest.mark.parametrize(
    "shape", [(2, 3, IMAGE_SIZE, IMAGE_SIZE), (2, 3, 1, 1, 3, IMAGE_SIZE, IMAGE_SIZE)], ids=["rank4", "rank7"]
)
def test_pixel_values_of_wrong_rank(llama_model, shape):
    batch = interleaved_batch()
    with pytest.raises(ValueError, match=rf"`pixel_values` must have shape .* got a {len(shape)}-D tensor"):
        flamingo_logits(llama_model, batch, pixel_values=torch.zeros(shape))


def test_pixel_values_not_a_tensor(llama_model):
    batch = interleaved_batch()
    with pytest.raises(TypeError, match="`pixel_values` must be a torch.Tensor, got list"):
        flamingo_logits(llama_model, batch, pixel_values=batch.pixel_values.tolist())


def test_pixel_values_and_image_hidden_states(llama_model):
    batch = interleaved_batch()
    with pytest.raises(ValueError, match="Pass either `pixel_values` or `image_hidden_states`, not both"):
        flamingo_logits(llama_model, batch, image_hidden_states=torch.zeros(2, 3, NUM_LATENTS, VISION_DIM))


def test_image_hidden_states_of_wrong_shape(llama_model):
    batch = interleaved_batch()
    with pytest.raises(ValueError, match=r"`image_hidden_states` must have shape"):
        llama_model(input_ids=batch.input_ids, image_hidden_states=torch.zeros(2, 3 * NUM_LATENTS, VISION_DIM))
    with pytest.raises(ValueError, match="Got images for 1 samples but `input_ids` has 2 rows"):
        llama_model(input_ids=batch.input_ids, image_hidden_states=torch.zeros(1, 3, NUM_LATENTS, VISION_DIM))


def test_cache_continuation_with_images_needs_token_image_index(llama_model):
    batch = interleaved_batch()
    with torch.no_grad():
        out = llama_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            use_cache=True,
        )
        with pytest.raises(
            ValueError, match="Continuing from a non-empty cache with images needs `token_image_index`"
        ):
            llama_model(
                input_ids=torch.tensor([[30], [31]]),
                attention_mask=torch.cat([batch.attention_mask, torch.ones(2, 1, dtype=torch.long)], dim=1),
                cache=cache_from_output(out),
                image_hidden_states=out.image_hidden_states,
            )


def test_config_without_media_token_id():
    config = flamingo_config("llama", media_token_id=None)
    with pytest.raises(ValueError, match=r"`config.media_token_id` is not set"):
        FlamingoForConditionalGeneration(config)


def test_config_image_token_id_is_the_media_token_id(tmp_path):
    config = flamingo_config("llama", media_token_id=7)
    assert config.image_token_id == 7
    config.image_token_id = 9  # set under transformers' name, stored once under ours
    assert config.media_token_id == 9 and "image_token_id" not in config.to_dict()
    config.save_pretrained(tmp_path)
    assert FlamingoConfig.from_pretrained(tmp_path).image_token_id == 9
    assert flamingo_config("llama", media_token_id=None, image_token_id=11).media_token_id == 11


def test_forward_without_input_ids(llama_model):
    with pytest.raises(ValueError, match="needs `input_ids`"):
        llama_model(pixel_values=random_pixels(2, 1))


class _ListLMConfig(PretrainedConfig):
    model_type = "flamingo_test_list_lm"

    def __init__(self, vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=4, layout="two_lists", **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.layout = layout
        super().__init__(**kwargs)


class _ListLMBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + torch.tanh(self.proj(self.norm(hidden_states)))


class _ListLM(PreTrainedModel):
    """A causal LM whose decoder layers the generic discovery cannot find unambiguously.

    `layout="two_lists"`: two equal `nn.ModuleList`s of identical blocks (`blocks` and `side_blocks`);
    `layout="dict"`: the blocks live in an `nn.ModuleDict`;
    `layout="plain_list"`: the blocks live in a plain Python list (not registered as submodules).
    """

    config_class = _ListLMConfig
    base_model_prefix = "list_lm"

    def __init__(self, config: _ListLMConfig):
        super().__init__(config)
        dim, n = config.hidden_size, config.num_hidden_layers
        self.embed = nn.Embedding(config.vocab_size, dim)
        if config.layout == "two_lists":
            self.blocks = nn.ModuleList(_ListLMBlock(dim) for _ in range(n))
            self.side_blocks = nn.ModuleList(_ListLMBlock(dim) for _ in range(n))
        elif config.layout == "dict":
            self.blocks = nn.ModuleDict({f"layer_{i}": _ListLMBlock(dim) for i in range(n)})
        elif config.layout == "plain_list":
            self._plain_blocks = [_ListLMBlock(dim) for _ in range(n)]
        else:
            raise ValueError(config.layout)
        self.head = nn.Linear(dim, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        pass

    def _layers(self) -> list[nn.Module]:
        if self.config.layout == "two_lists":
            return [layer for pair in zip(self.blocks, self.side_blocks, strict=True) for layer in pair]
        if self.config.layout == "dict":
            return list(self.blocks.values())
        return self._plain_blocks

    def get_input_embeddings(self):
        return self.embed

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=None,
        labels=None,
        return_dict=None,
        **kwargs,
    ):
        hidden_states = self.embed(input_ids)
        for layer in self._layers():
            hidden_states = layer(hidden_states)
        return CausalLMOutputWithPast(logits=self.head(hidden_states))


def _list_lm(layout: str, seed: int = 0) -> _ListLM:
    torch.manual_seed(seed)
    return _ListLM(_ListLMConfig(layout=layout)).eval()


def _list_lm_flamingo_config(language_model: _ListLM, **overrides) -> FlamingoConfig:
    kwargs = dict(
        vision_config=vision_config_for("clip"),
        text_config=language_model.config,
        media_token_id=MEDIA_TOKEN_ID,
        eoc_token_id=EOC_TOKEN_ID,
        **_BACKBONE_OVERRIDES,
    )
    kwargs.update(overrides)
    return FlamingoConfig(**kwargs)


@pytest.mark.parametrize("layout", ["two_lists", "dict", "plain_list"])
def test_undiscoverable_decoder_layers(layout):
    language_model = _list_lm(layout)
    config = _list_lm_flamingo_config(language_model)
    with pytest.raises(ValueError, match=r"Could not find the decoder layers of _ListLM.*`decoder_layers_attr"):
        FlamingoForConditionalGeneration(config, language_model=language_model)
    vision_model = CLIPVisionModel(vision_config_for("clip"))
    with pytest.raises(ValueError, match="decoder_layers_attr"):
        FlamingoForConditionalGeneration.from_backbones(
            vision_model, language_model, media_token_id=MEDIA_TOKEN_ID, **_BACKBONE_OVERRIDES
        )


def test_explicit_decoder_layers_attr():
    language_model = _list_lm("two_lists")
    config = _list_lm_flamingo_config(language_model, decoder_layers_attr="blocks")
    torch.manual_seed(0)
    model = FlamingoForConditionalGeneration(config, language_model=language_model).eval()
    assert model.decoder_layers_path == "blocks"
    for index, block in enumerate(language_model.blocks):
        assert bool(block._forward_pre_hooks) == (index in (1, 3))
    assert not any(block._forward_pre_hooks for block in language_model.side_blocks)

    input_ids = torch.tensor([[BOS_TOKEN_ID, 5, MEDIA_TOKEN_ID, 7, 8, EOC_TOKEN_ID, MEDIA_TOKEN_ID, 9, 10]])
    pixels = random_pixels(1, 2)
    with torch.no_grad():
        bare = language_model(input_ids=input_ids).logits
        closed = model(input_ids=input_ids, pixel_values=pixels).logits
    torch.testing.assert_close(closed, bare, rtol=0.0, atol=1e-6)

    open_gates(model)
    with torch.no_grad():
        opened = model(input_ids=input_ids, pixel_values=pixels).logits
        other = model(input_ids=input_ids, pixel_values=random_pixels(1, 2, seed=3)).logits
        after = language_model(input_ids=input_ids).logits
    # Tokens before the first image see only the gated feed-forward branch, which ignores the images.
    torch.testing.assert_close(opened[:, :2], other[:, :2], rtol=0.0, atol=1e-6)
    assert (opened[:, 2:] - other[:, 2:]).abs().max() > 1e-3
    assert (opened - bare).abs().max() > 1e-3
    # The language model called alone is still the bare model.
    torch.testing.assert_close(after, bare, **EXACT)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("model.layers", "does not name a submodule"),
        ("blocks.0", "names a _ListLMBlock, expected the nn.ModuleList"),
        ("embed", "names a Embedding"),
    ],
)
def test_wrong_decoder_layers_attr(path, message):
    language_model = _list_lm("two_lists")
    config = _list_lm_flamingo_config(language_model, decoder_layers_attr=path)
    with pytest.raises(ValueError, match=message):
        FlamingoForConditionalGeneration(config, language_model=language_model)


def test_decoder_layers_attr_of_wrong_length():
    language_model = _list_lm("two_lists")
    language_model.short_blocks = nn.ModuleList(_ListLMBlock(32) for _ in range(3))
    config = _list_lm_flamingo_config(language_model, decoder_layers_attr="short_blocks")
    with pytest.raises(ValueError, match="holds 3 modules but the language model config declares 4 layers"):
        FlamingoForConditionalGeneration(config, language_model=language_model)


def test_wrong_decoder_layers_attr_on_llama():
    with pytest.raises(ValueError, match=r"`decoder_layers_attr='model.decoder.layers'` does not name a submodule"):
        build_model("llama", decoder_layers_attr="model.decoder.layers")
    model = build_model("llama", decoder_layers_attr="model.layers")
    assert model.decoder_layers_path == "model.layers"


# --------------------------------------------------------------------------------------------------------------------
# 8. No stale state


def test_language_model_alone_is_bare_after_flamingo_forward():
    model = build_model("llama")
    open_gates(model)
    bare = bare_language_model(model)
    batch = interleaved_batch()
    expected = lm_logits(bare, batch)
    flamingo = flamingo_logits(model, batch)
    assert (flamingo - expected).abs().max() > 1e-3
    torch.testing.assert_close(lm_logits(model.language_model, batch), expected, **EXACT)
    with torch.no_grad():
        no_mask = model.language_model(batch.input_ids[:1, :5]).logits
        bare_no_mask = bare(batch.input_ids[:1, :5]).logits
    torch.testing.assert_close(no_mask, bare_no_mask, **EXACT)
    # A forward rejected for bad inputs leaves no conditioning behind either.
    with pytest.raises(ValueError):
        flamingo_logits(model, batch, pixel_values=batch.pixel_values[:, :2])
    torch.testing.assert_close(lm_logits(model.language_model, batch), expected, **EXACT)


def test_language_model_alone_is_bare_after_checkpointed_training_forward():
    """Training with gradient checkpointing must not leave the cross-attention conditioning on the decoder layers
    once forward and backward are done (transformers >= 5 checkpoints `forward`, so the pre-hooks do not re-run
    during backward)."""
    model = build_model("llama")
    open_gates(model)
    model.train()
    model.freeze_backbones()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    bare = bare_language_model(model).train()
    batch = interleaved_batch()
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    loss = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values, labels=labels
    ).loss
    loss.backward()

    torch.testing.assert_close(lm_logits(model.language_model, batch), lm_logits(bare, batch), **EXACT)
    short = batch.input_ids[:1, :5]
    with torch.no_grad():
        torch.testing.assert_close(model.language_model(short).logits, bare(short).logits, **EXACT)


def test_deepcopy_is_independent():
    model = build_model("llama")
    open_gates(model)
    batch = interleaved_batch()
    original = flamingo_logits(model, batch)

    copied = copy.deepcopy(model)
    assert copied.decoder_layers_path == "model.layers"
    torch.testing.assert_close(flamingo_logits(copied, batch), original, **EXACT)

    with torch.no_grad():
        for block in copied.gated_cross_attn_layers.values():
            block.attn_gate.fill_(-2.0)
    changed = flamingo_logits(copied, batch)
    assert (changed - original).abs().max() > 1e-3
    torch.testing.assert_close(flamingo_logits(model, batch), original, **EXACT)

    # Closing the copy's gates makes the copy the bare LM; the original keeps its behaviour.
    with torch.no_grad():
        for gate in gates(copied):
            gate.zero_()
    torch.testing.assert_close(
        flamingo_logits(copied, batch), lm_logits(bare_language_model(model), batch), rtol=0.0, atol=1e-6
    )
    torch.testing.assert_close(flamingo_logits(model, batch), original, **EXACT)


# --------------------------------------------------------------------------------------------------------------------
# 9. Video inputs and limits


def test_video_frames():
    model = build_model("llama", max_num_frames=3)
    open_gates(model)
    assert model.perceiver.frame_embs.shape == (3, VISION_DIM)
    batch = interleaved_batch()
    video = torch.randn(2, 3, 2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=video)
    assert out.image_hidden_states.shape == (2, 3, NUM_LATENTS, VISION_DIM)
    assert out.logits.shape == (2, batch.input_ids.shape[1], VOCAB_SIZE)
    assert torch.isfinite(out.logits).all()
    # The frames matter: changing the second frame changes the result.
    video_2 = video.clone()
    video_2[:, :, 1] = torch.randn(2, 3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features_2 = model.get_image_features(video_2)
    assert (features_2 - out.image_hidden_states).abs().max() > 1e-3

    too_many_frames = torch.zeros(2, 3, 4, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ValueError, match="Got 4 frames per image but `max_num_frames` is 3"):
        flamingo_logits(model, batch, pixel_values=too_many_frames)


def test_max_num_media():
    model = build_model("llama", max_num_media=2)
    assert model.perceiver.media_time_embs.shape == (2, 1, VISION_DIM)
    batch = interleaved_batch()
    with pytest.raises(ValueError, match="Got 3 images per sample but `max_num_media` is 2"):
        flamingo_logits(model, batch)
    input_ids = torch.tensor([[BOS_TOKEN_ID, MEDIA_TOKEN_ID, 5, EOC_TOKEN_ID, MEDIA_TOKEN_ID, 6]])
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=random_pixels(1, 2))
    assert out.image_hidden_states.shape == (1, 2, NUM_LATENTS, VISION_DIM)


# --------------------------------------------------------------------------------------------------------------------
# 10. Manual cache continuation


def test_manual_cache_continuation_matches_full_forward():
    model = build_model("llama")
    open_gates(model)
    batch = interleaved_batch()
    last_image_index = (batch.input_ids == MEDIA_TOKEN_ID).sum(dim=-1)
    assert last_image_index.tolist() == [3, 2]

    with torch.no_grad():
        prompt = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            use_cache=True,
        )
    assert cache_from_output(prompt).get_seq_length() == batch.input_ids.shape[1]

    # Two steps: an ordinary token, then an `<image>` token (which must not start a new image).
    input_ids, attention_mask, cache = batch.input_ids, batch.attention_mask, cache_from_output(prompt)
    first_step_logits = first_step_mask = None
    for next_token in ([[30], [31]], [[MEDIA_TOKEN_ID], [MEDIA_TOKEN_ID]]):
        next_token = torch.tensor(next_token)
        input_ids = torch.cat([input_ids, next_token], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones(2, 1, dtype=attention_mask.dtype)], dim=1)
        with torch.no_grad():
            step = model(
                input_ids=next_token,
                attention_mask=attention_mask,
                cache=cache,
                image_hidden_states=prompt.image_hidden_states,
                token_image_index=last_image_index[:, None],
                use_cache=True,
            )
            full = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=batch.pixel_values,
                token_image_index=torch.minimum((input_ids == MEDIA_TOKEN_ID).cumsum(-1), last_image_index[:, None]),
            )
        cache = cache_from_output(step)
        if first_step_logits is None:
            first_step_logits, first_step_mask = step.logits[:, -1], attention_mask
        assert step.logits.shape == (2, 1, VOCAB_SIZE)
        torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=0.0, atol=1e-5)

    # The continued tokens do attend to the images: pointing them at another image changes their logits.
    with torch.no_grad():
        fresh = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            image_hidden_states=prompt.image_hidden_states,
            use_cache=True,
        )
        step_first_image = model(
            input_ids=torch.tensor([[30], [31]]),
            attention_mask=first_step_mask,
            cache=cache_from_output(fresh),
            image_hidden_states=prompt.image_hidden_states,
            token_image_index=torch.tensor([[1], [1]]),
        )
    assert (step_first_image.logits[:, -1] - first_step_logits).abs().max() > 1e-3
