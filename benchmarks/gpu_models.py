"""Models of the GPU check (`gpu_check.py`), all with random weights built from configs (no download).

- Correctness models: Llama + CLIP Flamingos in two sizes (`CORRECTNESS_SHAPES`; `--tiny` swaps the mid-size one for
  a small one), with open gates so that images change every output.
- Scale models: OpenFlamingo-9B-shaped (`SCALE_SHAPES["9b"]`: the release's MPT-7B config run by transformers'
  `MptForCausalLM`, an open_clip / CLIP ViT-L/14 tower at 224 px, cross-attention before every 4th layer), built
  directly on the device. `build_scale_setup` loads one set of weights into OpenFlamingo 2.0.1 (the test oracle) and,
  through the checkpoint converter, into hf_flamingo; `build_scale_flamingo` builds hf_flamingo alone with its language
  model in bf16, 8-bit or 4-bit.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    MptConfig,
    PretrainedConfig,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT / "tests", REPO_ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from helpers import build_tiny_tokenizer  # noqa: E402

from hf_flamingo import FlamingoConfig, FlamingoForConditionalGeneration, FlamingoProcessor  # noqa: E402
from hf_flamingo.conversion.releases import clip_vit_l_14_vision_config, get_release  # noqa: E402

PRECISIONS = ("bf16", "8bit", "4bit")


def one_line(error: BaseException, limit: int = 300) -> str:
    """`error` as "Type: message" on one line (for a report's table), at most `limit` characters."""
    return " ".join(f"{type(error).__name__}: {error}".split())[:limit]


# ----------------------------------------------------------------------------------------------------------------------
# Correctness models


@dataclass(frozen=True)
class CorrectnessShape:
    """A Llama + CLIP Flamingo's sizes. The last two token ids are `<image>` and `<|endofchunk|>`, id 0 pads."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    vision_hidden_size: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    cross_attn_every_n_layers: int

    @property
    def media_token_id(self) -> int:
        return self.vocab_size - 2

    @property
    def eoc_token_id(self) -> int:
        return self.vocab_size - 1

    def text_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )

    def vision_config(self) -> CLIPVisionConfig:
        return CLIPVisionConfig(
            hidden_size=self.vision_hidden_size,
            intermediate_size=4 * self.vision_hidden_size,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
        )


CORRECTNESS_SHAPES = {
    "tiny": CorrectnessShape("tiny", 64, 4, 4, 2, 128, 128, 64, 2, 4, 32, 8, 2),
    # About 0.6B parameters: Llama hidden 1536 x 12 layers (GQA), ViT-B/16 at 224 px, cross-attention every 4 layers.
    "mid": CorrectnessShape("mid", 1536, 12, 12, 4, 4096, 32000, 768, 12, 12, 224, 16, 4),
    # The `--tiny` stand-in for "mid": the same code path in seconds on a CPU.
    "small": CorrectnessShape("small", 128, 4, 4, 4, 256, 512, 96, 2, 4, 48, 16, 2),
}


def build_correctness_model(shape: CorrectnessShape, seed: int = 0) -> FlamingoForConditionalGeneration:
    """A float32 Flamingo on the CPU with random weights and open gates (images change every output)."""
    torch.manual_seed(seed)
    config = FlamingoConfig(
        vision_config=shape.vision_config(),
        text_config=shape.text_config(),
        media_token_id=shape.media_token_id,
        eoc_token_id=shape.eoc_token_id,
        cross_attn_every_n_layers=shape.cross_attn_every_n_layers,
    )
    model = FlamingoForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.copy_(torch.rand(1, generator=generator) + 0.5)
            block.ff_gate.copy_(torch.rand(1, generator=generator) * 0.5 + 0.1)
    return model.eval()


def correctness_batch(shape: CorrectnessShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two interleaved rows: three images, then two images and left padding (its third image slot is padding).

    Returns `input_ids`, `attention_mask`, `pixel_values` (2, 3, 3, H, W) and `labels` (padding masked)."""
    generator = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return torch.randint(3, shape.vocab_size - 2, (n,), generator=generator).tolist()

    def row(num_images: int) -> list[int]:
        ids = [1]
        for _ in range(num_images):
            ids += [shape.media_token_id, *text(5), shape.eoc_token_id]
        return ids + text(4)

    rows = [row(3), row(2)]
    length = max(len(r) for r in rows)
    input_ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    attention_mask = (torch.arange(length) >= torch.tensor([[length - len(r)] for r in rows])).long()
    pixel_values = torch.randn(2, 3, 3, shape.image_size, shape.image_size, generator=generator)
    pixel_values[1, 2] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values, "labels": labels}


