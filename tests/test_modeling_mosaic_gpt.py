"""Tests of the native MosaicGPT port (`MosaicGPTForCausalLM`) and its conversions: parity with transformers' MPT and
with a slow explicit reference, KV cache and padding, generation, serialisation (including a remote-code directory),
embeddings, low-precision LayerNorm, gradient checkpointing and config validation."""

from __future__ import annotations

import json
import math

import mosaic_gpt_conversion
import pytest
import torch
import torch.nn.functional as F
from mosaic_gpt_conversion import mosaic_gpt_state_dict_from_remote_code, mosaic_gpt_to_mpt
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, MptForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.models.mpt import modeling_mpt

import hf_flamingo  # noqa: F401  (registers the Auto classes)
from hf_flamingo import MosaicGPTConfig, MosaicGPTForCausalLM
from hf_flamingo.cache_compat import cache_from_output
from hf_flamingo.modeling_mosaic_gpt import MosaicGPTLayerNorm, alibi_slopes

VOCAB_SIZE = 99
TOL = dict(rtol=0.0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Helpers


def tiny_config(**overrides) -> MosaicGPTConfig:
    """A 2-layer, 64-wide MosaicGPT; `init_std=0.2` makes the logits peaked enough for generation to be informative."""
    values = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=VOCAB_SIZE, max_seq_len=64, init_std=0.2)
    values.update(overrides)
    return MosaicGPTConfig(**values)


def build_model(seed: int = 0, randomize_norms_and_biases: bool = False, **overrides) -> MosaicGPTForCausalLM:
    torch.manual_seed(seed)
    model = MosaicGPTForCausalLM(tiny_config(**overrides)).eval()
    if randomize_norms_and_biases:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith(".bias"):
                    parameter.normal_(std=0.1)
                elif "ln" in name.rsplit(".", 2)[-2]:
                    parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
    return model


