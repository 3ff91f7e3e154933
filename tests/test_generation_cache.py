"""`generate` projects every block's image keys/values once per call and reuses them at every step; that must not
change a single output: greedy, beam search, sampling, `num_return_sequences`, cache cropping (prompt lookup)."""

import pytest
import torch
from model_testers import build_model, interleaved_batch, open_gates
from transformers import GenerationMixin


@pytest.fixture(scope="module", params=[True, False], ids=["immediate", "all-previous"])
def model(request):
    model = build_model("llama", only_attend_immediate_media=request.param)
    open_gates(model)
    return model


def _inputs(model):
    batch = interleaved_batch()
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "pixel_values": batch.pixel_values,
    }


def _without_cross_attention_cache(model, input_ids, attention_mask, pixel_values, **kwargs):
    """The same generation with the image keys/values re-projected from the latents at every step (the plain
    `GenerationMixin.generate`, fed what `FlamingoForConditionalGeneration.generate` feeds it minus the cache)."""
    image_hidden_states = model.get_image_features(pixel_values)
    last_image_index = (input_ids == model.config.media_token_id).sum(-1)
    with torch.no_grad():
        return GenerationMixin.generate(
            model,
            input_ids,
            attention_mask=attention_mask,
            image_hidden_states=image_hidden_states,
            last_image_index=last_image_index,
            **kwargs,
        )


@pytest.mark.parametrize(
    "settings",
    [
        {"do_sample": False},
        {"do_sample": False, "num_beams": 3},
        {"do_sample": False, "num_beams": 3, "num_return_sequences": 2},
        {"do_sample": True, "num_return_sequences": 2, "top_k": 0},
    ],
    ids=["greedy", "beams", "beams-nrs2", "sampling-nrs2"],
)
def test_cached_cross_attention_generation_equals_uncached(model, settings):
    inputs = _inputs(model)
    common = dict(max_new_tokens=6, min_new_tokens=6, pad_token_id=0, eos_token_id=None, **settings)
    torch.manual_seed(0)
    with torch.no_grad():
        cached = model.generate(**inputs, **common)
    torch.manual_seed(0)
    uncached = _without_cross_attention_cache(model, **inputs, **common)
    assert cached.tolist() == uncached.tolist()


def test_prompt_lookup_decoding_with_cache_cropping(model):
    """Prompt-lookup decoding verifies several drafted tokens per forward and crops the cache on rejections."""
    inputs = {name: value[:1] for name, value in _inputs(model).items()}  # assisted decoding takes batch 1
    common = dict(max_new_tokens=8, min_new_tokens=8, pad_token_id=0, eos_token_id=None, do_sample=False)
    with torch.no_grad():
        drafted = model.generate(**inputs, prompt_lookup_num_tokens=2, **common)
        plain = model.generate(**inputs, **common)
    assert drafted.tolist() == plain.tolist() == _without_cross_attention_cache(model, **inputs, **common).tolist()


def test_step_logits_equal_full_forwards(model):
    """Every generated step's logits equal a full, cache-free forward over the prompt plus the tokens so far."""
    inputs = _inputs(model)
    with torch.no_grad():
        generated = model.generate(
            **inputs,
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        prompt_length = inputs["input_ids"].shape[1]
        for step, step_logits in enumerate(generated.logits):
            prefix = generated.sequences[:, : prompt_length + step]
            mask = torch.cat([inputs["attention_mask"], torch.ones(prefix.shape[0], step, dtype=torch.long)], dim=1)
            full = model(
                input_ids=prefix, attention_mask=mask, pixel_values=inputs["pixel_values"], use_cache=False
            ).logits[:, -1]
            torch.testing.assert_close(step_logits, full, atol=1e-5, rtol=0)


def test_image_keys_and_values_are_projected_once_per_call(model):
    inputs = _inputs(model)
    calls = []
    handles = [
        block.attn.to_kv.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
        for block in model.gated_cross_attn_layers.values()
    ]
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, num_beams=3, pad_token_id=0)
    finally:
        for handle in handles:
            handle.remove()
    # One projection per block, on the 2 prompts (not the 6 beams), and none during the 4 decoding steps.
    assert calls == [2] * len(model.gated_cross_attn_layers)


def test_continuing_tokens_carry_only_the_last_image():
    model = build_model("llama")
    open_gates(model)
    inputs = _inputs(model)
    image_hidden_states = model.get_image_features(inputs["pixel_values"])
    states = model.get_cross_attention_states(image_hidden_states)
    num_latents = model.config.perceiver_num_latents
    assert states.shape[:3] == (2, len(model.gated_cross_attn_layers), 3 * num_latents)
    with torch.no_grad():
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            image_hidden_states=image_hidden_states,
            cross_attention_states=states,
            use_cache=True,
        )
    # Sample 0 has 3 `<image>` tokens, sample 1 has 2: their last images' keys/values are kept.
    assert torch.equal(outputs.cross_attention_states[0], states[0, :, 2 * num_latents :])
    assert torch.equal(outputs.cross_attention_states[1], states[1, :, num_latents : 2 * num_latents])
    without = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        image_hidden_states=image_hidden_states,
    )
    torch.testing.assert_close(outputs.logits, without.logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_language_model_attention_implementations_agree(attn_implementation):
    reference = build_model("llama")
    open_gates(reference)
    model = build_model("llama")
    open_gates(model)
    model.language_model.set_attn_implementation(attn_implementation)
    inputs = _inputs(model)
    settings = dict(max_new_tokens=5, min_new_tokens=5, num_beams=2, pad_token_id=0)
    with torch.no_grad():
        assert model.generate(**inputs, **settings).tolist() == reference.generate(**inputs, **settings).tolist()
        real = inputs["attention_mask"].bool()  # padded rows are fully masked; implementations fill them differently
        torch.testing.assert_close(model(**inputs).logits[real], reference(**inputs).logits[real], atol=1e-5, rtol=0)


def test_wrong_number_of_blocks_in_cross_attention_states():
    model = build_model("llama")
    inputs = _inputs(model)
    image_hidden_states = model.get_image_features(inputs["pixel_values"])
    states = model.get_cross_attention_states(image_hidden_states)[:, :1]
    with pytest.raises(ValueError, match="holds keys/values for 1 blocks, the model has 2"):
        model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            image_hidden_states=image_hidden_states,
            cross_attention_states=states,
        )


def test_prompt_runs_once_per_sample_with_beams(model):
    """With beams, the prompt is run once per sample and its cache copied per beam; decoding steps see one token."""
    inputs = _inputs(model)
    calls = []
    handle = model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, num_beams=3, pad_token_id=0)
    finally:
        handle.remove()
    prompt_length = inputs["input_ids"].shape[1]
    assert calls == [(2, prompt_length - 1), (6, 1), (6, 1), (6, 1)]
