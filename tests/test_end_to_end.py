"""Processor + model together: build from backbones, few-shot generate, save, reload through the Auto classes."""

from __future__ import annotations

import pytest
import torch
from helpers import make_test_image
from model_testers import open_gates, vision_config_for
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
)

from hf_flamingo import FlamingoConfig, FlamingoForConditionalGeneration, FlamingoProcessor

PROMPTS = [
    "<image>Output: a cat.<|endofchunk|><image>Output: a dog.<|endofchunk|><image>Output:",
    "<image>Question: What color? Short answer: red<|endofchunk|><image>Question: What color? Short answer:",
]


@pytest.fixture
def processor_and_model(tiny_processor):
    torch.manual_seed(0)
    language_model = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=320,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=37,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    vision_model = CLIPVisionModel(vision_config_for("clip"))
    model = FlamingoForConditionalGeneration.from_backbones(
        vision_model,
        language_model,
        tokenizer=tiny_processor.tokenizer,
        cross_attn_every_n_layers=2,
        perceiver_depth=1,
        perceiver_num_latents=4,
    )
    open_gates(model)
    return tiny_processor, model


def few_shot_inputs(processor):
    images = [[make_test_image(0), make_test_image(1), make_test_image(2)], [make_test_image(3), make_test_image(4)]]
    return processor(images=images, text=PROMPTS, return_tensors="pt")


def test_from_backbones_with_tokenizer(processor_and_model):
    processor, model = processor_and_model
    assert model.config.media_token_id == processor.media_token_id == 321
    assert model.config.eoc_token_id == processor.eoc_token_id == 320
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer) == 323
    assert model.config.text_config.vocab_size == 323
    assert not model.training
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"perceiver", "gated_cross_attn_layers"}


def test_processor_batch_generates_like_single_prompts(processor_and_model):
    processor, model = processor_and_model
    inputs = few_shot_inputs(processor)
    assert inputs.pixel_values.shape == (2, 3, 3, 30, 30)
    lengths = inputs.attention_mask.sum(-1)
    assert lengths[0] != lengths[1]
    assert inputs.attention_mask[int(lengths.argmin()), 0] == 0  # the shorter prompt is left-padded
    generation = dict(max_new_tokens=6, do_sample=False, eos_token_id=processor.eoc_token_id, pad_token_id=322)
    batched = model.generate(**inputs, **generation)
    prompt_len = inputs.input_ids.shape[1]
    for row, images in enumerate(([make_test_image(i) for i in range(3)], [make_test_image(3), make_test_image(4)])):
        single_inputs = processor(images=[images], text=[PROMPTS[row]], return_tensors="pt")
        single = model.generate(**single_inputs, **generation)
        new_tokens = single[0, single_inputs.input_ids.shape[1] :]
        assert torch.equal(batched[row, prompt_len : prompt_len + new_tokens.shape[0]], new_tokens)
    texts = processor.batch_decode(batched[:, prompt_len:], skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)


def test_beam_search_with_processor_inputs(processor_and_model):
    processor, model = processor_and_model
    inputs = few_shot_inputs(processor)
    out = model.generate(**inputs, max_new_tokens=5, num_beams=3, num_return_sequences=2, pad_token_id=322)
    assert out.shape[0] == 4
    assert torch.equal(out[:, : inputs.input_ids.shape[1]], inputs.input_ids.repeat_interleave(2, dim=0))


def test_save_and_reload_with_auto_classes(processor_and_model, tmp_path):
    processor, model = processor_and_model
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, FlamingoConfig)
    assert isinstance(config.text_config, GPTNeoXConfig)
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded_processor, FlamingoProcessor)
    assert reloaded_processor.media_token_id == processor.media_token_id
    assert len(reloaded_processor.tokenizer) == len(processor.tokenizer)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(reloaded, FlamingoForConditionalGeneration)

    inputs = few_shot_inputs(processor)
    reloaded_inputs = few_shot_inputs(reloaded_processor)
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(inputs[key], reloaded_inputs[key])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**reloaded_inputs).logits)
    generation = dict(max_new_tokens=5, num_beams=2, pad_token_id=322)
    assert torch.equal(model.generate(**inputs, **generation), reloaded.generate(**reloaded_inputs, **generation))


def test_count_mismatch_is_reported_by_processor_and_model(processor_and_model):
    processor, model = processor_and_model
    with pytest.raises(ValueError, match="Sample 0 has 2 `<image>` tokens in its text but 1 image"):
        processor(images=[[make_test_image(0)]], text=["<image>a<image>b"], return_tensors="pt")
    ids = processor.tokenizer(["<image>a<image>b"], return_tensors="pt").input_ids
    one_image = processor(images=[[make_test_image(0)]], text=["<image>a"], return_tensors="pt").pixel_values
    with pytest.raises(ValueError, match="Sample 0 has 2 `<image>` tokens but only 1 image"):
        model(input_ids=ids, pixel_values=one_image)
