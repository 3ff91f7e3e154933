"""The released OpenFlamingo v2 models: where their parts come from and the architecture facts a conversion checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from transformers import CLIPVisionConfig, GPTNeoXConfig, MptConfig, PretrainedConfig

from ..configuration_mosaic_gpt import MosaicGPTConfig

CLIP_VIT_L_14 = "openai/clip-vit-large-patch14"
OPENFLAMINGO_SPECIAL_TOKENS = ("<|endofchunk|>", "<image>")
OPENFLAMINGO_PAD_TOKEN = "<PAD>"

CheckpointLayout = Literal["trainable", "full_language_model"]


def clip_vit_l_14_vision_config() -> CLIPVisionConfig:
    """The vision tower of every OpenFlamingo v2 release: OpenAI CLIP ViT-L/14 at 224 px (QuickGELU)."""
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _mosaic_gpt_1b_config() -> PretrainedConfig:
    return MosaicGPTConfig(
        d_model=2048,
        n_heads=16,
        n_layers=24,
        mlp_ratio=4,
        max_seq_len=2048,
        vocab_size=50432,
        attn_qk_ln=True,
        alibi=True,
        alibi_bias_max=8,
        no_bias=True,
        low_precision_layernorm=True,
    )


def _redpajama_3b_config() -> PretrainedConfig:
    return GPTNeoXConfig(
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=2048,
        rotary_pct=1.0,
        rotary_emb_base=10000,
        use_parallel_residual=False,
        layer_norm_eps=1e-5,
        vocab_size=50432,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )


def _mpt_7b_config() -> PretrainedConfig:
    return MptConfig(
        d_model=4096,
        n_heads=32,
        n_layers=32,
        expansion_ratio=4,
        max_seq_len=2048,
        vocab_size=50432,
        no_bias=True,
        attn_config={"alibi": True, "alibi_bias_max": 8, "qk_ln": False, "clip_qkv": None, "softmax_scale": None},
    )


_NEOX_SPECIAL_IDS = {"<|endofchunk|>": 50277, "<image>": 50278, "<PAD>": 50279}


@dataclass(frozen=True)
class OpenFlamingoRelease:
    """One released OpenFlamingo v2 model.

    Attributes:
        name: Release name, e.g. `"OpenFlamingo-3B-vitl-mpt1b"`; its checkpoint is in the Hub repository
            `openflamingo/<name>`.
        language_model: Hub id of the (frozen) language model; OpenFlamingo also loads the tokenizer from it.
        cross_attn_every_n_layers: Placement of the gated cross-attention blocks.
        checkpoint_layout: `"trainable"` (perceiver, cross-attention and input embeddings, DDP training) or
            `"full_language_model"` (additionally every language-model weight, FSDP training).
        text_config_factory: Builds the language model's architecture (used to check a checkpoint against the release
            without downloading anything; a real conversion uses the language model's own `config.json`).
        model_card_notes: Facts about the release repeated in the converted model card.
        vision_model: Hub id of the (frozen) vision tower.
        language_model_revision: Revision of `language_model` the release was trained with, when recorded.
        vocab_size: Rows of the resized embedding matrices (`len(tokenizer)` after adding the special tokens).
        special_token_ids: Ids of `<|endofchunk|>`, `<image>` and `<PAD>` in the release's tokenizer.
    """

    name: str
    language_model: str
    cross_attn_every_n_layers: int
    checkpoint_layout: CheckpointLayout
    text_config_factory: Callable[[], PretrainedConfig] = field(repr=False)
    model_card_notes: str = ""
    vision_model: str = CLIP_VIT_L_14
    language_model_revision: str | None = None
    vocab_size: int = 50280
    special_token_ids: dict[str, int] = field(default_factory=lambda: dict(_NEOX_SPECIAL_IDS))

    @property
    def repo_id(self) -> str:
        """Hub repository holding the release's `checkpoint.pt`."""
        return f"openflamingo/{self.name}"

    @property
    def tokenizer(self) -> str:
        """Hub id of the tokenizer (OpenFlamingo loads it from the language model's repository)."""
        return self.language_model

    def text_config(self) -> PretrainedConfig:
        """The language model's architecture before the vocabulary is resized."""
        return self.text_config_factory()

    def vision_config(self) -> CLIPVisionConfig:
        """The vision tower's architecture."""
        return clip_vit_l_14_vision_config()