# ----------------------------------------------------------------------------------------------------------------------
# Scale models


@dataclass(frozen=True)
class ScaleShape:
    """An OpenFlamingo-shaped model: its LM config, open_clip tower name, tokenizer size and interval."""

    name: str
    description: str
    text_config: PretrainedConfig
    open_clip_name: str
    vision_config: CLIPVisionConfig
    tokenizer_size: int | None
    """Grow the byte-level test tokenizer to this many tokens with unused entries (`None`: leave it as it is), so
    that the embedding matrix gets its real shape after the Flamingo tokens are added."""
    cross_attn_every_n_layers: int = 4

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size


def _scale_shapes() -> dict[str, ScaleShape]:
    from openflamingo_oracle import TINY_OPEN_CLIP_CONFIG, TINY_OPEN_CLIP_NAME

    tiny_vision = TINY_OPEN_CLIP_CONFIG["vision_cfg"]
    return {
        "9b": ScaleShape(
            name="9b",
            description="OpenFlamingo-9B-vitl-mpt7b-shaped: MPT-7B (d_model 4096, 32 layers, ALiBi), ViT-L/14 at 224 px",
            text_config=get_release("OpenFlamingo-9B-vitl-mpt7b").text_config(),
            open_clip_name="ViT-L-14",
            vision_config=clip_vit_l_14_vision_config(),
            tokenizer_size=50277,  # GPT-NeoX-20B's tokenizer, which MPT-7B uses: 50280 rows with the Flamingo tokens
        ),
        "tiny": ScaleShape(
            name="tiny",
            description="tiny MPT (d_model 64, 8 layers, ALiBi), tiny ViT at 32 px (the --tiny dry run)",
            text_config=MptConfig(
                d_model=64,
                n_heads=4,
                n_layers=8,
                expansion_ratio=4,
                max_seq_len=2048,
                vocab_size=512,
                no_bias=True,
                attn_config={"alibi": True, "alibi_bias_max": 8},
            ),
            open_clip_name=TINY_OPEN_CLIP_NAME,
            vision_config=CLIPVisionConfig(
                hidden_size=tiny_vision["width"],
                intermediate_size=4 * tiny_vision["width"],
                num_hidden_layers=tiny_vision["layers"],
                num_attention_heads=tiny_vision["width"] // tiny_vision["head_width"],
                image_size=tiny_vision["image_size"],
                patch_size=tiny_vision["patch_size"],
            ),
            tokenizer_size=None,
        ),
    }


def scale_shape(name: str) -> ScaleShape:
    return _scale_shapes()[name]


def scale_tokenizer(shape: ScaleShape) -> Any:
    """The byte-level test tokenizer (a fresh instance), grown to `shape.tokenizer_size` tokens."""
    tokenizer = build_tiny_tokenizer()
    if shape.tokenizer_size is not None:
        tokenizer.add_tokens([f"<|unused_{i}|>" for i in range(shape.tokenizer_size - len(tokenizer))])
    return tokenizer


