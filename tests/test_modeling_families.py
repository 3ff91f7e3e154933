"""The same behavioural suite over every supported language-model family (tiny random models)."""

from __future__ import annotations

import math

import pytest
import torch
from model_testers import (
    EOC_TOKEN_ID,
    LM_FAMILIES,
    MEDIA_TOKEN_ID,
    PAD_TOKEN_ID,
    bare_language_model,
    build_model,
    decoder_layers_path_for,
    interleaved_batch,
    open_gates,
    random_pixels,
    text_config_for,
)
from transformers import AutoModelForCausalLM

from hf_flamingo import FlamingoForConditionalGeneration

# --------------------------------------------------------------------------------------------------------------------
# Slow references, written independently of the library (explicit loops over tokens and heads).


def slow_feed_forward(ff: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    norm, up, down = ff[0], ff[1], ff[3]
    hidden = torch.nn.functional.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    hidden = hidden @ up.weight.T
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return hidden @ down.weight.T


def slow_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, heads: int) -> torch.Tensor:
    """query (Dq,), keys/values (K, Dq) -> (Dq,), per head softmax(q k / sqrt(d)) v."""
    head_dim = query.shape[-1] // heads
    outputs = []
    for h in range(heads):
        sl = slice(h * head_dim, (h + 1) * head_dim)
        scores = keys[:, sl] @ query[sl] / math.sqrt(head_dim)
        weights = torch.softmax(scores, dim=0)
        outputs.append(weights @ values[:, sl])
    return torch.cat(outputs)


def slow_perceiver(perceiver, features: torch.Tensor) -> torch.Tensor:
    """features (B, T, V, D) -> (B, T, L, D), one image at a time."""
    batch, num_images = features.shape[:2]
    result = torch.empty(batch, num_images, *perceiver.latents.shape)
    for b in range(batch):
        for t in range(num_images):
            x = features[b, t]
            latents = perceiver.latents.clone()
            for layer in perceiver.layers:
                attn, ff = layer[0], layer[1]
                x_norm = torch.nn.functional.layer_norm(x, x.shape[-1:], attn.norm_media.weight, attn.norm_media.bias)
                l_norm = torch.nn.functional.layer_norm(
                    latents, latents.shape[-1:], attn.norm_latents.weight, attn.norm_latents.bias
                )
                q = l_norm @ attn.to_q.weight.T
                kv = torch.cat([x_norm, l_norm]) @ attn.to_kv.weight.T
                k, v = kv.chunk(2, dim=-1)
                attended = torch.stack([slow_attention(q[i], k, v, attn.heads) for i in range(q.shape[0])])
                latents = attended @ attn.to_out.weight.T + latents
                latents = slow_feed_forward(ff, latents) + latents
            result[b, t] = torch.nn.functional.layer_norm(
                latents, latents.shape[-1:], perceiver.norm.weight, perceiver.norm.bias
            )
    return result


def slow_gated_block(block, x: torch.Tensor, latents: torch.Tensor, input_ids: torch.Tensor, immediate: bool):
    """x (B, S, D) decoder-layer input; latents (B, T, L, Dv); OpenFlamingo's mask rules, token by token."""
    attn = block.attn
    out = x.clone()
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            image = int((input_ids[b, : t + 1] == MEDIA_TOKEN_ID).sum())
            if image == 0:
                continue  # no preceding image: exactly zero attention output, in both modes
            allowed = [image] if immediate else list(range(1, image + 1))
            keys_values = torch.cat([latents[b, j - 1] for j in allowed]) @ attn.to_kv.weight.T
            k, v = keys_values.chunk(2, dim=-1)
            q = (
                torch.nn.functional.layer_norm(x[b, t], x.shape[-1:], attn.norm.weight, attn.norm.bias)
                @ attn.to_q.weight.T
            )
            attended = slow_attention(q, k, v, attn.heads) @ attn.to_out.weight.T
            out[b, t] = x[b, t] + torch.tanh(block.attn_gate) * attended
    return out + torch.tanh(block.ff_gate) * slow_feed_forward(block.ff, out)


def reference_logits(model: FlamingoForConditionalGeneration, input_ids, attention_mask, pixel_values):
    """Logits of a bare copy of the language model with slow cross-attention spliced in front of every n-th layer."""
    config = model.config
    # The encoder output before any final LayerNorm (CLIP's `last_hidden_state`; SigLIP applies `post_layernorm`).
    vision_outputs = model.vision_model(
        pixel_values=pixel_values.flatten(0, 1), output_hidden_states=True
    ).hidden_states[-1]
    if config.vision_feature_select_strategy == "default":
        vision_outputs = vision_outputs[:, 1:]  # drop CLIP's class token
    features = vision_outputs.reshape(*pixel_values.shape[:2], -1, vision_outputs.shape[-1])
    latents = slow_perceiver(model.perceiver, features)

    bare = bare_language_model(model)
    layers = bare.get_submodule(decoder_layers_path_for(family_of(model)))
    n = config.cross_attn_every_n_layers
    handles = []
    for i, layer in enumerate(layers):
        if (i + 1) % n != 0:
            continue
        block = model.gated_cross_attn_layers[str(i)]

        def hook(module, args, kwargs, block=block):
            if args:
                new = slow_gated_block(block, args[0], latents, input_ids, config.only_attend_immediate_media)
                return (new, *args[1:]), kwargs
            new = slow_gated_block(
                block, kwargs["hidden_states"], latents, input_ids, config.only_attend_immediate_media
            )
            return args, {**kwargs, "hidden_states": new}

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        logits = bare(input_ids=input_ids, attention_mask=attention_mask).logits
    for handle in handles:
        handle.remove()
    return logits, latents


