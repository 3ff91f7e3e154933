"""The `hf-flamingo` command line: `convert`, `generate` and `eval`.

    hf-flamingo convert --release OpenFlamingo-3B-vitl-mpt1b --output-dir of-3b
    hf-flamingo generate of-3b --image dog.jpg --caption "A dog." --query-image cat.jpg
    hf-flamingo eval of-3b --task coco --karpathy-json dataset_coco.json --image-dir coco --shots 0 4 --output coco.json

Errors in the input (missing files, unreadable images, bad JSONL, a task's missing paths) are reported on stderr as
`hf-flamingo <command>: error: ...` with exit code 1 (2 for command-line usage errors), without a traceback. Inputs
are checked before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

PROG = "hf-flamingo"

__all__ = ["CommandLineError", "build_parser", "main"]


class CommandLineError(Exception):
    """A user error the command line reports in one line (exit code 1)."""


# --------------------------------------------------------------------------------------------------------------------
# Parsers


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
        "--max-new-tokens", type=int, default=20, help="Generation length (default 20, as OpenFlamingo)."
    )
    parser.add_argument("--num-beams", type=int, default=3, help="Beam-search width (default 3, as OpenFlamingo).")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu).")
    parser.add_argument(
        "--no-cpu-fast-path",
        action="store_true",
        help="On CPU, keep PyTorch's default kernels (by default float32 inference products run on oneDNN, "
        "`hf_flamingo.cpu_fast_path`).",
    )
    parser.add_argument("--show-prompt", action="store_true", help="Also print the prompt (to stderr).")


_EVAL_PATH_FLAGS = {
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


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from .evaluation.runner import TASKS  # light: no torch model is loaded

    parser.add_argument("model", help="Directory (or Hub id) of a saved Flamingo model and processor.")
    parser.add_argument("--task", required=True, choices=TASKS, help="The benchmark.")
    parser.add_argument(
        "--shots", type=int, nargs="+", default=[0, 4, 8, 16, 32], help="Numbers of shots (default 0 4 8 16 32)."
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="One trial per seed (default 42).")
    parser.add_argument("--num-samples", type=int, default=-1, help="Test examples per trial (default: all).")
    parser.add_argument("--batch-size", type=int, default=8, help="Prompts per batch (default 8).")
    parser.add_argument("--query-set-size", type=int, default=2048, help="Random-demonstration pool (default 2048).")
    parser.add_argument("--rices", action="store_true", help="Choose demonstrations by RICES instead of at random.")
    parser.add_argument("--rices-cache-dir", help="Folder for cached RICES features.")
    parser.add_argument(
        "--rices-vision-model",
        metavar="PATH",
        help="A CLIP model (directory or Hub id) whose projected image embeddings RICES uses (OpenFlamingo: "
        "openai/clip-vit-large-patch14); default: the Flamingo's own vision tower.",
    )
    parser.add_argument("--precision", choices=["fp32", "amp_bf16"], default="fp32", help="Numerics (default fp32).")
    parser.add_argument("--max-new-tokens", type=int, help="Override the task's generation length.")
    parser.add_argument("--num-beams", type=int, default=3, help="Beams (default 3).")
    parser.add_argument("--no-ok-vqa-stemming", action="store_true", help="Do not stem OK-VQA predictions.")
    parser.add_argument(
        "--classification-prompt-ensembling",
        action="store_true",
        help="Average class scores over up to 6 orders of the demonstrations [imagenet, hateful_memes].",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu).")
    parser.add_argument(
        "--no-cpu-fast-path",
        action="store_true",
        help="On CPU, keep PyTorch's default kernels (by default float32 inference products run on oneDNN, "
        "`hf_flamingo.cpu_fast_path`).",
    )
    parser.add_argument("--output", metavar="JSON", help="Write the results (with the full configuration) here.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")
    paths = parser.add_argument_group("dataset paths")
    for name, help_text in _EVAL_PATH_FLAGS.items():
        paths.add_argument(_flag(name), dest=name, metavar="PATH", help=help_text)


_COMMANDS = {
    "convert": "Convert an OpenFlamingo v2 checkpoint.pt into a Transformers directory.",
    "generate": "Caption an image from few-shot examples (OpenFlamingo's captioning prompt).",
    "eval": "Run one of OpenFlamingo's few-shot benchmarks on local dataset files.",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser. `convert` takes its options from the converter's own parser."""
    parser = argparse.ArgumentParser(prog=PROG, description="Flamingo models, native to Hugging Face transformers.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in _COMMANDS.items():
        if name == "convert":
            commands.add_parser(name, help=help_text, add_help=False)
    _add_generate_arguments(
        commands.add_parser("generate", help=_COMMANDS["generate"], description=_COMMANDS["generate"])
    )
    _add_eval_arguments(commands.add_parser("eval", help=_COMMANDS["eval"], description=_COMMANDS["eval"]))
    return parser


# --------------------------------------------------------------------------------------------------------------------
# Commands


def _existing_file(path: str, what: str) -> Path:
    resolved = Path(path)
    if not resolved.is_file():
        raise CommandLineError(f"{what} not found: {path}")
    return resolved


def _model_source(model: str) -> str:
    if Path(model).exists() and not Path(model).is_dir():
        raise CommandLineError(f"model must be a directory (or Hub id), got the file {model}")
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or Path(model).exists()
    if looks_local and not Path(model).is_dir():
        raise CommandLineError(f"model directory not found: {model}")
    return model


def _read_examples_jsonl(path: Path) -> list[tuple[Path, str]]:
    examples = []
    with path.open(encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CommandLineError(f"{path}, line {line_number}: not valid JSON ({error.msg})") from error
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise CommandLineError(f'{path}, line {line_number}: expected {{"image": path, "text": caption}}')
            if not isinstance(record.get("text"), str):
                raise CommandLineError(f'{path}, line {line_number}: missing "text" (the caption)')
            image = Path(record["image"])
            examples.append((image if image.is_absolute() else path.parent / image, record["text"]))
    return examples


def _load_model_and_processor(model: str, device: str):
    from transformers import AutoProcessor

    from . import FlamingoForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model)
    flamingo = FlamingoForConditionalGeneration.from_pretrained(model).to(device).eval()
    return flamingo, processor


def _run_generate(args: argparse.Namespace) -> int:
    from .evaluation import prompts
    from .evaluation.datasets import load_image

    model_source = _model_source(args.model)
    examples: list[tuple[Path, str]] = []
    if args.examples is not None:
        examples += _read_examples_jsonl(_existing_file(args.examples, "examples file"))
    if len(args.image) != len(args.caption):
        raise CommandLineError(
            f"got {len(args.image)} --image but {len(args.caption)} --caption; give one caption per image"
        )
    examples += [(Path(image), caption) for image, caption in zip(args.image, args.caption, strict=True)]
    images = [load_image(image) for image, _ in examples] + [load_image(args.query_image)]
    prompt = prompts.build_prompt(
        [prompts.caption_prompt(caption.strip()) for _, caption in examples],
        prompts.caption_prompt(),
        separator="\n",
        num_shots=len(examples) or 1,
    )
    if args.show_prompt:
        print(prompt, file=sys.stderr)
    model, processor = _load_model_and_processor(model_source, args.device)
    from .cpu_kernels import cpu_fast_path
    from .evaluation.inference import generate_batch

    settings = prompts.GenerationSettings(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    with cpu_fast_path(enabled=not args.no_cpu_fast_path):
        output = generate_batch(model, processor, [prompt], [images], settings)[0]
    print(prompts.postprocess_caption(output).strip())
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from .evaluation.runner import EvaluationConfig, evaluate

    model_source = _model_source(args.model)
    paths = {name: getattr(args, name) for name in _EVAL_PATH_FLAGS}
    for name, value in paths.items():
        if value is not None and not Path(value).exists():
            raise CommandLineError(f"{_flag(name)}: not found: {value}")
    try:
        config = EvaluationConfig(
            task=args.task,
            shots=args.shots,
            seeds=args.seeds,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            query_set_size=args.query_set_size,
            rices=args.rices,
            rices_cache_dir=args.rices_cache_dir,
            rices_vision_model=args.rices_vision_model,
            precision=args.precision,
            max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams,
            ok_vqa_stemming=not args.no_ok_vqa_stemming,
            classification_prompt_ensembling=args.classification_prompt_ensembling,
            **paths,
        )
    except ValueError as error:
        message = str(error)
        for name in _EVAL_PATH_FLAGS:
            message = message.replace(name, _flag(name))
        raise CommandLineError(message) from error
    model, processor = _load_model_and_processor(model_source, args.device)
    results = evaluate(
        model,
        processor,
        config,
        output_path=args.output,
        progress=not args.no_progress,
        cpu_fast_path=not args.no_cpu_fast_path,
    )
    for result in results.results:
        trials = ", ".join(f"{score:.2f}" for score in result.trials)
        print(
            f"{results.task} {result.shots}-shot {results.metric}: {result.mean:.2f} "
            f"(std {result.stddev:.2f}; trials {trials})"
        )
    if args.output:
        print(f"Wrote {args.output}")
    return 0


def _run_delegated(name: str, argv: list[str], load: Callable[[], object]) -> int:
    """`convert`: the module's own parser and `main(argv) -> int`, under this program's name."""
    module = load()
    if any(arg in ("-h", "--help") for arg in argv):
        parser = module.build_parser()
        parser.prog = f"{PROG} {name}"
        parser.print_help()
        return 0
    return int(module.main(argv) or 0)


def _load_converter():
    from .conversion import openflamingo_to_hf

    return openflamingo_to_hf


def _user_error_types() -> tuple[type[BaseException], ...]:
    from .evaluation.datasets import DatasetFormatError, UnreadableImageError

    return (CommandLineError, DatasetFormatError, UnreadableImageError, ImportError, LookupError, ValueError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code.

    Args:
        argv (`Sequence[str]`, *optional*): The arguments (default: `sys.argv[1:]`).

    Returns:
        `int`: 0 on success, 1 for bad input, 2 for usage errors.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        if command == "convert":
            return _run_delegated(command, argv[1:], _load_converter)
        args = build_parser().parse_args(argv)
        return _run_generate(args) if args.command == "generate" else _run_eval(args)
    except _user_error_types() as error:
        print(f"{PROG} {command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
