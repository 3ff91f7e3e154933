"""`FlamingoModel`, the bare model (`AutoModel`): the same modules and checkpoint keys as
`FlamingoForConditionalGeneration`, its decoder's last hidden states conditioned on the images."""

import pytest
import torch
from model_testers import LM_FAMILIES, build_model, interleaved_batch, open_gates
from transformers import AutoModel, AutoModelForImageTextToText

from hf_flamingo import FlamingoForConditionalGeneration, FlamingoModel, FlamingoModelOutputWithPast
from hf_flamingo.cache_compat import cache_from_output


def _inputs():
    batch = interleaved_batch()
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.pixel_values}


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_hidden_states_give_the_head_models_logits(family):
    """The head's logits are the language model's `lm_head` applied to FlamingoModel's last hidden states."""
    head_model = build_model(family)
    open_gates(head_model)
    base_model = FlamingoModel(head_model.config).eval()
    base_model.load_state_dict(head_model.state_dict())
    with torch.no_grad():
        output = base_model(**_inputs())
        logits = head_model(**_inputs()).logits
        expected = head_model.get_output_embeddings()(output.last_hidden_state)
    assert isinstance(output, FlamingoModelOutputWithPast)
    assert output.image_hidden_states.shape[:2] == (2, 3)
    torch.testing.assert_close(expected, logits, atol=1e-5, rtol=1e-5)


def test_auto_model_loads_a_saved_flamingo_as_the_bare_model(tmp_path, llama_model):
    llama_model.save_pretrained(tmp_path)
    base_model, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(base_model) is FlamingoModel
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert base_model.state_dict().keys() == llama_model.state_dict().keys()
    for name, tensor in llama_model.state_dict().items():
        assert torch.equal(base_model.state_dict()[name], tensor), name
    head_model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(head_model) is FlamingoForConditionalGeneration
    assert isinstance(head_model, FlamingoModel)


def test_bare_model_returns_the_cache_and_continues_from_it(llama_model):
    """The last token from the cache (with its image index) gets the hidden state of a full forward."""
    base_model = FlamingoModel(llama_model.config).eval()
    base_model.load_state_dict(llama_model.state_dict())
    inputs = _inputs()
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        full = base_model(**inputs).last_hidden_state
        prefix = base_model(
            input_ids=input_ids[:, :-1],
            attention_mask=attention_mask[:, :-1],
            pixel_values=inputs["pixel_values"],
            use_cache=True,
        )
        images_so_far = (input_ids[:, :-1] == llama_model.config.media_token_id).sum(dim=1)
        step = base_model(
            input_ids=input_ids[:, -1:],
            attention_mask=attention_mask,
            image_hidden_states=prefix.image_hidden_states,
            token_image_index=images_so_far[:, None],
            cache=cache_from_output(prefix),
            position_ids=torch.full((2, 1), input_ids.shape[1] - 1),  # as the full forward's default positions
        ).last_hidden_state
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


def test_set_attn_implementation_switches_the_backbones_and_the_config_together():
    model = build_model("llama")
    open_gates(model)
    batch = interleaved_batch()
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values)
    with torch.no_grad():
        sdpa_logits = model(**inputs).logits
    model.set_attn_implementation("eager")
    configs = {
        "config": model.config,
        "text_config": model.config.text_config,
        "vision_config": model.config.vision_config,
        "language_model": model.language_model.config,
        "vision_model": model.vision_model.config,
    }
    assert {name: config._attn_implementation for name, config in configs.items()} == dict.fromkeys(configs, "eager")
    real = batch.attention_mask.bool()  # fully masked (padding) rows differ between kernels by design
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits[real], sdpa_logits[real], rtol=1e-5, atol=1e-5)
