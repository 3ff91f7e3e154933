"""Files for conversion tests: tiny language models of each release family, their tokenizer, and OpenFlamingo
checkpoints of them saved the way OpenFlamingo's training code saves them."""

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from helpers import build_tiny_tokenizer
from openflamingo_oracle import build_openflamingo, register_tiny_open_clip, save_openflamingo_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, LlamaConfig, MptConfig

from hf_flamingo import MosaicGPTConfig
from hf_flamingo.conversion.open_clip import open_clip_vision_to_hf
from hf_flamingo.conversion.openflamingo_to_hf import convert_openflamingo_checkpoint


@dataclass(frozen=True)
class Family:
    config: Any
    decoder_layers_attr: str
    cross_attn_every_n_layers: int


FAMILIES = {
    # Vocabularies larger than the tokenizer's 323 tokens are shrunk, as MPT/RedPajama's 50432 -> 50280.
    "mosaic_gpt": Family(
        MosaicGPTConfig(
            d_model=64,
            n_heads=4,
            n_layers=3,
            vocab_size=336,
            max_seq_len=128,
            attn_qk_ln=True,
            alibi=True,
            alibi_bias_max=8,
            no_bias=True,
            low_precision_layernorm=True,
        ),
        "transformer.blocks",
        1,
    ),
    "gpt_neox": Family(
        GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            vocab_size=336,
            use_parallel_residual=False,
            tie_word_embeddings=False,
            max_position_embeddings=128,
        ),
        "gpt_neox.layers",
        2,
    ),
    "mpt": Family(
        MptConfig(
            d_model=64,
            n_heads=4,
            n_layers=4,
            vocab_size=336,
            max_seq_len=128,
            no_bias=True,
            attn_config={"alibi": True, "alibi_bias_max": 8},
        ),
        "transformer.blocks",
        4,
    ),
    "llama": Family(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=320,
            tie_word_embeddings=True,
            max_position_embeddings=128,
        ),
        "model.layers",
        2,
    ),
}


def write_backbones(family: Family, directory, seed: int = 0):
    """Saves the tiny LM and the tokenizer (before OpenFlamingo touches them); returns the oracle's copies."""
    torch.manual_seed(seed)
    language_model = AutoModelForCausalLM.from_config(copy.deepcopy(family.config))
    language_model.save_pretrained(directory / "language_model")
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(directory / "tokenizer")
    oracle_lm = AutoModelForCausalLM.from_pretrained(directory / "language_model")
    return oracle_lm, AutoTokenizer.from_pretrained(directory / "tokenizer")


def prepare_openflamingo_files(family: Family, directory: Path, layout: str = "trainable", seed: int = 0):
    """Writes `language_model/`, `tokenizer/`, `vision_model/` (the oracle's open_clip tower converted to a
    `CLIPVisionModel`) and `checkpoint.pt` into `directory`.

    Returns:
        `(oracle, oracle_tokenizer)`: the OpenFlamingo model the checkpoint was saved from, and its tokenizer.
    """
    oracle_lm, oracle_tokenizer = write_backbones(family, directory, seed)
    oracle, clip_model = build_openflamingo(
        oracle_lm,
        oracle_tokenizer,
        decoder_layers_attr=family.decoder_layers_attr,
        cross_attn_every_n_layers=family.cross_attn_every_n_layers,
        seed=seed,
    )
    open_clip_vision_to_hf(clip_model.visual, register_tiny_open_clip()).save_pretrained(directory / "vision_model")
    save_openflamingo_checkpoint(oracle, directory / "checkpoint.pt", layout=layout)
    return oracle, oracle_tokenizer


def convert_files(directory: Path, checkpoint=None, **kwargs):
    """`convert_openflamingo_checkpoint` on the files `prepare_openflamingo_files` wrote into `directory`."""
    return convert_openflamingo_checkpoint(
        directory / "checkpoint.pt" if checkpoint is None else checkpoint,
        vision_model=directory / "vision_model",
        language_model=directory / "language_model",
        tokenizer=directory / "tokenizer",
        **kwargs,
    )