def left_padded_batch(seed: int = 1, lengths: tuple[int, ...] = (9, 5, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids with left padding (pad id 0) to the longest length, and the matching attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.randint(1, VOCAB_SIZE, (len(lengths), width), generator=generator)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, width - length :] = 1
        input_ids[row, : width - length] = 0
    return input_ids, attention_mask


def greedy(model, input_ids, attention_mask, **kwargs) -> torch.Tensor:
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, **kwargs}
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def max_diff_on(a: torch.Tensor, b: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Largest absolute difference of two `(batch, seq, vocab)` tensors over the non-padding positions."""
    keep = attention_mask.bool()
    return (a.double() - b.double()).abs()[keep].max().item()


def mosaic_gpt_alibi_for_mpt(num_heads, sequence_length, alibi_bias_max=8, device=None):
    """Drop-in for transformers' `build_mpt_alibi_tensor` with MosaicGPT's slopes."""
    offsets = torch.arange(1 - sequence_length, 1, dtype=torch.float32, device=device).view(1, 1, sequence_length)
    return alibi_slopes(num_heads, alibi_bias_max, device).view(num_heads, 1, 1) * offsets


def as_mpt(model: MosaicGPTForCausalLM) -> MptForCausalLM:
    mpt_config, state_dict = mosaic_gpt_to_mpt(model.config, model.state_dict())
    mpt = MptForCausalLM(mpt_config).eval()
    mpt.load_state_dict(state_dict, strict=True)
    return mpt


def slow_reference_logits(model: MosaicGPTForCausalLM, input_ids, attention_mask) -> torch.Tensor:
    """MosaicGPT written out in float64 with per-head loops, an element-by-element ALiBi bias `-slope * (i - j)` and an
    explicit causal/padding mask. Rows of padding queries are left at zero."""
    config = model.config
    weights = {name: tensor.double() for name, tensor in model.state_dict().items()}
    d_model, n_heads = config.d_model, config.n_heads
    head_dim = d_model // n_heads
    scale = config.softmax_scale if config.softmax_scale is not None else 1 / math.sqrt(head_dim)
    batch, length = input_ids.shape

    def layer_norm(x, prefix):
        return F.layer_norm(x, (d_model,), weights[f"{prefix}.weight"], weights.get(f"{prefix}.bias"), 1e-5)

    def linear(x, prefix):
        out = x @ weights[f"{prefix}.weight"].T
        return out + weights[f"{prefix}.bias"] if f"{prefix}.bias" in weights else out

    allowed = torch.zeros(batch, length, length, dtype=torch.bool)
    for b in range(batch):
        for i in range(length):
            for j in range(length):
                allowed[b, i, j] = j <= i and bool(attention_mask[b, j])
    alibi = torch.zeros(n_heads, length, length, dtype=torch.float64)
    for h in range(n_heads):
        slope = 2.0 ** (-(h + 1) * config.alibi_bias_max / n_heads)
        for i in range(length):
            for j in range(length):
                alibi[h, i, j] = -slope * (i - j)

    x = weights["transformer.wte.weight"][input_ids]
    for layer in range(config.n_layers):
        prefix = f"transformer.blocks.{layer}"
        qkv = linear(layer_norm(x, f"{prefix}.ln_1"), f"{prefix}.attn.Wqkv")
        if config.attn_clip_qkv:
            qkv = qkv.clamp(-config.attn_clip_qkv, config.attn_clip_qkv)
        q, k, v = qkv[..., :d_model], qkv[..., d_model : 2 * d_model], qkv[..., 2 * d_model :]
        if config.attn_qk_ln:
            q, k = layer_norm(q, f"{prefix}.attn.q_ln"), layer_norm(k, f"{prefix}.attn.k_ln")
        context = torch.zeros_like(q)
        for b in range(batch):
            for h in range(n_heads):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                for i in range(length):
                    if not attention_mask[b, i]:
                        continue
                    scores = q[b, i, cols] @ k[b, :, cols].T * scale + alibi[h, i]
                    scores = scores.masked_fill(~allowed[b, i], float("-inf"))
                    context[b, i, cols] = scores.softmax(-1) @ v[b, :, cols]
        x = x + linear(context, f"{prefix}.attn.out_proj")
        hidden = F.gelu(linear(layer_norm(x, f"{prefix}.ln_2"), f"{prefix}.mlp.mlp_up"))
        x = x + linear(hidden, f"{prefix}.mlp.mlp_down")
    logits = layer_norm(x, "transformer.ln_f") @ weights["transformer.wte.weight"].T
    return logits * model.logit_scale if model.logit_scale is not None else logits


def remote_code_config_dict(config: MosaicGPTConfig) -> dict:
    """The `config.json` of the remote code (`mosaic_gpt`, transformers 4.27 era) for the sizes of `config`."""
    return {
        "_name_or_path": "anas-awadalla/mpt-1b-redpajama-200b",
        "alibi": config.alibi,
        "alibi_bias_max": config.alibi_bias_max,
        "architectures": ["MosaicGPT"],
        "attn_clip_qkv": None,
        "attn_impl": "torch",
        "attn_pdrop": 0,
        "attn_qk_ln": config.attn_qk_ln,
        "attn_uses_sequence_id": False,
        "auto_map": {
            "AutoConfig": "configuration_mosaic_gpt.MosaicGPTConfig",
            "AutoModelForCausalLM": "mosaic_gpt.MosaicGPT",
        },
        "d_model": config.d_model,
        "emb_init_std": None,
        "emb_init_uniform_lim": None,
        "emb_pdrop": 0,
        "embedding_fraction": 1.0,
        "fan_mode": "fan_in",
        "init_device": "cpu",
        "init_div_is_residual": True,
        "init_gain": 0,
        "init_nonlinearity": "relu",
        "init_std": 0.02,
        "logit_scale": None,
        "low_precision_layernorm": True,
        "max_seq_len": config.max_seq_len,
        "mlp_ratio": config.mlp_ratio,
        "model_type": "mosaic_gpt",
        "n_heads": config.n_heads,
        "n_layers": config.n_layers,
        "no_bias": config.no_bias,
        "param_init_fn": "kaiming_normal_",
        "prefix_lm": False,
        "resid_pdrop": 0,
        "softmax_scale": None,
        "tokenizer_name": "EleutherAI/gpt-neox-20b",
        "torch_dtype": "float32",
        "transformers_version": "4.27.4",
        "use_cache": False,
        "verbose": 0,
        "vocab_size": config.vocab_size,
    }


# --------------------------------------------------------------------------------------------------------------------
# Independent references


@pytest.mark.parametrize("no_bias", [True, False])
@pytest.mark.parametrize("n_heads", [4, 8])
def test_matches_transformers_mpt(no_bias, n_heads):
    """Without q/k LayerNorm, MosaicGPT and transformers' MptForCausalLM built by `mosaic_gpt_to_mpt` agree."""
    model = build_model(attn_qk_ln=False, no_bias=no_bias, n_heads=n_heads)  # biases start at zero
    mpt = as_mpt(model)
    input_ids, attention_mask = left_padded_batch()
    with torch.no_grad():
        ours = model(input_ids, attention_mask=attention_mask).logits
        theirs = mpt(input_ids, attention_mask=attention_mask).logits
    assert max_diff_on(ours, theirs, attention_mask) <= 1e-5
    assert torch.equal(greedy(model, input_ids, attention_mask), greedy(mpt, input_ids, attention_mask))


def test_non_power_of_two_heads_differ_from_mpt_only_in_alibi_slopes(monkeypatch):
    """MosaicGPT's slopes are `2 ** (-h * 8 / H)` for every H (mosaicml/examples v0.0.4, the code MPT-1B was trained
    with); transformers' MPT interleaves the slopes of the next power of two. With 6 heads the conversion is refused,
    and an MPT patched to MosaicGPT's slopes gives the same logits."""
    model = build_model(attn_qk_ln=False, d_model=72, n_heads=6)
    expected = torch.tensor([2.0 ** (-h * 8 / 6) for h in range(1, 7)])
    torch.testing.assert_close(alibi_slopes(6, 8), expected, rtol=1e-6, atol=0)
    mpt_slopes = -modeling_mpt.build_mpt_alibi_tensor(6, 2, 8)[:, 0, 0]
    assert not torch.allclose(mpt_slopes, expected)

    with pytest.raises(ValueError, match="n_heads=6"):
        mosaic_gpt_to_mpt(model.config, model.state_dict())

    monkeypatch.setattr(mosaic_gpt_conversion, "build_mpt_alibi_tensor", mosaic_gpt_alibi_for_mpt)
    mpt = as_mpt(model)
    input_ids, attention_mask = left_padded_batch()
    with torch.no_grad():
        ours = model(input_ids, attention_mask=attention_mask).logits
        stock_mpt = mpt(input_ids, attention_mask=attention_mask).logits
        monkeypatch.setattr(modeling_mpt, "build_mpt_alibi_tensor", mosaic_gpt_alibi_for_mpt)
        patched_mpt = mpt(input_ids, attention_mask=attention_mask).logits
    assert max_diff_on(ours, stock_mpt, attention_mask) > 1e-3
    assert max_diff_on(ours, patched_mpt, attention_mask) <= 1e-5


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(no_bias=False),
        dict(n_heads=8, attn_clip_qkv=0.5, logit_scale="inv_sqrt_d_model"),
        dict(d_model=72, n_heads=6, softmax_scale=0.3),
    ],
    ids=["qk_ln", "qk_ln-bias", "clip-logit_scale", "6_heads-softmax_scale"],
)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_matches_slow_reference(overrides, attn_implementation):
    model = build_model(randomize_norms_and_biases=True, **overrides)
    model.set_attn_implementation(attn_implementation)
    input_ids, attention_mask = left_padded_batch(lengths=(8, 5))
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
    assert max_diff_on(logits, slow_reference_logits(model, input_ids, attention_mask), attention_mask) <= 1e-5


