"""The `hf-flamingo` command line: `convert`, `generate`, `eval` and `env`.

    hf-flamingo convert --release OpenFlamingo-3B-vitl-mpt1b --output-dir of-3b
    hf-flamingo generate of-3b --image dog.jpg --caption "A dog." --query-image cat.jpg [--stream]
    hf-flamingo eval of-3b --task coco --karpathy-json dataset_coco.json --image-dir coco --shots 0 4 --output coco.json
    hf-flamingo env [--json]

This package holds only the argument parsing and imports nothing but the standard library, so that `--help`,
`--version` and usage errors answer without importing torch or transformers; `hf_flamingo` (which registers its
classes with transformers' Auto classes on import) and the command handlers in `hf_flamingo.cli` are imported only
when a command runs. `env` does not import `hf_flamingo` at all, so it also reports on a broken installation.

Errors in the input (missing files, unreadable images, bad JSONL, a task's missing paths, a directory that is not a
Flamingo model, a device this machine does not have, an `--output` that cannot be written) are reported on stderr as
one line `hf-flamingo <command>: error: ...` with exit code 1 (argparse's usage and the same one-line format, exit
code 2, for command-line usage errors such as `--num-beams 0`), without a traceback. Inputs are checked before any
model is loaded: numbers when the command line is parsed, files, devices and the model directory's `config.json` right
after, and (`eval`) the data set files and the size of the demonstration pool before the model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib import metadata

PROG = "hf-flamingo"
DISTRIBUTION = "hf_flamingo"

EVAL_TASKS = ("coco", "flickr30k", "vqav2", "ok_vqa", "vizwiz", "textvqa", "imagenet", "hateful_memes")
"""The names `eval --task` accepts: `hf_flamingo.evaluation.tasks.TASK_CLASSES`, written out so that parsing the
command line does not import the evaluation code (a test keeps the two equal)."""

EVAL_PATH_FLAGS = {
    "karpathy_json": "Karpathy split file (dataset_coco.json / dataset_flickr30k.json) [coco, flickr30k].",
    "references_json": "COCO-format reference captions to score CIDEr against (default: the Karpathy sentences).",
    "image_dir": "Image folder [coco: the folder with train2014/ and val2014/; flickr30k; hateful_memes].",
    "train_questions": "Training questions json [VQA tasks].",
    "train_annotations": "Training annotations json [VQA tasks], or training jsonl [hateful_memes].",
    "train_image_dir": "Training image folder [VQA tasks; vqav2/ok_vqa: .../train2014].",
    "test_questions": "Test questions json [VQA tasks].",
    "test_annotations": "Test annotations json [VQA tasks], or test jsonl [hateful_memes].",
    "test_image_dir": "Test image folder [VQA tasks; vqav2/ok_vqa: .../val2014] (default: the training one).",
    "imagenet_root": "Folder with train/ and val/ class folders [imagenet].",
    "class_names_file": "Class names, one per line in sorted folder order [imagenet] (default: the folder names).",
}
"""`eval`'s data set paths: `EvaluationConfig` field -> help text (the flag is the field with dashes)."""

GENERATE_NUM_BEAMS = 3
"""`generate --num-beams` without `--stream` (OpenFlamingo's captioning default); `--stream` decodes greedily."""

COMMANDS = {
    "convert": "Convert an OpenFlamingo v2 checkpoint.pt into a Transformers directory.",
    "generate": "Caption an image from few-shot examples (OpenFlamingo's captioning prompt).",
    "eval": "Run one of OpenFlamingo's few-shot benchmarks on local dataset files.",
    "env": "Print the versions of the stack and the devices this machine has (for bug reports).",
}

USER_ERRORS: tuple[type[BaseException], ...] = (ImportError, LookupError, ValueError, OSError)
"""Exceptions reported as one line with exit code 1 (with `CommandLineError`); anything else is a bug and keeps
its traceback. The evaluation code's `DatasetFormatError` and `UnreadableImageError` are `ValueError`s."""

