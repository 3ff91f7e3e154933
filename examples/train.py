"""Train a Flamingo bridge (Perceiver Resampler + gated cross-attention) with `transformers.Trainer`.

The same script runs on one process, under `torchrun` (DDP) and under `accelerate launch` (DDP, FSDP, DeepSpeed):
the distribution is entirely Trainer's / accelerate's.

    # Tiny random backbones and synthetic data (CPU, seconds):
    python examples/train.py --output-dir out
    torchrun --nproc_per_node 2 examples/train.py --output-dir out
    accelerate launch --multi_gpu --num_processes 2 examples/train.py --output-dir out  # also on CPU (gloo)
    # Real backbones (local directories or Hub ids), a 4-bit LM with LoRA adapters (QLoRA) on one GPU:
    python examples/train.py --vision-model openai/clip-vit-large-patch14 --language-model HuggingFaceTB/SmolLM2-135M \\
        --quantization 4bit --lora-r 16 --bf16 --output-dir out
    # FSDP / DeepSpeed ZeRO-3 (GPUs): see examples/accelerate_configs/.
    accelerate launch --config_file examples/accelerate_configs/fsdp.yaml examples/train.py --output-dir out

The data is synthetic (a coloured square on a coloured background, two image-caption chunks per sample); replace
`synthetic_dataset` with your own list/Dataset of `{"text": ..., "images": [...]}` samples.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    BitsAndBytesConfig,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_flamingo import FlamingoDataCollator, FlamingoForConditionalGeneration, FlamingoProcessor

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 30),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="Where the trained model and processor are saved.")
    parser.add_argument("--vision-model", help="Vision tower (Hub id or directory). Default: a tiny random CLIP.")
    parser.add_argument("--language-model", help="Causal LM (Hub id or directory). Default: a tiny random Llama.")
    parser.add_argument("--cross-attn-every-n-layers", type=int, default=2)
    parser.add_argument("--quantization", choices=["none", "8bit", "4bit"], default="none")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank on the LM (0: train the bridge only).")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4, help="Per device.")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--save-trainable-state",
        help="Also write each rank's trainable parameters to `<this>-rank<N>.safetensors` (to compare ranks).",
    )
    return parser.parse_args(argv)


def synthetic_dataset(num_samples: int, image_size: int, seed: int) -> list[dict]:
    """Samples `{"text", "images"}`: two chunks `<image>A red square on blue.<|endofchunk|>`, then EOS."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    samples = []
    for _ in range(num_samples):
        text, images = "", []
        for _ in range(2):
            square, background = rng.choice(len(names), size=2, replace=False)
            pixels = np.empty((image_size, image_size, 3), dtype=np.uint8)
            pixels[:] = COLOURS[names[background]]
            low, high = image_size // 4, 3 * image_size // 4
            pixels[low:high, low:high] = COLOURS[names[square]]
            images.append(Image.fromarray(pixels))
            text += f"<image>A {names[square]} square on {names[background]}.<|endofchunk|>"
        samples.append({"text": text + "<|endoftext|>", "images": images})
    return samples


def tiny_tokenizer(samples: list[dict]) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the captions (offline, milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    captions = [s["text"].replace("<image>", "").replace("<|endofchunk|>", " ") for s in samples]
    tokenizer.train_from_iterator(captions, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def build(args: argparse.Namespace, samples: list[dict]) -> tuple[FlamingoForConditionalGeneration, FlamingoProcessor]:
    """The processor and a new Flamingo from the requested (or tiny random) backbones."""
    quantization_config = {
        "none": None,
        "8bit": BitsAndBytesConfig(load_in_8bit=True),
        "4bit": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        ),
    }[args.quantization]

    if args.vision_model:
        vision_model, image_processor = args.vision_model, AutoImageProcessor.from_pretrained(args.vision_model)
    else:
        vision_model = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=30,
                patch_size=6,
            )
        )
        image_processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})

    if args.language_model:
        tokenizer = AutoTokenizer.from_pretrained(args.language_model)
        processor = FlamingoProcessor(image_processor, tokenizer)
        language_model = args.language_model
    else:
        processor = FlamingoProcessor(image_processor, tiny_tokenizer(samples))
        language_model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(processor.tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                max_position_embeddings=256,
                tie_word_embeddings=False,
            )
        )
        if quantization_config is not None:  # quantization happens while loading: go through a directory
            directory = tempfile.mkdtemp(prefix="tiny-lm-")
            language_model.save_pretrained(directory)
            language_model = directory

    # OpenFlamingo's bridge sizes (perceiver depth 6, 64 latents, 8 heads of 64) unless the backbones are tiny.
    bridge_sizes = (
        {}
        if args.language_model
        else dict(
            perceiver_depth=1,
            perceiver_num_latents=8,
            perceiver_heads=2,
            perceiver_dim_head=16,
            xattn_heads=2,
            xattn_dim_head=16,
        )
    )
    model = FlamingoForConditionalGeneration.from_backbones(
        vision_model,
        language_model,
        tokenizer=processor.tokenizer,
        dtype=torch.bfloat16 if args.bf16 else None,
        quantization_config=quantization_config,
        cross_attn_every_n_layers=args.cross_attn_every_n_layers,
        **bridge_sizes,
    )
    if args.lora_r > 0:
        from peft import get_peft_model

        from hf_flamingo import flamingo_lora_config

        model = get_peft_model(model, flamingo_lora_config(model, r=args.lora_r, lora_alpha=2 * args.lora_r))
    return model, processor


def save_trainable_state(model: torch.nn.Module, prefix: str, rank: int) -> None:
    from safetensors.torch import save_file

    state = {name: p.detach().float().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
    save_file(state, f"{prefix}-rank{rank}.safetensors")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_seed(args.seed)  # every rank builds the same model and data
    samples = synthetic_dataset(args.num_samples, image_size=64, seed=args.seed)
    model, processor = build(args, samples)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        warmup_steps=min(10, args.max_steps // 10),
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=args.bf16,
        activation_checkpointing=args.gradient_checkpointing,
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        remove_unused_columns=False,  # the collator needs the raw `text` and `images` columns
        ddp_find_unused_parameters=False,  # every trainable parameter is used at every step
        dataloader_num_workers=0,
        # Without an accelerator, accelerate runs multi-process training on CPU (gloo) only when asked for the CPU.
        use_cpu=not torch.accelerator.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=samples,
        data_collator=FlamingoDataCollator(processor, max_length=args.max_length),
    )
    trainer.train()

    if args.save_trainable_state:
        save_trainable_state(trainer.model, args.save_trainable_state, trainer.args.process_index)
    trainer.save_model(args.output_dir)  # the full model, or the adapter + bridge with --lora-r
    if trainer.is_world_process_zero():
        processor.save_pretrained(args.output_dir)
        print(f"Saved to {os.path.abspath(args.output_dir)}")


if __name__ == "__main__":
    main()