def test_learned_position_embedding_matches_reference_positions():
    """`alibi=False` adds `transformer.wpe` at positions counted over the non-padding tokens, like the remote code."""
    model = build_model(alibi=False)
    assert "transformer.wpe.weight" in model.state_dict()
    input_ids, attention_mask = left_padded_batch()
    with torch.no_grad():
        batched = model(input_ids, attention_mask=attention_mask).logits
        for row in range(input_ids.shape[0]):
            keep = attention_mask[row].bool()
            single = model(input_ids[row : row + 1, keep]).logits[0]
            torch.testing.assert_close(batched[row, keep], single, **TOL)
    assert torch.equal(
        greedy(model, input_ids, attention_mask, use_cache=True),
        greedy(model, input_ids, attention_mask, use_cache=False),
    )
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


# --------------------------------------------------------------------------------------------------------------------
# Cache, padding and generation


def test_greedy_generation_cache_on_off_identical():
    model = build_model()
    input_ids, attention_mask = left_padded_batch()
    with_cache = greedy(model, input_ids, attention_mask, use_cache=True, max_new_tokens=8)
    without_cache = greedy(model, input_ids, attention_mask, use_cache=False, max_new_tokens=8)
    assert torch.equal(with_cache, without_cache)


def test_stepwise_decoding_with_dynamic_cache_matches_full_forward():
    model = build_model()
    input_ids, attention_mask = left_padded_batch()
    prompt_length = 6
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask).logits
        cache = DynamicCache(config=model.config)
        out = model(
            input_ids[:, :prompt_length],
            attention_mask=attention_mask[:, :prompt_length],
            cache=cache,
            use_cache=True,
        )
        steps = [out.logits]
        for position in range(prompt_length, input_ids.shape[1]):
            out = model(
                input_ids[:, position : position + 1],
                attention_mask=attention_mask[:, : position + 1],
                cache=cache_from_output(out),
                use_cache=True,
            )
            steps.append(out.logits)
    assert cache_from_output(out) is cache and cache.get_seq_length() == input_ids.shape[1]
    assert max_diff_on(torch.cat(steps, dim=1), full, attention_mask) <= 1e-5


