"""transformers' `pipeline("image-text-to-text")`, the chat template and the generation defaults, each compared token
for token with a direct `processor` + `generate` call."""

import pytest
import torch
from helpers import build_tiny_image_processor, build_tiny_tokenizer, make_test_image
from model_testers import EOS_TOKEN_ID, open_gates, text_config_for, vision_config_for
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionModel,
    LlamaForCausalLM,
    pipeline,
)

from hf_flamingo import FlamingoForConditionalGeneration, FlamingoProcessor

EOC, IMAGE, PAD = 320, 321, 322
"""`<|endofchunk|>`, `<image>` and `<PAD>` in the tiny tokenizer, as `FlamingoProcessor` adds them."""
MAX_NEW_TOKENS = 6
FEW_SHOT_PROMPT = "<image>Output:a dog.<|endofchunk|><image>Output:"


def _few_shot_messages(first_image, second_image, answer: str = "a dog.") -> list[dict]:
    """The chat form of `FEW_SHOT_PROMPT`: one demonstration (user + assistant) and the query."""
    return [
        {"role": "user", "content": [{"type": "image", "image": first_image}, {"type": "text", "text": "Output:"}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        {"role": "user", "content": [{"type": "image", "image": second_image}, {"type": "text", "text": "Output:"}]},
    ]


@pytest.fixture(scope="module")
def processor():
    return FlamingoProcessor(build_tiny_image_processor(), build_tiny_tokenizer())


@pytest.fixture(scope="module")
def model(processor):
    torch.manual_seed(0)
    built = FlamingoForConditionalGeneration.from_backbones(
        CLIPVisionModel(vision_config_for("clip")),
        LlamaForCausalLM(text_config_for("llama")),
        tokenizer=processor.tokenizer,
        cross_attn_every_n_layers=2,
        perceiver_depth=1,
        perceiver_num_latents=4,
    )
    open_gates(built)
    return built


@pytest.fixture(scope="module")
def captioner(model, processor):
    return pipeline("image-text-to-text", model=model, processor=processor)


@pytest.fixture(scope="module")
def images():
    return [make_test_image(seed) for seed in range(4)]


def _direct(model, processor, images, text, **generate_kwargs) -> torch.LongTensor:
    inputs = processor(images=images, text=text, return_tensors="pt")
    return model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, **generate_kwargs)


def _generated_ids(results: list[dict]) -> list[list[int]]:
    return [item["generated_token_ids"].tolist() for item in results]


def _new_text(processor, sequences: torch.LongTensor, prompt_length: int) -> list[str]:
    return processor.post_process_image_text_to_text(sequences[:, prompt_length:])


# ---------------------------------------------------------------------------------------------------------------------
# Generation defaults


def test_generation_config_stops_at_end_of_chunk_then_the_language_model_eos(model, tmp_path):
    assert model.generation_config.eos_token_id == [EOC, EOS_TOKEN_ID]
    assert model.generation_config.pad_token_id == PAD  # the processor's `<PAD>`, from `from_backbones(tokenizer=)`

    model.save_pretrained(tmp_path / "saved")
    for loader in (FlamingoForConditionalGeneration, AutoModelForImageTextToText):
        reloaded = loader.from_pretrained(tmp_path / "saved")
        assert reloaded.generation_config.eos_token_id == [EOC, EOS_TOKEN_ID]
        assert reloaded.generation_config.pad_token_id == PAD

    from_config = FlamingoForConditionalGeneration(model.config)
    assert from_config.generation_config.eos_token_id == [EOC, EOS_TOKEN_ID]


def test_generation_config_without_end_of_chunk_token_keeps_the_language_model_eos(model):
    config = model.config.to_dict()
    config.update(eoc_token_id=None)
    no_chunk_token = FlamingoForConditionalGeneration(type(model.config).from_dict(config))
    assert no_chunk_token.generation_config.eos_token_id == EOS_TOKEN_ID


def test_generate_stops_at_end_of_chunk_by_default(model, processor, images):
    unstopped = _direct(model, processor, images[:1], "<image>Output:", eos_token_id=None)
    prompt_length = processor(images=images[:1], text="<image>Output:", return_tensors="pt")["input_ids"].shape[1]
    first, second = unstopped[0, prompt_length : prompt_length + 2].tolist()
    assert EOC not in (first, second)
    # Make `<|endofchunk|>` the third token (only after the first two), through the public `sequence_bias`.
    bias = {(first, second, EOC): 1000.0}

    stopped = _direct(model, processor, images[:1], "<image>Output:", sequence_bias=bias)
    assert stopped[0, prompt_length:].tolist() == [first, second, EOC]
    continued = _direct(model, processor, images[:1], "<image>Output:", sequence_bias=bias, eos_token_id=None)
    assert continued.shape[1] == prompt_length + MAX_NEW_TOKENS

    result = pipeline("image-text-to-text", model=model, processor=processor)(
        images=images[0], text="<image>Output:", max_new_tokens=MAX_NEW_TOKENS, generate_kwargs={"sequence_bias": bias}
    )
    assert (
        result[0]["generated_text"]
        == "<image>Output:" + processor.post_process_image_text_to_text(stopped[:, prompt_length:])[0]
    )


# ---------------------------------------------------------------------------------------------------------------------
# The chat template


def test_chat_template_renders_flamingo_few_shot_prompts(processor, images):
    messages = _few_shot_messages(images[0], images[1])
    assert processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == FEW_SHOT_PROMPT

    with_system = [{"role": "system", "content": "Captions: "}, *messages]
    assert processor.apply_chat_template(with_system, tokenize=False) == "Captions: " + FEW_SHOT_PROMPT

    prefilled = [*messages, {"role": "assistant", "content": [{"type": "text", "text": "a ca"}]}]
    assert processor.apply_chat_template(prefilled, tokenize=False, continue_final_message=True) == (
        FEW_SHOT_PROMPT + "a ca"
    )

    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True
    )
    direct = processor(images=images[:2], text=FEW_SHOT_PROMPT, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], direct["input_ids"])
    assert torch.equal(inputs["pixel_values"], direct["pixel_values"])