def family_of(model: FlamingoForConditionalGeneration) -> str:
    return {type(text_config_for(f)): f for f in LM_FAMILIES}[type(model.config.text_config)]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Position ids counting only real tokens, as `generate` derives them (absolute-position LMs need them)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def first_image_positions(input_ids: torch.Tensor) -> list[int]:
    return [int((row == MEDIA_TOKEN_ID).nonzero()[0]) for row in input_ids]


# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(params=LM_FAMILIES)
def family(request) -> str:
    return request.param


def test_decoder_layers_found_and_lm_untouched(family):
    model = build_model(family)
    expected_class = type(AutoModelForCausalLM.from_config(text_config_for(family)))
    assert type(model.language_model) is expected_class
    assert model.decoder_layers_path == decoder_layers_path_for(family)

    layers = model.language_model.get_submodule(decoder_layers_path_for(family))
    hooked = [i for i, layer in enumerate(layers) if len(layer._forward_pre_hooks) > 0]
    assert hooked == [1, 3]  # (i + 1) % 2 == 0
    assert sorted(model.gated_cross_attn_layers.keys()) == ["1", "3"]

    bare = bare_language_model(model)
    lm_keys = {k.removeprefix("language_model.") for k in model.state_dict() if k.startswith("language_model.")}
    assert lm_keys == set(bare.state_dict())
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    assert all(
        name.split(".")[0] in {"vision_model", "perceiver", "gated_cross_attn_layers", "language_model"}
        for name in names
    )
    # Each Flamingo weight is registered once; only the LM's own tying may share storage.
    bridge = [p for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith("language_model.")]
    assert len({id(p) for p in bridge}) == len(bridge)


def test_gates_closed_equals_bare_lm(family):
    model = build_model(family)
    batch = interleaved_batch()
    bare = bare_language_model(model)
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
        ).logits
        expected = bare(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(logits, expected)  # bit-identical: closed gates add exact zeros


def test_images_change_only_positions_from_first_image(family):
    model = build_model(family)
    open_gates(model)
    batch = interleaved_batch()
    other_pixels = random_pixels(2, 3, seed=123)
    with torch.no_grad():
        a = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values)
        b = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=other_pixels)
    for row, first in enumerate(first_image_positions(batch.input_ids)):
        # Padding positions are excluded: some LMs let fully masked pad rows attend everywhere.
        real = batch.attention_mask[row].bool()
        before = real & (torch.arange(real.shape[0]) < first)
        assert before.sum() >= 2
        assert torch.equal(a.logits[row, before], b.logits[row, before])
        assert (a.logits[row, first:] - b.logits[row, first:]).abs().amax(-1).min() > 1e-4


def assert_matches_slow_reference(model: FlamingoForConditionalGeneration) -> None:
    """With opened gates, the model's latents and logits equal the slow reference's on `interleaved_batch()`."""
    open_gates(model)
    batch = interleaved_batch()
    with torch.no_grad():
        outputs = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
        )
    expected_logits, expected_latents = reference_logits(
        model, batch.input_ids, batch.attention_mask, batch.pixel_values
    )
    torch.testing.assert_close(outputs.image_hidden_states, expected_latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs.logits, expected_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("only_immediate", [True, False])
def test_matches_slow_reference(family, only_immediate):
    assert_matches_slow_reference(build_model(family, only_attend_immediate_media=only_immediate))


def test_generate_with_and_without_cache_identical(family):
    model = build_model(family)
    open_gates(model)
    batch = interleaved_batch()
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values)
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=PAD_TOKEN_ID)
    uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=PAD_TOKEN_ID)
    assert cached.shape == (2, batch.input_ids.shape[1] + 6)
    assert torch.equal(cached, uncached)