__all__ = ["COMMANDS", "EVAL_TASKS", "PROG", "CommandLineError", "build_parser", "main", "version"]


class CommandLineError(Exception):
    """A user error the command line reports in one line (exit code 1)."""


def version() -> str:
    """The installed `hf_flamingo` distribution's version, from its metadata (no import of the package)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def flag(field_name: str) -> str:
    """The command-line flag of an `EvaluationConfig` field: `train_questions` -> `--train-questions`."""
    return "--" + field_name.replace("_", "-")


# --------------------------------------------------------------------------------------------------------------------
# Argument types (argparse reports their errors as usage errors, exit code 2)


def _integer(text: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        value = _integer(text, f"an integer >= {minimum}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _num_samples(text: str) -> int:
    """An argparse type: -1 (all test examples) or an integer >= 1."""
    value = _integer(text, "an integer >= 1, or -1 for all")
    if value < 1 and value != -1:
        raise argparse.ArgumentTypeError(f"must be >= 1, or -1 for all test examples, got {value}")
    return value


def _device(text: str) -> str:
    """An argparse type: a string `torch.device` accepts (whether this machine has it is checked later).

    Imports torch, which argparse only does once `--help` is out of the way: it converts a value when it meets it
    and a string default after every argument was read.
    """
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device; expected e.g. cpu, cuda, cuda:1 or mps"
        ) from None
    return text


# --------------------------------------------------------------------------------------------------------------------
# Parsers


def _add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu).")
    parser.add_argument(
        "--no-cpu-fast-path",
        action="store_true",
        help="On CPU, keep PyTorch's default kernels (by default float32 inference products run on oneDNN, "
        "`hf_flamingo.cpu_fast_path`).",
    )


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Directory (or Hub id) of a saved Flamingo model and processor.")
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="An example image; repeat it, once per --caption, in the same order.",
    )
    parser.add_argument(
        "--caption", action="append", default=[], metavar="TEXT", help="The caption of the matching --image."
    )
    parser.add_argument(
        "--examples",
        metavar="JSONL",
        help='Examples as JSON lines {"image": path, "text": caption}; relative paths are read from the file\'s folder. '
        "Used before any --image/--caption pairs.",
    )
    parser.add_argument("--query-image", required=True, metavar="PATH", help="The image to caption.")
    parser.add_argument(
        "--max-new-tokens", type=_at_least(1), default=20, help="Generation length (default 20, as OpenFlamingo)."
    )
    parser.add_argument(
        "--num-beams",
        type=_at_least(1),
        help=f"Beam-search width (default {GENERATE_NUM_BEAMS}, as OpenFlamingo; 1 with --stream).",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="Print the caption while it is generated (transformers' TextStreamer; greedy decoding, so not with "
        "--num-beams > 1). The streamed text is exactly the caption printed without --stream at --num-beams 1.",
    )
    _add_device_arguments(parser)
    parser.add_argument("--show-prompt", action="store_true", help="Also print the prompt (to stderr).")


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Directory (or Hub id) of a saved Flamingo model and processor.")
    parser.add_argument("--task", required=True, choices=EVAL_TASKS, help="The benchmark.")
    parser.add_argument(
        "--shots",
        type=_at_least(0),
        nargs="+",
        default=[0, 4, 8, 16, 32],
        help="Numbers of shots, each at most once (default 0 4 8 16 32).",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[42], help="One trial per seed, each at most once (default 42)."
    )
    parser.add_argument(
        "--num-samples", type=_num_samples, default=-1, help="Test examples per trial, >= 1 (default -1: all)."
    )
    parser.add_argument("--batch-size", type=_at_least(1), default=8, help="Prompts per batch (default 8).")
    parser.add_argument(
        "--query-set-size", type=_at_least(1), default=2048, help="Random-demonstration pool (default 2048)."
    )
    parser.add_argument("--rices", action="store_true", help="Choose demonstrations by RICES instead of at random.")
    parser.add_argument("--rices-cache-dir", help="Folder for cached RICES features.")
    parser.add_argument(
        "--rices-vision-model",
        metavar="PATH",
        help="A CLIP model (directory or Hub id) whose projected image embeddings RICES uses (OpenFlamingo: "
        "openai/clip-vit-large-patch14); default: the Flamingo's own vision tower.",
    )
    parser.add_argument("--precision", choices=["fp32", "amp_bf16"], default="fp32", help="Numerics (default fp32).")
    parser.add_argument("--max-new-tokens", type=_at_least(1), help="Override the task's generation length.")
    parser.add_argument("--num-beams", type=_at_least(1), default=3, help="Beams (default 3).")
    parser.add_argument("--no-ok-vqa-stemming", action="store_true", help="Do not stem OK-VQA predictions.")
    parser.add_argument(
        "--classification-prompt-ensembling",
        action="store_true",
        help="Average class scores over up to 6 orders of the demonstrations [imagenet, hateful_memes].",
    )
    _add_device_arguments(parser)
    parser.add_argument(
        "--output",
        metavar="JSON",
        help="Write the results (with the full configuration) to this file, replacing it if it exists; missing "
        "parent folders are created. Checked to be writable before the model is loaded.",
    )
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")
    paths = parser.add_argument_group("dataset paths")
    for name, help_text in EVAL_PATH_FLAGS.items():
        paths.add_argument(flag(name), dest=name, metavar="PATH", help=help_text)


def _add_env_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Print the report as one JSON object.")


def _build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's parser (`convert` takes its options from the converter's parser)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Flamingo models, native to Hugging Face transformers.")
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subparsers = {"convert": commands.add_parser("convert", help=COMMANDS["convert"], add_help=False)}
    for name, add_arguments in (
        ("generate", _add_generate_arguments),
        ("eval", _add_eval_arguments),
        ("env", _add_env_arguments),
    ):
        subparsers[name] = commands.add_parser(name, help=COMMANDS[name], description=COMMANDS[name])
        add_arguments(subparsers[name])
    return parser, subparsers


def build_parser() -> argparse.ArgumentParser:
    """The top-level `hf-flamingo` parser (standard library only)."""
    return _build_parsers()[0]


def _check_generate_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Combinations of `generate` options (usage errors, exit code 2); sets the default `--num-beams`."""
    if args.stream and args.num_beams is not None and args.num_beams > 1:
        parser.error(
            f"argument --stream: streaming needs greedy decoding (--num-beams 1), got --num-beams {args.num_beams}; "
            "transformers' streamers follow one sequence, not a beam search"
        )
    if args.num_beams is None:
        args.num_beams = 1 if args.stream else GENERATE_NUM_BEAMS


# --------------------------------------------------------------------------------------------------------------------
# Entry point


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "convert":  # the converter's own parser, under this program's name
        from hf_flamingo import cli

        return cli.run_convert(argv[1:])
    parser, subparsers = _build_parsers()
    args = parser.parse_args(argv)
    if args.command == "env":
        from .env import print_report

        return print_report(as_json=args.json)
    if args.command == "generate":
        _check_generate_arguments(args, subparsers["generate"])
    from hf_flamingo import cli

    return cli.run_command(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code (argparse's `--help`, `--version` and usage errors exit).

    Args:
        argv (`Sequence[str]`, *optional*): The arguments (default: `sys.argv[1:]`).

    Returns:
        `int`: 0 on success, 1 for bad input (one `hf-flamingo <command>: error: ...` line on stderr), 2 for usage
        errors.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        return _run(argv)
    except (CommandLineError, *USER_ERRORS) as error:
        print(f"{PROG} {command}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {command}: interrupted", file=sys.stderr)
        return 130