def test_left_padded_batch_matches_single_samples():
    model = build_model()
    input_ids, attention_mask = left_padded_batch()
    width = input_ids.shape[1]
    with torch.no_grad():
        batched_logits = model(input_ids, attention_mask=attention_mask).logits
    batched_tokens = greedy(model, input_ids, attention_mask)
    for row in range(input_ids.shape[0]):
        keep = attention_mask[row].bool()
        single_ids = input_ids[row : row + 1, keep]
        with torch.no_grad():
            single_logits = model(single_ids).logits[0]
        torch.testing.assert_close(batched_logits[row, keep], single_logits, **TOL)
        single_tokens = greedy(model, single_ids, torch.ones_like(single_ids))
        assert torch.equal(batched_tokens[row, width:], single_tokens[0, single_ids.shape[1] :])


def test_beam_search_cache_on_off_identical():
    model = build_model()
    input_ids, attention_mask = left_padded_batch(lengths=(7, 4))
    kwargs = dict(num_beams=3, max_new_tokens=5, early_stopping=True)
    with_cache = greedy(model, input_ids, attention_mask, use_cache=True, **kwargs)
    without_cache = greedy(model, input_ids, attention_mask, use_cache=False, **kwargs)
    assert with_cache.shape == (2, input_ids.shape[1] + 5)
    assert torch.equal(with_cache, without_cache)


def test_eager_attention_returns_attentions_and_matches_sdpa():
    model = build_model()
    input_ids, attention_mask = left_padded_batch()
    with torch.no_grad():
        sdpa = model(input_ids, attention_mask=attention_mask).logits
        model.set_attn_implementation("eager")
        out = model(input_ids, attention_mask=attention_mask, output_attentions=True, output_hidden_states=True)
    assert max_diff_on(out.logits, sdpa, attention_mask) <= 1e-5
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 4, 9, 9)
    assert len(out.hidden_states) == 3
    # Real queries give padding keys (row 1 has 4) and future keys exactly zero weight.
    assert out.attentions[0][1, :, 4:, :4].abs().max() == 0
    assert out.attentions[0][1, :, 4:, 4:].triu(diagonal=1).abs().max() == 0


def test_loss_logits_to_keep_and_num_items_in_batch():
    model = build_model()
    input_ids, attention_mask = left_padded_batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB_SIZE), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    summed = model(input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=torch.tensor(1)).loss
    torch.testing.assert_close(summed, expected * (labels[:, 1:] != -100).sum())
    last = model(input_ids, attention_mask=attention_mask, logits_to_keep=1).logits
    torch.testing.assert_close(last, out.logits[:, -1:], **TOL)


