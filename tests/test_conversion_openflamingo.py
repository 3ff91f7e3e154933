"""Oracle parity: a real OpenFlamingo 2.0.1 model, saved as its training code saves it, converted with the converter
and reloaded through the Auto classes, computes the same logits and generates the same tokens.

Each language-model family of the releases is covered (MosaicGPT for the 3B models, GPT-NeoX for the 4B models, MPT
for the 9B model) plus Llama; tiny random models, gates opened to random values, fp32.
"""

import logging
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conversion_fixtures import FAMILIES, Family, convert_files, prepare_openflamingo_files, write_backbones
from openflamingo_oracle import build_openflamingo, register_tiny_open_clip, save_openflamingo_checkpoint
from transformers import AutoModelForImageTextToText, AutoProcessor, LlamaConfig

from hf_flamingo.conversion.open_clip import open_clip_vision_to_hf
from hf_flamingo.conversion.openflamingo import CheckpointError
from hf_flamingo.conversion.openflamingo_to_hf import convert_openflamingo_checkpoint, model_card, save_converted_model

LOGITS_TOLERANCE = 1e-5
PROMPTS = [
    "<image>Output:a red circle.<|endofchunk|><image>Output:a blue square.<|endofchunk|><image>Output:",
    "A photo:<image>Output:a green<|endofchunk|><image>Output:",
]
IMAGES_PER_PROMPT = [3, 2]


@dataclass
class Converted:
    oracle: Any
    oracle_tokenizer: Any
    model: Any
    processor: Any
    report: Any
    output_dir: Any


def _convert(family: Family, directory, layout: str = "trainable", seed: int = 0) -> Converted:
    oracle, oracle_tokenizer = prepare_openflamingo_files(family, directory, layout, seed)

    model, processor, report = convert_files(directory)
    card = model_card(model, report, release=None, vision_model="tiny", language_model="tiny")
    output_dir = save_converted_model(model, processor, directory / "converted", card=card)
    reloaded = AutoModelForImageTextToText.from_pretrained(output_dir).eval()
    return Converted(oracle, oracle_tokenizer, reloaded, AutoProcessor.from_pretrained(output_dir), report, output_dir)


@pytest.fixture(scope="module", params=list(FAMILIES))
def converted(request, tmp_path_factory):
    return _convert(FAMILIES[request.param], tmp_path_factory.mktemp(request.param))


def _batch(tokenizer, seed: int = 0):
    tokenizer.padding_side = "left"
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(len(PROMPTS), max(IMAGES_PER_PROMPT), 3, 32, 32, generator=generator)
    for row, count in enumerate(IMAGES_PER_PROMPT):
        pixel_values[row, count:] = 0  # zero-padded, as OpenFlamingo's evaluation pads missing images
    return encoded["input_ids"], encoded["attention_mask"], pixel_values


def _oracle_logits(oracle, input_ids, attention_mask, pixel_values):
    with torch.no_grad():
        return oracle(vision_x=pixel_values.unsqueeze(2), lang_x=input_ids, attention_mask=attention_mask).logits


def test_converted_tokenizer_matches_openflamingo(converted):
    tokenizer = converted.processor.tokenizer
    for token in ("<|endofchunk|>", "<image>", "<PAD>"):
        assert tokenizer.convert_tokens_to_ids(token) == converted.oracle_tokenizer.convert_tokens_to_ids(token)
    assert len(tokenizer) == len(converted.oracle_tokenizer) == 323
    ids, _, _ = _batch(converted.oracle_tokenizer)
    assert torch.equal(converted.processor.tokenizer(PROMPTS, return_tensors="pt", padding=True)["input_ids"], ids)
    assert converted.model.config.media_token_id == converted.oracle.media_token_id
    assert converted.model.config.eoc_token_id == converted.oracle.eoc_token_id
    assert converted.model.get_input_embeddings().weight.shape[0] == 323
    # Stops where OpenFlamingo's `generate` stops (`<|endofchunk|>`), then at the language model's eos.
    lm_eos = converted.oracle_tokenizer.eos_token_id
    assert converted.model.generation_config.eos_token_id == [converted.oracle.eoc_token_id, lm_eos]


def test_logits_match_openflamingo(converted):
    input_ids, attention_mask, pixel_values = _batch(converted.oracle_tokenizer)
    assert (attention_mask == 0).any(), "the batch must be left-padded"
    expected = _oracle_logits(converted.oracle, input_ids, attention_mask, pixel_values)
    with torch.no_grad():
        actual = converted.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    assert actual.shape == expected.shape
    real = attention_mask.bool()
    difference = (actual - expected).abs()
    assert difference[real].max().item() <= LOGITS_TOLERANCE, difference[real].max().item()
    # The images matter (gates are open): a sanity check that the comparison is not vacuous.
    with torch.no_grad():
        other = converted.model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=torch.flip(pixel_values, dims=[1])
        ).logits
    assert (other - actual)[real].abs().max().item() > 1e-3


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_matches_openflamingo(converted, num_beams):
    input_ids, attention_mask, pixel_values = _batch(converted.oracle_tokenizer)
    pad_token_id = converted.oracle_tokenizer.pad_token_id
    settings = dict(max_new_tokens=8, num_beams=num_beams, do_sample=False, pad_token_id=pad_token_id)
    with torch.no_grad():
        expected = converted.oracle.generate(pixel_values.unsqueeze(2), input_ids, attention_mask, **settings)
        actual = converted.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **settings
        )
    assert actual.tolist() == expected.tolist()


