"""Tiny random Flamingo models over many language-model families, for tests (no network, seconds each)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    CLIPVisionConfig,
    FalconConfig,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MptConfig,
    OPTConfig,
    PhiConfig,
    PretrainedConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

from hf_flamingo import FlamingoConfig, FlamingoForConditionalGeneration

VOCAB_SIZE = 99
MEDIA_TOKEN_ID = 97
EOC_TOKEN_ID = 98
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
NUM_LAYERS = 4
IMAGE_SIZE = 30

_SPECIAL_IDS = {"pad_token_id": PAD_TOKEN_ID, "bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID}
_LLAMA_LIKE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    **_SPECIAL_IDS,
)


def _text_configs() -> dict[str, tuple[PretrainedConfig, str]]:
    """Language-model family -> (tiny config, path of its decoder layers)."""
    return {
        "llama": (LlamaConfig(**_LLAMA_LIKE, tie_word_embeddings=False), "model.layers"),
        "mistral": (MistralConfig(**_LLAMA_LIKE, sliding_window=None), "model.layers"),
        "qwen2": (Qwen2Config(**_LLAMA_LIKE, tie_word_embeddings=True), "model.layers"),
        "gemma": (GemmaConfig(**_LLAMA_LIKE, head_dim=8), "model.layers"),
        "phi": (
            PhiConfig(
                vocab_size=VOCAB_SIZE,
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=NUM_LAYERS,
                num_attention_heads=4,
                max_position_embeddings=128,
                **_SPECIAL_IDS,
            ),
            "model.layers",
        ),
        "gpt2": (
            GPT2Config(
                vocab_size=VOCAB_SIZE, n_embd=32, n_layer=NUM_LAYERS, n_head=4, n_positions=128, **_SPECIAL_IDS
            ),
            "transformer.h",
        ),
        "gpt_neox": (
            GPTNeoXConfig(
                vocab_size=VOCAB_SIZE,
                hidden_size=32,
                num_hidden_layers=NUM_LAYERS,
                num_attention_heads=4,
                intermediate_size=37,
                max_position_embeddings=128,
                **_SPECIAL_IDS,
            ),
            "gpt_neox.layers",
        ),
        "gptj": (
            GPTJConfig(
                vocab_size=VOCAB_SIZE,
                n_embd=32,
                n_layer=NUM_LAYERS,
                n_head=4,
                rotary_dim=4,
                n_positions=128,
                **_SPECIAL_IDS,
            ),
            "transformer.h",
        ),
        "opt": (
            OPTConfig(
                vocab_size=VOCAB_SIZE,
                hidden_size=32,
                num_hidden_layers=NUM_LAYERS,
                ffn_dim=37,
                num_attention_heads=4,
                word_embed_proj_dim=32,
                max_position_embeddings=128,
                **_SPECIAL_IDS,
            ),
            "model.decoder.layers",
        ),
        "mpt": (
            MptConfig(
                vocab_size=VOCAB_SIZE, d_model=32, n_layers=NUM_LAYERS, n_heads=4, max_seq_len=128, **_SPECIAL_IDS
            ),
            "transformer.blocks",
        ),
        "falcon": (
            FalconConfig(
                vocab_size=VOCAB_SIZE,
                hidden_size=32,
                num_hidden_layers=NUM_LAYERS,
                num_attention_heads=4,
                **_SPECIAL_IDS,
            ),
            "transformer.h",
        ),
        "bloom": (
            BloomConfig(vocab_size=VOCAB_SIZE, hidden_size=32, n_layer=NUM_LAYERS, n_head=4, **_SPECIAL_IDS),
            "transformer.h",
        ),
    }


LM_FAMILIES = list(_text_configs())


def text_config_for(family: str) -> PretrainedConfig:
    return _text_configs()[family][0]


def decoder_layers_path_for(family: str) -> str:
    return _text_configs()[family][1]


def vision_config_for(kind: str = "clip") -> PretrainedConfig:
    common = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=6,
    )
    if kind == "clip":
        return CLIPVisionConfig(**common)
    if kind == "siglip":
        return SiglipVisionConfig(**common)
    raise ValueError(kind)


def flamingo_config(family: str = "llama", vision: str = "clip", **overrides) -> FlamingoConfig:
    kwargs = dict(
        vision_config=vision_config_for(vision),
        text_config=text_config_for(family),
        media_token_id=MEDIA_TOKEN_ID,
        eoc_token_id=EOC_TOKEN_ID,
        cross_attn_every_n_layers=2,
        perceiver_depth=2,
        perceiver_num_latents=8,
        perceiver_heads=2,
        perceiver_dim_head=8,
        xattn_heads=2,
        xattn_dim_head=8,
        vision_feature_select_strategy="default" if vision == "clip" else "full",
    )
    kwargs.update(overrides)
    return FlamingoConfig(**kwargs)


def build_model(
    family: str = "llama", vision: str = "clip", seed: int = 0, **overrides
) -> FlamingoForConditionalGeneration:
    torch.manual_seed(seed)
    return FlamingoForConditionalGeneration(flamingo_config(family, vision, **overrides)).eval()


def open_gates(model: FlamingoForConditionalGeneration, seed: int = 1) -> None:
    """Sets every gate to a non-zero random value so that images and the gated feed-forward change outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.copy_(torch.rand(1, generator=generator) + 0.5)
            block.ff_gate.copy_(torch.rand(1, generator=generator) * 0.5 + 0.1)


def bare_language_model(model: FlamingoForConditionalGeneration) -> torch.nn.Module:
    """An independent copy of the Flamingo's language model, built from its config (no hooks)."""
    bare = AutoModelForCausalLM.from_config(model.config.text_config)
    bare.load_state_dict(model.language_model.state_dict())
    return bare.eval()


@dataclass
class Batch:
    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    pixel_values: torch.FloatTensor


def random_pixels(batch: int, num_images: int, seed: int = 0) -> torch.FloatTensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def interleaved_batch(seed: int = 0) -> Batch:
    """Two samples with several `<image>` positions; the second has one image fewer (padded) and is left-padded."""
    m = MEDIA_TOKEN_ID
    input_ids = torch.tensor(
        [
            [BOS_TOKEN_ID, 5, 6, m, 7, 8, 9, EOC_TOKEN_ID, m, 10, 11, 12, m, 13, 14],
            [
                PAD_TOKEN_ID,
                PAD_TOKEN_ID,
                PAD_TOKEN_ID,
                BOS_TOKEN_ID,
                20,
                m,
                21,
                22,
                EOC_TOKEN_ID,
                m,
                23,
                24,
                25,
                26,
                27,
            ],
        ]
    )
    attention_mask = (torch.arange(input_ids.shape[1]) >= torch.tensor([[0], [3]])).long()
    pixel_values = random_pixels(2, 3, seed)
    pixel_values[1, 2] = 0  # the second sample has two images; its third slot is padding
    return Batch(input_ids, attention_mask, pixel_values)