# --------------------------------------------------------------------------------------------------------------------
# Serialisation and loading


def test_save_and_auto_class_round_trip(tmp_path):
    model = build_model()
    input_ids, attention_mask = left_padded_batch()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        assert "lm_head.weight" not in saved.keys() and "transformer.wte.weight" in saved.keys()

    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is MosaicGPTConfig
    assert {**config.to_dict(), "_name_or_path": ""} == {**model.config.to_dict(), "_name_or_path": ""}
    reloaded = MosaicGPTForCausalLM.from_pretrained(tmp_path).eval()
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(auto) is MosaicGPTForCausalLM
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
        for loaded in (reloaded, auto):
            assert loaded.lm_head.weight is loaded.transformer.wte.weight
            assert torch.equal(loaded(input_ids, attention_mask=attention_mask).logits, expected)


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_loads_remote_code_directory_without_remote_files(tmp_path, weights_file):
    """A directory laid out like `anas-awadalla/mpt-1b-redpajama-200b` (remote-code `config.json` with `auto_map`,
    weights without `lm_head`, but without the `.py` files) loads as the native class, with or without
    `trust_remote_code`: a registered class outside `transformers` takes precedence over `auto_map`."""
    source = build_model(randomize_norms_and_biases=True)
    remote_state_dict = {
        key: tensor.clone() for key, tensor in source.state_dict().items() if not key.startswith("lm_head")
    }
    (tmp_path / "config.json").write_text(json.dumps(remote_code_config_dict(source.config), indent=2))
    if weights_file.endswith(".safetensors"):
        save_file(remote_state_dict, tmp_path / weights_file, metadata={"format": "pt"})
    else:
        torch.save(remote_state_dict, tmp_path / weights_file)

    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is MosaicGPTConfig and config.auto_map["AutoModelForCausalLM"] == "mosaic_gpt.MosaicGPT"
    assert config.low_precision_layernorm and config.tokenizer_name == "EleutherAI/gpt-neox-20b"

    input_ids, attention_mask = left_padded_batch()
    with torch.no_grad():
        expected = source(input_ids, attention_mask=attention_mask).logits
    for kwargs in ({}, {"trust_remote_code": True}):
        model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, **kwargs)
        assert type(model) is MosaicGPTForCausalLM
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert model.lm_head.weight is model.transformer.wte.weight
        with torch.no_grad():
            assert torch.equal(model.eval()(input_ids, attention_mask=attention_mask).logits, expected)


def test_remote_state_dict_validation():
    model = build_model(no_bias=False)
    state_dict = model.state_dict()
    converted = mosaic_gpt_state_dict_from_remote_code(state_dict)
    assert "lm_head.weight" not in converted and converted.keys() == state_dict.keys() - {"lm_head.weight"}
    assert converted.keys() == mosaic_gpt_state_dict_from_remote_code(converted, model.config).keys()

    broken = dict(converted)
    del broken["transformer.blocks.1.attn.k_ln.bias"]
    broken["transformer.blocks.0.attn.rotary.inv_freq"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"Missing keys: transformer\.blocks\.1\.attn\.k_ln\.bias") as error:
        mosaic_gpt_state_dict_from_remote_code(broken, model.config)
    assert "Unexpected keys: transformer.blocks.0.attn.rotary.inv_freq" in str(error.value)
    with pytest.raises(ValueError, match="Wrong shapes"):
        mosaic_gpt_state_dict_from_remote_code(converted, tiny_config(no_bias=False, mlp_ratio=2))
    untied = dict(converted, **{"lm_head.weight": torch.zeros_like(converted["transformer.wte.weight"])})
    with pytest.raises(ValueError, match="lm_head.weight"):
        mosaic_gpt_state_dict_from_remote_code(untied)


def test_mpt_conversion_refuses_what_mpt_cannot_compute():
    with pytest.raises(ValueError, match="attn_qk_ln"):
        mosaic_gpt_to_mpt(tiny_config(), build_model().state_dict())
    biased = build_model(attn_qk_ln=False, no_bias=False, randomize_norms_and_biases=True)
    with pytest.raises(ValueError, match="non-zero biases"):
        mosaic_gpt_to_mpt(biased.config, biased.state_dict())
    for overrides in (dict(mlp_ratio=2), dict(alibi=False), dict(logit_scale=0.5), dict(resid_pdrop=0.1)):
        model = build_model(attn_qk_ln=False, **overrides)
        with pytest.raises(ValueError, match="cannot be converted"):
            mosaic_gpt_to_mpt(model.config, model.state_dict())


