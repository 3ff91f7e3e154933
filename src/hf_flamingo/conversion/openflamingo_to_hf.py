"""End-to-end OpenFlamingo -> Hub conversion: checkpoint + backbones + tokenizer in, a loadable directory out.

Command line: `python conversion/convert_openflamingo_to_hf.py --help` (or `hf-flamingo convert --help`).

The command line checks its input before any conversion work: a missing checkpoint or backbone directory, an existing
`--output-dir` (without `--overwrite`), an output location that cannot be written, a bad `--max-shard-size` or
`--cross-attn-every-n-layers` are reported in one line (exit code 1; 2 for usage errors). The output is written
atomically (`writing.write_directory_atomically`): an interrupted conversion leaves no output, and the partial
directory of a killed one is removed by the next conversion into the same `--output-dir`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from ..configuration_flamingo import FlamingoConfig
from ..generation_flamingo import with_flamingo_stop_tokens
from ..language_model_hooks import find_decoder_layers
from ..model_card import build_model_card
from ..modeling_flamingo import FlamingoForConditionalGeneration
from ..processing_flamingo import FlamingoProcessor
from .open_clip import open_clip_image_processor
from .openflamingo import (
    CheckpointError,
    ConversionReport,
    check_checkpoint_against_release,
    infer_cross_attn_every_n_layers,
    load_openflamingo_checkpoint,
    load_openflamingo_weights,
    map_openflamingo_state_dict,
)
from .releases import OPENFLAMINGO_RELEASES, OpenFlamingoRelease, get_release
from .writing import (
    check_output_dir,
    push_directory_to_hub,
    remove_stale_partial_dirs,
    write_directory_atomically,
)

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_checkpoint(checkpoint: str | os.PathLike | None, release: OpenFlamingoRelease | None) -> Path:
    """A local checkpoint path: `checkpoint` itself if it exists, else `checkpoint.pt` of a Hub repo (the release's
    repository when `checkpoint` is `None`), downloaded through `huggingface_hub`.

    Raises:
        FileNotFoundError: if the path does not exist and it cannot be a Hub repo id, or the download fails (e.g.
            offline).
    """
    if checkpoint is not None and Path(checkpoint).exists():
        return Path(checkpoint)
    repo_id = str(checkpoint) if checkpoint is not None else (release.repo_id if release is not None else None)
    if repo_id is None:
        raise FileNotFoundError("No checkpoint given: pass a `checkpoint.pt` path, a Hub repo id or a release name.")
    looks_like_repo = repo_id.count("/") == 1 and not repo_id.endswith((".pt", ".bin", ".safetensors"))
    if not looks_like_repo:
        raise FileNotFoundError(f"Checkpoint {repo_id!r} does not exist.")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "checkpoint.pt"))
    except Exception as error:  # offline mode, missing repo, network: all end the conversion with the same advice
        raise FileNotFoundError(
            f"Could not download `checkpoint.pt` from the Hub repository {repo_id!r} ({type(error).__name__}: "
            f"{error}). Pass a local checkpoint path to convert offline."
        ) from error


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _check_local_source(value: Any, what: str) -> None:
    """A clear error for a backbone given as a local path that does not exist (instead of a failed Hub lookup)."""
    if isinstance(value, (str, os.PathLike)) and not Path(value).exists():
        text = os.fspath(value)
        if isinstance(value, os.PathLike) or not _HUB_ID.match(text):
            raise FileNotFoundError(f"The {what} directory {text!r} does not exist.")


def convert_openflamingo_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    *,
    release: str | OpenFlamingoRelease | None = None,
    vision_model: str | os.PathLike | PreTrainedModel | None = None,
    language_model: str | os.PathLike | PreTrainedModel | None = None,
    tokenizer: str | os.PathLike | Any | None = None,
    cross_attn_every_n_layers: int | None = None,
    dtype: torch.dtype | str | None = None,
    language_model_kwargs: dict[str, Any] | None = None,
) -> tuple[FlamingoForConditionalGeneration, FlamingoProcessor, ConversionReport]:
    """Converts an OpenFlamingo checkpoint into a [`FlamingoForConditionalGeneration`] and its processor.

    Args:
        checkpoint: A `checkpoint.pt` path, a Hub repo id holding one, an already loaded state dict, or `None` for the
            release's own repository.
        release (`str` or `OpenFlamingoRelease`, *optional*): A release name (see `OPENFLAMINGO_RELEASES`): supplies
            the default backbones and interval, and the checkpoint is checked against it (keys, shapes, interval,
            special-token ids) before any backbone is loaded.
        vision_model: Hub id, local directory or model of the vision tower (default: the release's).
        language_model: Hub id, local directory or model of the language model (default: the release's).
        tokenizer: Hub id, local directory or tokenizer (default: the language model's).
        cross_attn_every_n_layers (`int`, *optional*): Without a release, the expected interval (default: inferred
            from the checkpoint).
        dtype (`torch.dtype` or `str`, *optional*): dtype of the returned model (default float32).
        language_model_kwargs (`dict`, *optional*): Extra `from_pretrained` arguments for the language model.

    Returns:
        `(model, processor, report)`.

    Raises:
        CheckpointError: if the checkpoint is unreadable or does not fit the release / backbones.
        FileNotFoundError: for missing local files.
        ValueError: for inconsistent arguments.
    """
    if isinstance(release, str):
        release = get_release(release)
    if release is None and (vision_model is None or language_model is None):
        raise ValueError(
            "Pass either `release` (one of: " + ", ".join(OPENFLAMINGO_RELEASES) + ") or both `vision_model` and "
            "`language_model`."
        )
    if release is not None and cross_attn_every_n_layers not in (None, release.cross_attn_every_n_layers):
        raise ValueError(
            f"{release.name} has cross-attention every {release.cross_attn_every_n_layers} layers; "
            f"`cross_attn_every_n_layers={cross_attn_every_n_layers}` contradicts it."
        )
    vision_model = vision_model if vision_model is not None else release.vision_model
    lm_kwargs = dict(language_model_kwargs or {})
    if language_model is None:
        language_model = release.language_model
        if release.language_model_revision is not None:
            lm_kwargs.setdefault("revision", release.language_model_revision)
    tokenizer = tokenizer if tokenizer is not None else language_model
    if isinstance(tokenizer, PreTrainedModel):
        raise ValueError("Pass `tokenizer` explicitly when `language_model` is a model instance.")
    _check_local_source(vision_model, "vision model")
    _check_local_source(language_model, "language model")
    _check_local_source(tokenizer, "tokenizer")

    if isinstance(checkpoint, Mapping):
        state_dict = dict(checkpoint)
    else:
        state_dict = load_openflamingo_checkpoint(resolve_checkpoint(checkpoint, release))
    if release is not None:
        check_checkpoint_against_release(state_dict, release)

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    # The processor adds `<|endofchunk|>`, `<image>` (and `<PAD>` without a pad token) in OpenFlamingo's order.
    processor = FlamingoProcessor(image_processor=open_clip_image_processor(224), tokenizer=tokenizer)
    model = _build_model(
        vision_model, language_model, processor.tokenizer, state_dict, cross_attn_every_n_layers, lm_kwargs
    )
    processor.image_processor = open_clip_image_processor(model.config.vision_config.image_size)
    if release is not None:
        # The vocabulary size (hence `<PAD>`) is enforced by the embedding shapes; the two Flamingo tokens by id.
        found = {"<|endofchunk|>": processor.eoc_token_id, "<image>": processor.media_token_id}
        if any(release.special_token_ids[token] != token_id for token, token_id in found.items()):
            raise CheckpointError(
                f"The tokenizer gives the special tokens ids {found}, but {release.name} was trained with "
                f"{release.special_token_ids}: use the release's tokenizer."
            )

    report = load_openflamingo_weights(model, state_dict)
    model.generation_config = with_flamingo_stop_tokens(
        GenerationConfig(eos_token_id=processor.tokenizer.eos_token_id, bos_token_id=processor.tokenizer.bos_token_id),
        model.config.eoc_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    if dtype is not None:
        model = model.to(_DTYPES[dtype] if isinstance(dtype, str) else dtype)
    return model.eval(), processor, report


def _build_model(
    vision_model: Any,
    language_model: Any,
    tokenizer: Any,
    state_dict: Mapping[str, torch.Tensor],
    cross_attn_every_n_layers: int | None,
    language_model_kwargs: dict[str, Any],
) -> FlamingoForConditionalGeneration:
    if isinstance(language_model, (str, os.PathLike)):
        language_model = AutoModelForCausalLM.from_pretrained(
            language_model, dtype=torch.float32, **language_model_kwargs
        )
    num_layers = FlamingoConfig(text_config=language_model.config).num_text_layers
    layers_path, _ = find_decoder_layers(language_model, num_layers)
    weights = map_openflamingo_state_dict(state_dict, layers_path, num_layers)
    n = infer_cross_attn_every_n_layers(weights.cross_attention_layers, num_layers)
    if cross_attn_every_n_layers is not None and n != cross_attn_every_n_layers:
        raise CheckpointError(
            f"The checkpoint has gated cross-attention every {n} layers (before layers "
            f"{weights.cross_attention_layers}), not every {cross_attn_every_n_layers}."
        )
    # `tokenizer` already holds OpenFlamingo's special tokens (added by the processor); `from_backbones` resizes the
    # embeddings to it, as OpenFlamingo's factory does.
    return FlamingoForConditionalGeneration.from_backbones(
        vision_model,
        language_model,
        tokenizer=tokenizer,
        dtype=torch.float32,
        cross_attn_every_n_layers=n,
        vision_feature_select_strategy="default",
    )


def model_card(
    model: FlamingoForConditionalGeneration,
    report: ConversionReport,
    *,
    release: OpenFlamingoRelease | None,
    vision_model: str,
    language_model: str,
    repo_id: str | None = None,
) -> str:
    """A model card (`README.md`) for a converted directory, built by [`hf_flamingo.model_card.build_model_card`]
    with the conversion's facts (source, release notes, weights taken from the checkpoint and the backbones)."""
    name = release.name if release is not None else "an OpenFlamingo checkpoint"
    source = (
        f"[`{release.repo_id}`](https://huggingface.co/{release.repo_id})" if release is not None else "a local file"
    )
    notes = f"\n\n{release.model_card_notes}" if release is not None and release.model_card_notes else ""
    card = build_model_card(
        model,
        repo_id=repo_id,
        title=f"{name} (Transformers-native)",
        description=f"{name} converted from {source} into `hf_flamingo`'s `FlamingoForConditionalGeneration`: "
        f"loads with `from_pretrained`, no OpenFlamingo, open_clip or einops needed.{notes}",
        vision_model=vision_model,
        language_model=language_model,
        license="mit",
        tags=["openflamingo"],
        training_data=_OPENFLAMINGO_TRAINING_DATA,
        extra_details=[
            f"Conversion: {len(report.loaded_keys)} weights from the checkpoint ({report.checkpoint_keys} keys, of "
            f"which {len(report.dropped_aliases)} duplicate aliases and {len(report.dropped_buffers)} obsolete "
            f"buffers were dropped); {len(report.backbone_keys)} frozen backbone weights from the backbones."
        ],
        notes="OpenFlamingo evaluated with bf16 autocast over fp32 weights; fp32 reproduces the original model to "
        "within float rounding.",
    )
    return str(card)


_OPENFLAMINGO_TRAINING_DATA = (
    "OpenFlamingo v2 trained the Perceiver Resampler and the cross-attention blocks on image-text pairs from "
    "LAION-2B and interleaved image-text documents from Multimodal C4 (see the OpenFlamingo technical report, "
    "arXiv:2308.01390); the vision encoder and the language model stayed frozen."
)


def save_converted_model(
    model: FlamingoForConditionalGeneration,
    processor: FlamingoProcessor,
    output_dir: str | os.PathLike,
    *,
    card: str,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Writes model, processor, generation config and model card (`card`, the model's `README.md`) into `output_dir`,
    atomically."""

    def write(directory: Path) -> None:
        model.save_pretrained(directory, max_shard_size=max_shard_size, model_card=card)
        processor.save_pretrained(directory)

    return write_directory_atomically(output_dir, write, overwrite=overwrite)


def push_converted_model(
    output_dir: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None
):
    """Uploads a converted directory to the Hub (creating the repository if needed)."""
    return push_directory_to_hub(
        output_dir,
        repo_id,
        commit_message="Convert OpenFlamingo checkpoint with hf_flamingo",
        private=private,
        token=token,
    )


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]B)", re.IGNORECASE)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _shard_size(text: str) -> str | int:
    """argparse type: a size in bytes, or with a unit as `save_pretrained` takes it (`"500MB"`, `"5GB"`)."""
    if text.isdigit() and int(text) > 0:
        return int(text)
    match = _SIZE.fullmatch(text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a positive size such as 500MB or 5GB (units KB, MB, GB, TB), got {text!r}"
        )
    return text.strip().upper()


def build_parser() -> argparse.ArgumentParser:
    """The `convert` command line."""
    parser = argparse.ArgumentParser(
        prog="convert_openflamingo_to_hf",
        description="Convert an OpenFlamingo v2 checkpoint.pt into a Transformers directory loadable with "
        "AutoModelForImageTextToText.from_pretrained (no OpenFlamingo, open_clip or remote code needed). The output "
        "is written atomically: an interrupted conversion leaves no --output-dir, and a hidden "
        ".<output-dir>.<pid>-<hex>.partial directory left by a killed one is removed by the next conversion into the "
        "same --output-dir.",
    )
    parser.add_argument(
        "--checkpoint",
        help="Path of checkpoint.pt (or a Hub repo id holding one). Default: the release's Hub repository.",
    )
    parser.add_argument(
        "--release",
        choices=sorted(OPENFLAMINGO_RELEASES),
        help="The release the checkpoint belongs to: sets the backbones and checks the checkpoint against it.",
    )
    parser.add_argument("--vision-model", help="Hub id or local directory of the vision tower (a CLIP model).")
    parser.add_argument("--language-model", help="Hub id or local directory of the language model.")
    parser.add_argument(
        "--tokenizer", help="Hub id or local directory of the tokenizer (default: the language model)."
    )
    parser.add_argument(
        "--cross-attn-every-n-layers",
        type=_positive_int,
        help="Without --release: the interval of the cross-attention layers (default: inferred from the checkpoint).",
    )
    parser.add_argument("--output-dir", required=True, help="Directory to write (must not exist unless --overwrite).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="dtype of the saved weights.")
    parser.add_argument(
        "--max-shard-size", type=_shard_size, default="5GB", help="Largest safetensors shard (default 5GB)."
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="Also upload the directory to this Hub repository.")
    parser.add_argument("--private", action="store_true", help="With --push-to-hub: create a private repository.")
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Runs the converter; returns the process exit code.

    Args:
        argv (`Sequence[str]`, *optional*): The arguments (default: `sys.argv[1:]`).
        prog (`str`, *optional*): The program name in usage and error messages (`hf-flamingo convert` when run
            through the `hf-flamingo` command).

    Returns:
        `int`: 0 on success, 1 for bad input (one `<prog>: error: ...` line on stderr), 2 for usage errors.
    """
    parser = build_parser()
    if prog is not None:
        parser.prog = prog
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.release is None and (args.vision_model is None or args.language_model is None):
        parser.error("pass --release, or both --vision-model and --language-model")
    if args.release is None and args.checkpoint is None:
        parser.error("pass --checkpoint (there is no release to take it from)")
    try:
        output_dir = check_output_dir(args.output_dir, args.overwrite)
    except FileExistsError as error:
        parser.error(str(error))
    except OSError as error:
        print(f"{parser.prog}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    remove_stale_partial_dirs(output_dir)
    try:
        written, report = _convert_and_save(args, output_dir)
    except (CheckpointError, OSError, ValueError) as error:
        print(f"{parser.prog}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    print(
        f"Wrote {written}: {len(report.loaded_keys)} weights from the checkpoint, {len(report.backbone_keys)} from "
        f"the backbones, cross-attention every {report.cross_attn_every_n_layers} layers."
    )
    if args.push_to_hub:
        try:
            push_converted_model(written, args.push_to_hub, private=args.private)
        except OSError as error:  # huggingface_hub's HTTP errors are OSErrors
            print(f"{parser.prog}: error: wrote {written} but the upload failed: {_one_line(error)}", file=sys.stderr)
            return 1
        print(f"Uploaded to https://huggingface.co/{args.push_to_hub}")
    return 0


def _convert_and_save(args: argparse.Namespace, output_dir: Path) -> tuple[Path, ConversionReport]:
    """The conversion behind `main`: converts, writes the model card and saves into `output_dir`."""
    release = get_release(args.release) if args.release else None
    model, processor, report = convert_openflamingo_checkpoint(
        args.checkpoint,
        release=release,
        vision_model=args.vision_model,
        language_model=args.language_model,
        tokenizer=args.tokenizer,
        cross_attn_every_n_layers=args.cross_attn_every_n_layers,
        dtype=args.dtype,
    )
    card = model_card(
        model,
        report,
        release=release,
        vision_model=str(args.vision_model or release.vision_model),
        language_model=str(args.language_model or release.language_model),
        repo_id=args.push_to_hub,
    )
    written = save_converted_model(
        model, processor, output_dir, card=card, overwrite=args.overwrite, max_shard_size=args.max_shard_size
    )
    return written, report


__all__ = [
    "build_parser",
    "convert_openflamingo_checkpoint",
    "main",
    "model_card",
    "push_converted_model",
    "resolve_checkpoint",
    "save_converted_model",
]