_OPENFLAMINGO_3B = OpenFlamingoRelease(
    name="OpenFlamingo-3B-vitl-mpt1b",
    language_model="anas-awadalla/mpt-1b-redpajama-200b",
    cross_attn_every_n_layers=1,
    checkpoint_layout="trainable",
    text_config_factory=_mosaic_gpt_1b_config,
    model_card_notes="Language model: MosaicGPT-1B (RedPajama, 200B tokens), run by hf_flamingo's native MosaicGPT "
    "port. Trained with DDP in fp32.",
)
_OPENFLAMINGO_4B = OpenFlamingoRelease(
    name="OpenFlamingo-4B-vitl-rpj3b",
    language_model="togethercomputer/RedPajama-INCITE-Base-3B-v1",
    cross_attn_every_n_layers=2,
    checkpoint_layout="full_language_model",
    text_config_factory=_redpajama_3b_config,
    model_card_notes="Language model: RedPajama-INCITE-Base-3B (GPT-NeoX). Trained with FSDP in fp32 with frozen "
    "embeddings; the checkpoint holds the whole language model.",
)

OPENFLAMINGO_RELEASES: dict[str, OpenFlamingoRelease] = {
    release.name: release
    for release in (
        _OPENFLAMINGO_3B,
        replace(
            _OPENFLAMINGO_3B,
            name="OpenFlamingo-3B-vitl-mpt1b-langinstruct",
            language_model="anas-awadalla/mpt-1b-redpajama-200b-dolly",
            model_card_notes="Language model: MosaicGPT-1B instruction-tuned on Dolly, run by hf_flamingo's native "
            "MosaicGPT port. Trained with DDP in fp32.",
        ),
        _OPENFLAMINGO_4B,
        replace(
            _OPENFLAMINGO_4B,
            name="OpenFlamingo-4B-vitl-rpj3b-langinstruct",
            language_model="togethercomputer/RedPajama-INCITE-Instruct-3B-v1",
            model_card_notes="Language model: RedPajama-INCITE-Instruct-3B (GPT-NeoX). Trained with FSDP in fp32 "
            "with frozen embeddings; the checkpoint holds the whole language model.",
        ),
        OpenFlamingoRelease(
            name="OpenFlamingo-9B-vitl-mpt7b",
            language_model="anas-awadalla/mpt-7b",
            language_model_revision="68e1a8e0ebb9b30f3c45c1ef6195980f29063ae2",
            cross_attn_every_n_layers=4,
            checkpoint_layout="trainable",
            text_config_factory=_mpt_7b_config,
            model_card_notes="Language model: MPT-7B, run by transformers' native `MptForCausalLM`. Trained with DDP "
            "under bf16 autocast.",
        ),
    )
}


def get_release(name: str) -> OpenFlamingoRelease:
    """Looks up a release by name (case-insensitive; an `openflamingo/` prefix is accepted).

    Raises:
        ValueError: for an unknown name; the message lists the known releases.
    """
    key = name.removeprefix("openflamingo/").lower()
    for release in OPENFLAMINGO_RELEASES.values():
        if release.name.lower() == key:
            return release
    raise ValueError(f"Unknown OpenFlamingo release {name!r}; known releases: {', '.join(OPENFLAMINGO_RELEASES)}.")


__all__ = ["OPENFLAMINGO_RELEASES", "OpenFlamingoRelease", "clip_vit_l_14_vision_config", "get_release"]
