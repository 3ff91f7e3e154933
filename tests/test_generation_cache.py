"""`generate` prepares the images once per call and hands every decoding step plain tensors; the cache is the language
model's own, passed under the name the installed transformers uses. Strategy-by-strategy equality with uncached
generation and full forwards is in `test_generation_strategies.py`."""

import pytest
import torch
from model_testers import MEDIA_TOKEN_ID, PAD_TOKEN_ID, build_model, interleaved_batch, open_gates
from transformers import GenerationMixin

from hf_flamingo.cache_compat import CACHE_NAME


@pytest.fixture(scope="module")
def model():
    model = build_model("llama")
    open_gates(model)
    return model


def _inputs():
    batch = interleaved_batch()
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.pixel_values}


def _count_calls(module, calls):
    return module.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))


def test_images_are_encoded_and_projected_once_per_call(model):
    inputs = _inputs()
    tower_images, projections = [], []
    handles = [
        model.vision_model.register_forward_pre_hook(
            lambda m, a, kw: tower_images.append(kw["pixel_values"].shape[0]), with_kwargs=True
        )
    ]
    handles += [_count_calls(block.attn.to_kv, projections) for block in model.gated_cross_attn_layers.values()]
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, num_beams=3, pad_token_id=PAD_TOKEN_ID)
    finally:
        for handle in handles:
            handle.remove()
    # The 2 prompts' 3 image slots go through the tower once (not once per beam), and each block projects the 2
    # prompts' latents once: not per beam, not per decoding step.
    assert sum(tower_images) == 2 * 3
    assert projections == [2] * len(model.gated_cross_attn_layers)


def test_decoding_steps_are_fed_only_the_last_prompt_image(model):
    inputs = _inputs()
    fed = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append((kwargs["input_ids"].shape, kwargs["cross_attention_states"])),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, num_beams=2, pad_token_id=PAD_TOKEN_ID)
    finally:
        handle.remove()
    num_latents = model.config.perceiver_num_latents
    states = model.get_cross_attention_states(model.get_image_features(inputs["pixel_values"]))
    (prompt_shape, prompt_states), *steps = fed
    assert prompt_shape == (4, inputs["input_ids"].shape[1])
    assert torch.equal(prompt_states, states.repeat_interleave(2, dim=0))
    assert len(steps) == 2
    for shape, step_states in steps:
        assert shape == (4, 1)
        # Sample 0's prompt has 3 `<image>` tokens, sample 1's has 2: their last images' keys/values, per beam.
        assert torch.equal(step_states[0], states[0, :, 2 * num_latents :])
        assert torch.equal(step_states[3], states[1, :, num_latents : 2 * num_latents])
        assert step_states.data_ptr() == steps[0][1].data_ptr()  # expanded once per call, not per step


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_language_model_attention_implementations_agree(attn_implementation):
    reference = build_model("llama")
    open_gates(reference)
    model = build_model("llama")
    open_gates(model)
    model.language_model.set_attn_implementation(attn_implementation)
    inputs = _inputs()
    settings = dict(max_new_tokens=5, min_new_tokens=5, num_beams=2, pad_token_id=PAD_TOKEN_ID)
    with torch.no_grad():
        assert model.generate(**inputs, **settings).tolist() == reference.generate(**inputs, **settings).tolist()
        real = inputs["attention_mask"].bool()  # padded rows are fully masked; implementations fill them differently
        torch.testing.assert_close(model(**inputs).logits[real], reference(**inputs).logits[real], atol=1e-5, rtol=0)


def test_wrong_number_of_blocks_in_cross_attention_states(model):
    inputs = _inputs()
    states = model.get_cross_attention_states(model.get_image_features(inputs["pixel_values"]))[:, :1]
    with pytest.raises(ValueError, match="holds keys/values for 1 blocks, the model has 2"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], cross_attention_states=states)


def test_cross_attention_states_equal_pixel_values(model):
    inputs = _inputs()
    states = model.get_cross_attention_states(model.get_image_features(inputs["pixel_values"]))
    with torch.no_grad():
        from_states = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], cross_attention_states=states
        )
        from_pixels = model(**inputs)
    torch.testing.assert_close(from_states.logits, from_pixels.logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="Pass the images once"):
        model(**inputs, cross_attention_states=states)


def test_generation_mixin_generate_alone_refuses_images(model):
    """`GenerationMixin.generate` without this class's `generate` would drop the images after the prompt."""
    with pytest.raises(ValueError, match="goes through `FlamingoForConditionalGeneration.generate`"):
        GenerationMixin.generate(model, **_inputs(), max_new_tokens=2, pad_token_id=PAD_TOKEN_ID)


@pytest.mark.parametrize("name", ["cross_attention_states", "token_image_index"])
def test_generate_computes_the_image_inputs_itself(model, name):
    inputs = _inputs()
    with pytest.raises(ValueError, match=f"`generate` computes `{name}` itself"):
        model.generate(**inputs, max_new_tokens=2, pad_token_id=PAD_TOKEN_ID, **{name: torch.zeros(1)})


def test_text_only_generation_may_produce_image_tokens(model):
    """Without images, a generated `<image>` token attends to nothing (it does not ask for an image)."""
    input_ids = torch.tensor([[1, 5, 6, 7]])
    out = model.generate(
        input_ids=input_ids, max_new_tokens=3, pad_token_id=PAD_TOKEN_ID, sequence_bias={(MEDIA_TOKEN_ID,): 1e4}
    )
    assert out[0, 4:].tolist() == [MEDIA_TOKEN_ID] * 3


def test_assistant_flamingo_needs_pixel_values_when_given_latents(model):
    """An assistant Flamingo encodes the images with its own tower; latents of the main model cannot serve it."""
    inputs = {name: value[:1] for name, value in _inputs().items()}
    assistant = build_model("llama", seed=3)
    latents = model.get_image_features(inputs.pop("pixel_values"))
    with pytest.raises(ValueError, match="needs the `pixel_values`"):
        model.generate(**inputs, image_hidden_states=latents, assistant_model=assistant, max_new_tokens=3)


def test_generate_output_carries_the_cache_under_the_installed_name(model):
    out = model.generate(**_inputs(), max_new_tokens=2, pad_token_id=PAD_TOKEN_ID, return_dict_in_generate=True)
    assert CACHE_NAME in out and out[CACHE_NAME].get_seq_length() == out.sequences.shape[1] - 1