def test_generated_tokens_attend_to_last_prompt_image(family):
    """Generated-token logits equal a full forward where tokens after the prompt keep the prompt's last image."""
    model = build_model(family)
    open_gates(model)
    batch = interleaved_batch()
    prompt_len = batch.input_ids.shape[1]
    # Force an `<image>` token at the first step: it must not start a new image (there is none to start).
    generated = model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=PAD_TOKEN_ID,
        sequence_bias={(MEDIA_TOKEN_ID,): 1e4},
        output_logits=True,
        return_dict_in_generate=True,
    )
    sequences = generated.sequences
    assert (sequences[:, prompt_len:] == MEDIA_TOKEN_ID).all()
    step_logits = torch.stack(generated.logits, dim=1)

    full_mask = torch.cat([batch.attention_mask, torch.ones(2, sequences.shape[1] - prompt_len, dtype=torch.long)], 1)
    prompt_images = (batch.input_ids == MEDIA_TOKEN_ID).sum(-1)
    with torch.no_grad():
        full = model(
            input_ids=sequences,
            attention_mask=full_mask,
            pixel_values=batch.pixel_values,
            position_ids=positions_from_mask(full_mask),
            token_image_index=torch.minimum((sequences == MEDIA_TOKEN_ID).cumsum(-1), prompt_images[:, None]),
        ).logits
    # Logits for new token k come from position prompt_len - 1 + k.
    torch.testing.assert_close(step_logits, full[:, prompt_len - 1 : -1], atol=2e-5, rtol=1e-5)

    # Without `token_image_index` the forced `<image>` tokens would count as images that were never given.
    with pytest.raises(ValueError, match="`<image>` tokens but only 3 image"):
        model(input_ids=sequences, attention_mask=full_mask, pixel_values=batch.pixel_values)


def test_left_padded_batch_matches_single_samples(family):
    model = build_model(family)
    open_gates(model)
    batch = interleaved_batch()
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values)
    with torch.no_grad():
        batched_logits = model(**inputs, position_ids=positions_from_mask(batch.attention_mask)).logits
    batched = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=PAD_TOKEN_ID)
    for row, num_images in ((0, 3), (1, 2)):
        keep = batch.attention_mask[row].bool()
        ids = batch.input_ids[row, keep].unsqueeze(0)
        pixels = batch.pixel_values[row : row + 1, :num_images]
        with torch.no_grad():
            single_logits = model(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(batched_logits[row, -1], single_logits[0, -1], atol=1e-5, rtol=1e-5)
        single = model.generate(
            input_ids=ids, pixel_values=pixels, max_new_tokens=5, do_sample=False, pad_token_id=PAD_TOKEN_ID
        )
        assert torch.equal(batched[row, -5:], single[0, -5:])


def test_beam_search_and_multiple_return_sequences(family):
    model = build_model(family)
    open_gates(model)
    batch = interleaved_batch()
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values)
    prompt_len = batch.input_ids.shape[1]
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=3, num_return_sequences=2, pad_token_id=PAD_TOKEN_ID)
    assert beams.shape == (4, prompt_len + 4)
    assert torch.equal(beams[:, :prompt_len], batch.input_ids.repeat_interleave(2, dim=0))
    torch.manual_seed(0)
    sampled = model.generate(
        **inputs, max_new_tokens=4, do_sample=True, num_return_sequences=2, pad_token_id=PAD_TOKEN_ID
    )
    assert sampled.shape == (4, prompt_len + 4)
    # Greedy beam search with one beam equals greedy search.
    one_beam = model.generate(**inputs, max_new_tokens=4, num_beams=1, do_sample=False, pad_token_id=PAD_TOKEN_ID)
    greedy = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=PAD_TOKEN_ID)
    assert torch.equal(one_beam, greedy)


def test_generate_encodes_images_once(family):
    model = build_model(family)
    batch = interleaved_batch()
    calls = []
    handle = model.vision_model.register_forward_hook(lambda module, args, kwargs_or_out: calls.append(1))
    perceiver_inputs = []
    handle2 = model.perceiver.register_forward_pre_hook(lambda module, args: perceiver_inputs.append(args[0].shape))
    model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        max_new_tokens=4,
        num_beams=3,
        pad_token_id=PAD_TOKEN_ID,
    )
    handle.remove()
    handle2.remove()
    assert len(calls) == 1
    assert len(perceiver_inputs) == 1 and perceiver_inputs[0][:2] == (2, 3)


def test_text_only_forward_runs_feed_forward_branch(family):
    """Without images, the gated feed-forward still runs on every token (OpenFlamingo's semantics)."""
    model = build_model(family)
    open_gates(model)
    ids = torch.tensor([[1, 5, 6, 7, EOC_TOKEN_ID, 8]])
    bare = bare_language_model(model)
    with torch.no_grad():
        flamingo_logits = model(input_ids=ids).logits
        bare_logits = bare(input_ids=ids).logits
    assert (flamingo_logits - bare_logits).abs().max() > 1e-4
    for block in model.gated_cross_attn_layers.values():
        block.ff_gate.data.zero_()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, bare_logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_vision_towers_match_slow_reference(vision):
    model = build_model("qwen2", vision=vision)
    # CLIP: 25 patches + CLS -> 26 tokens per image; SigLIP (no CLS, "full" strategy): 25 tokens.
    pixels = interleaved_batch().pixel_values[:, 0]
    vision_tokens = model.vision_model(pixel_values=pixels).last_hidden_state.shape[1]
    assert vision_tokens == (26 if vision == "clip" else 25)
    assert_matches_slow_reference(model)