def test_chat_template_refuses_unknown_roles_and_parts(processor, images):
    with pytest.raises(Exception, match="role system, user or assistant, got tool"):
        processor.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    video = [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}]
    with pytest.raises(Exception, match="content parts are image or text, got video"):
        processor.apply_chat_template(video, tokenize=False)


def test_chat_template_is_saved_with_the_processor(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == processor.chat_template
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert reloaded.chat_template == processor.chat_template


def test_custom_tokens_appear_in_the_default_chat_template(images):
    custom = FlamingoProcessor(
        build_tiny_image_processor(), build_tiny_tokenizer(), media_token="<img>", end_of_chunk_token="<eoc>"
    )
    rendered = custom.apply_chat_template(_few_shot_messages(images[0], images[1]), tokenize=False)
    assert rendered == "<img>Output:a dog.<eoc><img>Output:"


# ---------------------------------------------------------------------------------------------------------------------
# pipeline("image-text-to-text") against direct `generate`


def test_pipeline_plain_prompt_equals_generate(captioner, model, processor, images):
    direct = _direct(model, processor, images[:1], "<image>Output:")
    result = captioner(images=images[0], text="<image>Output:", max_new_tokens=MAX_NEW_TOKENS, return_tensors=True)
    assert torch.equal(result[0]["generated_token_ids"], direct[0])

    new_text = captioner(
        images=images[0], text="<image>Output:", max_new_tokens=MAX_NEW_TOKENS, return_full_text=False
    )
    prompt_length = processor(images=images[:1], text="<image>Output:", return_tensors="pt")["input_ids"].shape[1]
    assert new_text[0]["generated_text"] == _new_text(processor, direct, prompt_length)[0]


def test_pipeline_few_shot_prompt_equals_generate(captioner, model, processor, images):
    direct = _direct(model, processor, images[:2], FEW_SHOT_PROMPT, num_beams=2)
    result = captioner(
        images=images[:2],
        text=FEW_SHOT_PROMPT,
        max_new_tokens=MAX_NEW_TOKENS,
        generate_kwargs={"num_beams": 2},
        return_tensors=True,
    )
    assert torch.equal(result[0]["generated_token_ids"], direct[0])


def test_pipeline_batched_prompts_equal_generate(captioner, model, processor, images):
    texts = ["<image>Output:", "<image>A photo of"]
    # A flat list is one image per `<image>` token, handed out in order.
    direct = _direct(model, processor, [[images[0]], [images[1]]], texts)
    result = captioner(images=images[:2], text=texts, max_new_tokens=MAX_NEW_TOKENS, return_tensors=True)
    assert _generated_ids(result) == direct.tolist()

    few_shot = [FEW_SHOT_PROMPT, "<image>Output:"]
    nested = [[images[0], images[1]], [images[2]]]
    direct = _direct(model, processor, nested, few_shot)
    result = captioner(images=nested, text=few_shot, max_new_tokens=MAX_NEW_TOKENS, return_tensors=True)
    assert _generated_ids(result) == direct.tolist()


def test_pipeline_chat_equals_generate(captioner, model, processor, images):
    messages = _few_shot_messages(images[0], images[1])
    direct = _direct(model, processor, images[:2], FEW_SHOT_PROMPT)
    prompt_length = processor(images=images[:2], text=FEW_SHOT_PROMPT, return_tensors="pt")["input_ids"].shape[1]

    result = captioner(text=messages, max_new_tokens=MAX_NEW_TOKENS)
    conversation = result[0]["generated_text"]
    assert conversation[:-1] == messages
    assert conversation[-1] == {"role": "assistant", "content": _new_text(processor, direct, prompt_length)[0]}

    tokens = captioner(text=messages, max_new_tokens=MAX_NEW_TOKENS, return_tensors=True)
    assert torch.equal(tokens[0]["generated_token_ids"], direct[0])


def test_pipeline_batched_chats_equal_generate(captioner, model, processor, images):
    chats = [_few_shot_messages(images[0], images[1]), _few_shot_messages(images[2], images[3], answer="a cat.")]
    texts = [FEW_SHOT_PROMPT, FEW_SHOT_PROMPT.replace("a dog.", "a cat.")]
    nested = [[images[0], images[1]], [images[2], images[3]]]
    direct = _direct(model, processor, nested, texts)

    # `batch_size=2` pads the two prompts together (left), like the direct call; the transformers pipeline stacks
    # `pixel_values`, so a batch's prompts need the same number of images.
    result = captioner(text=chats, max_new_tokens=MAX_NEW_TOKENS, batch_size=2, return_tensors=True)
    assert _generated_ids([item[0] for item in result]) == direct.tolist()


def test_pipeline_loads_image_paths(captioner, model, processor, images, tmp_path):
    path = tmp_path / "query.png"
    images[0].save(path)
    direct = _direct(model, processor, images[:1], "<image>Output:")
    result = captioner(images=str(path), text="<image>Output:", max_new_tokens=MAX_NEW_TOKENS, return_tensors=True)
    assert torch.equal(result[0]["generated_token_ids"], direct[0])