# --------------------------------------------------------------------------------------------------------------------
# Embeddings, precision, training


def test_resize_token_embeddings_keeps_output_tied():
    model = build_model()
    model.resize_token_embeddings(80)
    assert model.config.vocab_size == 80
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.lm_head.weight.shape == (80, 64)
    with torch.no_grad():
        assert model(torch.randint(0, 80, (2, 5))).logits.shape == (2, 5, 80)


def test_low_precision_layernorm_runs_in_autocast_dtype():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64)
    low, plain = MosaicGPTLayerNorm(64, low_precision=True), MosaicGPTLayerNorm(64, low_precision=False)
    with torch.no_grad():
        for norm in (low, plain):
            norm.weight.normal_()
            norm.bias.normal_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_out, plain_out = low(x), plain(x)
    manual = F.layer_norm(x.bfloat16(), (64,), low.weight.bfloat16(), low.bias.bfloat16(), 1e-5)
    assert low_out.dtype == torch.bfloat16 and torch.equal(low_out, manual)
    assert plain_out.dtype == torch.float32
    torch.testing.assert_close(plain_out, F.layer_norm(x, (64,), plain.weight, plain.bias, 1e-5))
    assert torch.equal(low(x), F.layer_norm(x, (64,), low.weight, low.bias, 1e-5))  # plain outside autocast

    model = build_model()
    input_ids, attention_mask = left_padded_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids, attention_mask=attention_mask).logits
    reference = model(input_ids, attention_mask=attention_mask).logits
    assert max_diff_on(logits.float(), reference, attention_mask) < 0.25


def test_gradient_checkpointing_gives_equal_gradients():
    input_ids, attention_mask = left_padded_batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    gradients = []
    for checkpointing in (False, True):
        model = build_model(randomize_norms_and_biases=True, no_bias=False).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert model.transformer.blocks[0].gradient_checkpointing
        model(input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], rtol=0, atol=1e-6, msg=name)


def test_blocks_take_hidden_states_first_for_pre_hooks():
    """Flamingo's pre-hooks on `transformer.blocks[i]` rewrite `args[0]`, the residual stream."""
    model = build_model()
    input_ids, attention_mask = left_padded_batch()
    seen = []

    def shift(module, args, kwargs):
        seen.append(args[0].shape)
        return (args[0] + 1.0, *args[1:]), kwargs

    with torch.no_grad():
        before = model(input_ids, attention_mask=attention_mask).logits
        handle = model.transformer.blocks[1].register_forward_pre_hook(shift, with_kwargs=True)
        after = model(input_ids, attention_mask=attention_mask).logits
        handle.remove()
    assert seen == [(3, 9, 64)] and not torch.allclose(before, after)


# --------------------------------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (dict(prefix_lm=True), NotImplementedError, "prefix_lm"),
        (dict(attn_uses_sequence_id=True), NotImplementedError, "attn_uses_sequence_id"),
        (dict(d_model=66), ValueError, "divisible"),
        (dict(attn_impl="xformers"), ValueError, "attn_impl"),
        (dict(tie_word_embeddings=False), ValueError, "tie_word_embeddings"),
        (dict(embedding_fraction=0.0), ValueError, "embedding_fraction"),
        (dict(logit_scale="sqrt"), ValueError, "logit_scale"),
        (dict(resid_pdrop=1.5), ValueError, "resid_pdrop"),
    ],
)
def test_bad_config_raises(overrides, error, match):
    with pytest.raises(error, match=match):
        tiny_config(**overrides)


def test_config_aliases_and_defaults():
    config = MosaicGPTConfig()
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (2048, 16, 24)
    assert config.max_position_embeddings == 2048 and config.vocab_size == 50432
    assert config.attn_qk_ln and config.alibi and config.no_bias and config.low_precision_layernorm
    assert config.tie_word_embeddings
