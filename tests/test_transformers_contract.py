"""The cache contract of the installed transformers (`cache` from 5.24, `past_key_values` before), and no deprecation
warning caused by hf_flamingo in forward, generate or Trainer steps."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import transformers
from model_testers import PAD_TOKEN_ID, build_model, interleaved_batch, open_gates
from packaging.version import Version
from transformers import DynamicCache, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.modeling_outputs import CausalLMOutputWithPast

from hf_flamingo import FlamingoDataCollator, FlamingoForConditionalGeneration, MosaicGPTConfig, MosaicGPTForCausalLM
from hf_flamingo.cache_compat import CACHE_NAME, LEGACY_CACHE_NAME, cache_from_output


def _inputs():
    batch = interleaved_batch()
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.pixel_values}


def test_cache_name_is_the_installed_releases():
    renamed = Version(transformers.__version__).release >= (5, 24)
    assert CACHE_NAME == ("cache" if renamed else "past_key_values")
    assert CACHE_NAME in CausalLMOutputWithPast.__dataclass_fields__


def _language_model_call_kwargs(model):
    seen = []
    handle = model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True
    )
    return seen, handle


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_forward_takes_the_cache_under_either_name_and_hands_it_on_under_the_installed_one(llama_model, name):
    inputs = _inputs()
    seen, handle = _language_model_call_kwargs(llama_model)
    try:
        with torch.no_grad():
            prompt = llama_model(**inputs, use_cache=True)
            cache = cache_from_output(prompt)
            assert isinstance(cache, DynamicCache) and cache.get_seq_length() == inputs["input_ids"].shape[1]
            step = llama_model(
                input_ids=torch.tensor([[30], [31]]),
                attention_mask=torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1),
                image_hidden_states=prompt.image_hidden_states,
                token_image_index=torch.tensor([[3], [2]]),
                use_cache=True,
                **{name: cache},
            )
    finally:
        handle.remove()
    assert cache_from_output(step) is cache and cache.get_seq_length() == inputs["input_ids"].shape[1] + 1
    assert CACHE_NAME in step.__dataclass_fields__
    other = LEGACY_CACHE_NAME if CACHE_NAME == "cache" else "cache"
    assert all(CACHE_NAME in kwargs and other not in kwargs for kwargs in seen)


def test_forward_refuses_the_cache_under_both_names(llama_model):
    with pytest.raises(ValueError, match="Got both `cache` and `past_key_values`"):
        llama_model(**_inputs(), cache=DynamicCache(), past_key_values=DynamicCache())


class _LegacyNamedLlama(LlamaForCausalLM):
    """A language model written for transformers < 5.24 (as remote code often is): its `forward` names the cache
    `past_key_values` only."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_NAME: past_key_values},
            **kwargs,
        )


def test_language_model_taking_only_past_key_values_gets_it_under_that_name():
    reference = build_model("llama")
    open_gates(reference)
    legacy_lm = _LegacyNamedLlama(reference.config.text_config)
    legacy_lm.load_state_dict(reference.language_model.state_dict())
    model = FlamingoForConditionalGeneration(reference.config, language_model=legacy_lm.eval())
    model.load_state_dict(reference.state_dict())
    model.eval()
    seen, handle = _language_model_call_kwargs(model)
    settings = dict(max_new_tokens=5, min_new_tokens=5, num_beams=2, pad_token_id=PAD_TOKEN_ID, use_cache=True)
    try:
        generated = model.generate(**_inputs(), **settings)
    finally:
        handle.remove()
    assert all("past_key_values" in kwargs and "cache" not in kwargs for kwargs in seen)
    assert generated.tolist() == reference.generate(**_inputs(), **settings).tolist()


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_mosaic_gpt_takes_the_cache_under_either_name(name):
    torch.manual_seed(0)
    model = MosaicGPTForCausalLM(MosaicGPTConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=2, max_seq_len=64))
    model.eval()
    input_ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        full = model(input_ids).logits
        prompt = model(input_ids[:, :5], use_cache=True)
        cache = cache_from_output(prompt)
        step = model(input_ids[:, 5:], use_cache=True, **{name: cache})
    assert CACHE_NAME in prompt.__dataclass_fields__ and cache_from_output(step) is cache
    torch.testing.assert_close(step.logits, full[:, 5:], atol=1e-5, rtol=0)


class _CollectedWarnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _deprecations(python_warnings, log_messages) -> list[str]:
    found = [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in python_warnings
        if issubclass(w.category, (FutureWarning, DeprecationWarning))
    ]
    return found + [message for message in log_messages if "deprecat" in message.lower()]


def test_no_deprecation_warning_in_forward_generate_and_trainer_steps(tiny_processor, tmp_path):
    from helpers import make_test_image

    handler = _CollectedWarnings()
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # transformers logs some deprecations once per process
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = FlamingoForConditionalGeneration.from_backbones(
                build_model("llama").vision_model,
                build_model("llama").language_model,
                tokenizer=tiny_processor.tokenizer,
                **{key: 8 for key in ("perceiver_num_latents", "perceiver_dim_head", "xattn_dim_head")},
                perceiver_depth=1,
                perceiver_heads=2,
                xattn_heads=2,
            )
            samples = [
                {
                    "text": "<image>A red circle.<|endofchunk|><image>A blue square.<|endofchunk|>",
                    "images": [make_test_image(0), make_test_image(1)],
                }
            ] * 4
            args = TrainingArguments(
                tmp_path,
                max_steps=2,
                per_device_train_batch_size=2,
                remove_unused_columns=False,
                report_to=[],
                activation_checkpointing=True,
                save_strategy="no",
                use_cpu=True,
            )
            collator = FlamingoDataCollator(tiny_processor)
            Trainer(model=model, args=args, train_dataset=samples, data_collator=collator).train()
            model.eval()
            inputs = tiny_processor(
                images=[[make_test_image(2), make_test_image(3)]],
                text=["<image>A red circle.<|endofchunk|><image>A"],
                return_tensors="pt",
            )
            with torch.no_grad():
                model(**inputs)
                for settings in ({}, {"num_beams": 2}, {"cache_implementation": "static"}):
                    model.generate(**inputs, max_new_tokens=3, **settings)
    finally:
        transformers_logger.removeHandler(handler)
    assert _deprecations(caught, handler.messages) == []