def test_report_accounts_for_every_key(converted):
    report = converted.report
    state_dict = torch.load(converted.output_dir.parent / "checkpoint.pt", weights_only=True)
    assert report.checkpoint_keys == len(state_dict)
    assert len(report.loaded_keys) + len(report.dropped_aliases) + len(report.dropped_buffers) == len(state_dict)
    model_keys = set(converted.model.state_dict())
    assert set(report.loaded_keys) | set(report.backbone_keys) == model_keys
    assert all(k.startswith(("vision_model.", "language_model.")) for k in report.backbone_keys)
    # A trainable-parameter checkpoint holds no language-model weight except embeddings.
    assert all("embed" in k or "wte" in k or "lm_head" in k for k in report.loaded_keys if "language_model." in k)


def test_converted_directory_contents(converted):
    files = {p.name for p in converted.output_dir.iterdir()}
    assert {"config.json", "generation_config.json", "README.md", "processor_config.json"} <= files
    assert any(name.endswith(".safetensors") for name in files)
    assert not any(name.endswith((".bin", ".pt")) for name in files)
    assert type(converted.processor.image_processor).__name__ == "FlamingoImageProcessor"
    assert "# an OpenFlamingo checkpoint (Transformers-native)" in (converted.output_dir / "README.md").read_text()


def test_full_dump_saved_by_older_transformers(tmp_path):
    """FSDP-style dumps (the 4B releases): the whole LM under `decoder_layer` keys, the alias keys, the open_clip
    tower, and the GPT-NeoX output projection under transformers 4.28's name `embed_out`."""
    oracle, oracle_tokenizer = prepare_openflamingo_files(FAMILIES["gpt_neox"], tmp_path, layout="full")
    state_dict = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state_dict["lang_encoder.embed_out.weight"] = state_dict.pop("lang_encoder.lm_head.weight")
    model, _, report = convert_files(tmp_path, state_dict)
    assert any(k.startswith("lang_encoder.old_decoder_blocks.") for k in report.dropped_aliases)
    assert any(k.startswith("lang_encoder.gated_cross_attn_layers.") for k in report.dropped_aliases)
    assert report.renamed_keys == {"embed_out.weight": "lm_head.weight"}
    assert report.backbone_keys == []
    input_ids, attention_mask, pixel_values = _batch(oracle_tokenizer)
    expected = _oracle_logits(oracle, input_ids, attention_mask, pixel_values)
    with torch.no_grad():
        actual = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    assert (actual - expected)[attention_mask.bool()].abs().max().item() <= LOGITS_TOLERANCE


def test_vision_encoder_in_checkpoint_overrides_the_given_tower(tmp_path):
    """A checkpoint with `vision_encoder.*` keys supplies the tower's weights; the given tower only its config."""
    family = FAMILIES["mpt"]
    oracle_lm, oracle_tokenizer = write_backbones(family, tmp_path)
    oracle, clip_model = build_openflamingo(
        oracle_lm, oracle_tokenizer, decoder_layers_attr=family.decoder_layers_attr, cross_attn_every_n_layers=4
    )
    vision_model = open_clip_vision_to_hf(clip_model.visual, register_tiny_open_clip())
    with torch.no_grad():
        for parameter in vision_model.parameters():
            parameter.add_(torch.randn_like(parameter))  # a different tower with the same architecture
    vision_model.save_pretrained(tmp_path / "vision_model")
    save_openflamingo_checkpoint(oracle, tmp_path / "checkpoint.pt", layout="full")
    model, _, report = convert_files(tmp_path)
    assert not any(k.startswith("vision_model.") for k in report.backbone_keys)
    input_ids, attention_mask, pixel_values = _batch(oracle_tokenizer)
    expected = _oracle_logits(oracle, input_ids, attention_mask, pixel_values)
    with torch.no_grad():
        actual = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    assert (actual - expected)[attention_mask.bool()].abs().max().item() <= LOGITS_TOLERANCE


def test_untied_output_projection_missing_from_checkpoint_warns(tmp_path, caplog):
    """OpenFlamingo never saved an untied `lm_head` (v1 LLaMA): the new tokens' output rows cannot be recovered."""
    family = Family(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=320,
            tie_word_embeddings=False,
            max_position_embeddings=128,
        ),
        "model.layers",
        1,
    )
    oracle_lm, oracle_tokenizer = write_backbones(family, tmp_path)
    oracle, clip_model = build_openflamingo(
        oracle_lm, oracle_tokenizer, decoder_layers_attr=family.decoder_layers_attr, cross_attn_every_n_layers=1
    )
    open_clip_vision_to_hf(clip_model.visual, register_tiny_open_clip()).save_pretrained(tmp_path / "vision_model")
    save_openflamingo_checkpoint(oracle, tmp_path / "checkpoint.pt")
    with caplog.at_level(logging.WARNING):
        model, _, _ = convert_files(tmp_path)
    assert "holds no output-projection weights (`language_model.lm_head.weight`)" in caplog.text
    input_ids, attention_mask, pixel_values = _batch(oracle_tokenizer)
    expected = _oracle_logits(oracle, input_ids, attention_mask, pixel_values)
    with torch.no_grad():
        actual = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    real = attention_mask.bool()
    # The original vocabulary's logits match; only the three added tokens' columns are unrecoverable.
    assert (actual - expected)[real][:, :320].abs().max().item() <= LOGITS_TOLERANCE


def test_checkpoint_for_a_different_language_model_is_refused(tmp_path):
    family = FAMILIES["mpt"]
    converted = _convert(family, tmp_path / "mpt")
    other = FAMILIES["llama"]
    write_backbones(other, tmp_path / "llama")
    with pytest.raises(CheckpointError, match="decoder layers are at `model.layers`"):
        convert_openflamingo_checkpoint(
            converted.output_dir.parent / "checkpoint.pt",
            vision_model=converted.output_dir.parent / "vision_model",
            language_model=tmp_path / "llama" / "language_model",
            tokenizer=tmp_path / "llama" / "tokenizer",
        )