def _random_language_model(config: PretrainedConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def build_scale_setup(shape: ScaleShape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """One set of weights in OpenFlamingo 2.0.1 and (converted) hf_flamingo, plus the bare LM, all on `device`.

    As `setups.build_setup` does on the CPU: the oracle is built around a random LM (OpenFlamingo's factory steps,
    gates opened to random values), its checkpoint (the release layout) is converted with
    `convert_openflamingo_checkpoint` around an untouched copy of the same LM and the oracle's tower.

    Returns:
        `setups.Setup` (the tokenizer pads on the left).
    """
    import open_clip
    from openflamingo_oracle import build_openflamingo, openflamingo_state_dict
    from setups import Setup

    from hf_flamingo.conversion.open_clip import open_clip_vision_to_hf
    from hf_flamingo.conversion.openflamingo_to_hf import convert_openflamingo_checkpoint

    torch.manual_seed(seed)
    language_model = _random_language_model(shape.text_config, device, dtype)
    bare_lm = copy.deepcopy(language_model)
    ours_lm = copy.deepcopy(language_model)
    oracle, clip_model = build_openflamingo(
        language_model,
        scale_tokenizer(shape),
        decoder_layers_attr="transformer.blocks",
        cross_attn_every_n_layers=shape.cross_attn_every_n_layers,
        seed=seed,
        clip_model_name=shape.open_clip_name,
        train_input_embeddings=False,
        device=device,
    )
    oracle.to(dtype).eval()
    vision_model = open_clip_vision_to_hf(clip_model.visual, open_clip.get_model_config(shape.open_clip_name))
    del clip_model  # the oracle keeps `clip_model.visual`
    ours, processor, _ = convert_openflamingo_checkpoint(
        openflamingo_state_dict(oracle),
        vision_model=vision_model,
        language_model=ours_lm,
        tokenizer=scale_tokenizer(shape),
    )
    ours = ours.to(device=device, dtype=dtype).eval()
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if (ours.config.media_token_id, ours.config.eoc_token_id) != (oracle.media_token_id, oracle.eoc_token_id):
        raise RuntimeError("hf_flamingo and OpenFlamingo disagree on the <image>/<|endofchunk|> token ids")
    return Setup(
        name=shape.name,
        ours=ours,
        oracle=oracle,
        bare_lm=bare_lm,
        tokenizer=tokenizer,
        image_size=shape.image_size,
        description=describe(shape, ours, oracle=oracle, dtype=dtype),
    )


def quantization_config(precision: str, compute_dtype: torch.dtype = torch.bfloat16) -> BitsAndBytesConfig | None:
    """`None` for "bf16"; bitsandbytes 8-bit (LLM.int8) or 4-bit NF4 with double quantization."""
    if precision == "bf16":
        return None
    if precision == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if precision == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")


def build_scale_flamingo(shape: ScaleShape, device: torch.device, precision: str, seed: int = 0) -> Any:
    """hf_flamingo alone, built as a user composes one: `from_backbones(vision tower, language model, tokenizer)`,
    everything in bf16 except, for "8bit"/"4bit", the language model's linears.

    The random bf16 language model is built on `device`, then (quantized precisions) loaded again through the public
    `from_pretrained(None, config=..., state_dict=...)` with a `BitsAndBytesConfig`, so that bitsandbytes quantizes it
    exactly as it quantizes a downloaded checkpoint.

    Returns:
        `setups.Setup` with `oracle` and `bare_lm` set to `None`.
    """
    from setups import Setup

    processor = FlamingoProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": shape.image_size}),
        tokenizer=scale_tokenizer(shape),
    )
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    text_config = copy.deepcopy(shape.text_config)
    text_config.vocab_size = len(tokenizer)  # what OpenFlamingo's factory resizes MPT-7B's 50432 rows to
    torch.manual_seed(seed)
    language_model = _random_language_model(text_config, device, torch.bfloat16)
    quantization = quantization_config(precision)
    if quantization is not None:
        state_dict = language_model.state_dict()
        model_class = type(language_model)
        del language_model
        language_model = model_class.from_pretrained(
            None,
            config=text_config,
            state_dict=state_dict,
            quantization_config=quantization,
            dtype=torch.bfloat16,
            device_map={"": torch.cuda.current_device()} if device.type == "cuda" else None,
        ).eval()
        del state_dict
    with torch.device(device):
        vision_model = CLIPVisionModel(shape.vision_config).to(torch.bfloat16)
    ours = FlamingoForConditionalGeneration.from_backbones(
        vision_model,
        language_model,
        tokenizer=tokenizer,
        cross_attn_every_n_layers=shape.cross_attn_every_n_layers,
    )
    return Setup(
        name=f"{shape.name}-{precision}",
        ours=ours,
        oracle=None,
        bare_lm=None,
        tokenizer=tokenizer,
        image_size=shape.image_size,
        description=describe(shape, ours, dtype=torch.bfloat16, precision=precision),
    )


def describe(
    shape: ScaleShape, ours: Any, *, oracle: Any = None, dtype: torch.dtype, precision: str | None = None
) -> dict[str, Any]:
    text_config = ours.config.text_config
    description = {
        "shape": shape.description,
        "LM layers / hidden / vocabulary rows": f"{text_config.num_hidden_layers} / {text_config.hidden_size} / "
        f"{ours.get_input_embeddings().weight.shape[0]}",
        "gated cross-attention blocks": len(ours.gated_cross_attn_layers),
        "perceiver latents / depth": f"{ours.config.perceiver_num_latents} / {ours.config.perceiver_depth}",
        "hf_flamingo parameters (M)": round(sum(p.numel() for p in ours.parameters()) / 1e6, 1),
        "dtype": str(dtype).removeprefix("torch."),
        "LM attention implementation": ours.language_model.config._attn_implementation,
    }
    if oracle is not None:
        description["OpenFlamingo parameters (M)"] = round(sum(p.numel() for p in oracle.parameters()) / 1e6, 1)
    if precision is not None:
        description["LM linears"] = precision
    return description
