"""Convert the vision tower of an open_clip ViT checkpoint into a Transformers `CLIPVisionModel` directory, with an
image processor reproducing open_clip's evaluation preprocessing: the command line behind
`conversion/convert_open_clip_to_hf.py` (the model-level API is `hf_flamingo.conversion.open_clip`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .writing import check_output_dir, push_directory_to_hub, write_directory_atomically

_DTYPES = ("float32", "float16", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    """The open_clip converter's command line."""
    parser = argparse.ArgumentParser(
        prog="convert_open_clip_to_hf",
        description=(
            "Convert the vision tower of an open_clip ViT checkpoint into a Transformers CLIPVisionModel directory, "
            "with an image processor reproducing open_clip's evaluation preprocessing."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help=(
            "An open_clip state dict saved with torch.save (a training checkpoint with a 'state_dict' entry also "
            "works) or a .safetensors file. It may hold the whole CLIP model ('visual.' keys), an OpenFlamingo model "
            "('vision_encoder.' keys) or the bare visual module; the prefix is detected."
        ),
    )
    parser.add_argument(
        "--model-config",
        required=True,
        help="The open_clip model config: a JSON file path, or (if open_clip is installed) a registered model name.",
    )
    parser.add_argument(
        "--quick-gelu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Use QuickGELU (the OpenAI weights need it). Default: the config's 'quick_gelu' entry, else GELU.",
    )
    parser.add_argument(
        "--with-projection",
        action="store_true",
        help="Write a CLIPVisionModelWithProjection (keeps open_clip's 'proj' as visual_projection).",
    )
    parser.add_argument("--prefix", default=None, help="The prefix of the visual keys (default: detected).")
    parser.add_argument("--dtype", choices=_DTYPES, default="float32", help="The dtype of the saved weights.")
    parser.add_argument(
        "--image-mean",
        type=float,
        nargs=3,
        default=None,
        metavar=("R", "G", "B"),
        help="Normalisation mean of the image processor (default: the OpenAI CLIP statistics).",
    )
    parser.add_argument(
        "--image-std",
        type=float,
        nargs=3,
        default=None,
        metavar=("R", "G", "B"),
        help="Normalisation std of the image processor (default: the OpenAI CLIP statistics).",
    )
    parser.add_argument("--output-dir", required=True, help="The directory to write (must not exist).")
    parser.add_argument("--overwrite", action="store_true", help="Replace --output-dir if it exists.")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="Also upload the directory to this Hub repository.")
    parser.add_argument("--private", action="store_true", help="With --push-to-hub: create a private repository.")
    return parser


def _load_model_config(name_or_path: str) -> dict[str, Any]:
    """Reads a JSON model config, or asks open_clip for a registered one."""
    if os.path.isfile(name_or_path):
        with open(name_or_path, encoding="utf-8") as f:
            return json.load(f)
    if name_or_path.endswith(".json") or os.sep in name_or_path:
        raise FileNotFoundError(f"--model-config {name_or_path!r}: no such file.")
    try:
        import open_clip
    except ImportError as err:
        raise FileNotFoundError(
            f"--model-config {name_or_path!r} is not a file, and open_clip is not installed to look it up by name."
        ) from err
    config = open_clip.get_model_config(name_or_path)
    if config is None:
        raise FileNotFoundError(f"--model-config {name_or_path!r} is neither a file nor an open_clip model name.")
    return config


def _load_state_dict(path: str) -> dict[str, Any]:
    """Loads a .safetensors file or a torch.save'd state dict (unwrapping a training checkpoint's 'state_dict')."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    import pickle

    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} contains objects other than tensors and plain containers, so it was not unpickled (only "
            "`torch.load(weights_only=True)` is used, for safety); an open_clip checkpoint is a dict of tensors."
        ) from error
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(loaded).__name__}).")
    return loaded


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the conversion; returns the process exit code.

    Returns:
        `int`: 0 on success, 1 for bad input (one `convert_open_clip_to_hf: error: ...` line on stderr), 2 for usage
        errors (an existing `--output-dir` without `--overwrite`, a missing `--checkpoint`).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        output_dir = check_output_dir(args.output_dir, args.overwrite)
    except FileExistsError as error:
        parser.error(str(error))
    except OSError as error:  # a parent that is a file, no write permission: checked before any work
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    if not os.path.isfile(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint!r}: no such file.")

    import torch

    from .open_clip import (
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
        clip_vision_config_from_open_clip,
        open_clip_image_processor,
        open_clip_vision_to_hf,
    )

    try:
        model_config = _load_model_config(args.model_config)
        config = clip_vision_config_from_open_clip(model_config, quick_gelu=args.quick_gelu)
        state_dict = _load_state_dict(args.checkpoint)
        model = open_clip_vision_to_hf(
            state_dict,
            model_config,
            quick_gelu=args.quick_gelu,
            with_projection=args.with_projection,
            prefix=args.prefix,
        )
        del state_dict
        model = model.to(getattr(torch, args.dtype))
        image_processor = open_clip_image_processor(
            config.image_size, mean=args.image_mean or OPENAI_CLIP_MEAN, std=args.image_std or OPENAI_CLIP_STD
        )

        def write(directory: Path) -> None:
            model.save_pretrained(directory)
            image_processor.save_pretrained(directory)

        written = write_directory_atomically(output_dir, write, overwrite=args.overwrite)
    except (OSError, ValueError) as error:
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    print(
        f"Wrote {type(model).__name__} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.hidden_act}, {args.dtype}) and CLIPImageProcessorPil ({config.image_size}px) to {written}"
    )
    if args.push_to_hub:
        try:
            push_directory_to_hub(
                written,
                args.push_to_hub,
                commit_message="Convert open_clip ViT with hf_flamingo",
                private=args.private,
            )
        except OSError as error:  # huggingface_hub's HTTP errors are OSErrors
            message = " ".join(str(error).split())
            print(f"{parser.prog}: error: wrote {written} but the upload failed: {message}", file=sys.stderr)
            return 1
        print(f"Uploaded to https://huggingface.co/{args.push_to_hub}")
    return 0


__all__ = ["build_parser", "main"]
