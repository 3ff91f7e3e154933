"""The `hf-flamingo` command line: `convert`, `generate` and `eval`.

    hf-flamingo convert --release OpenFlamingo-3B-vitl-mpt1b --output-dir of-3b
    hf-flamingo generate of-3b --image dog.jpg --caption "A dog." --query-image cat.jpg
    hf-flamingo eval of-3b --task coco --karpathy-json dataset_coco.json --image-dir coco --shots 0 4 --output coco.json

Errors in the input (missing files, unreadable images, bad JSONL, a task's missing paths, a directory that is not a
Flamingo model, a device this machine does not have, an `--output` that cannot be written) are reported on stderr as
one line `hf-flamingo <command>: error: ...` with exit code 1 (2 for command-line usage errors such as
`--num-beams 0`), without a traceback. Inputs are checked before any model is loaded: numbers when the command line is
parsed, files, devices and the model directory's `config.json` right after, and (`eval`) the data set files and the
size of the demonstration pool before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

PROG = "hf-flamingo"

__all__ = ["CommandLineError", "build_parser", "main"]


class CommandLineError(Exception):
    """A user error the command line reports in one line (exit code 1)."""


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
    """An argparse type: a string `torch.device` accepts (whether this machine has it is checked later)."""
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
        "--num-beams", type=_at_least(1), default=3, help="Beam-search width (default 3, as OpenFlamingo)."
    )
    parser.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu).")
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
    parser.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu).")
    parser.add_argument(
        "--no-cpu-fast-path",
        action="store_true",
        help="On CPU, keep PyTorch's default kernels (by default float32 inference products run on oneDNN, "
        "`hf_flamingo.cpu_fast_path`).",
    )
    parser.add_argument(
        "--output",
        metavar="JSON",
        help="Write the results (with the full configuration) to this file, replacing it if it exists; missing "
        "parent folders are created. Checked to be writable before the model is loaded.",
    )
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
    from . import __version__

    parser = argparse.ArgumentParser(prog=PROG, description="Flamingo models, native to Hugging Face transformers.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
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
    """`model`, checked without loading it: a local directory must hold a Flamingo `config.json`; a Hub id must be in
    the local cache when downloads are off (`HF_HUB_OFFLINE=1`), and be a Flamingo if it is cached."""
    path = Path(model)
    if path.exists() and not path.is_dir():
        raise CommandLineError(f"model must be a directory (or Hub id), got the file {model}")
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or path.exists()
    if looks_local and not path.is_dir():
        raise CommandLineError(f"model directory not found: {model}")
    if path.is_dir():
        _check_flamingo_config(path / "config.json", model)
    else:
        _check_hub_model(model)
    return model


def _check_flamingo_config(config_file: Path, model: str) -> None:
    """Reads a model's `config.json` and refuses anything that is not a saved Flamingo."""
    if not config_file.is_file():
        raise CommandLineError(
            f"{model} has no config.json; expected a directory written by FlamingoForConditionalGeneration."
            "save_pretrained (and the processor's save_pretrained)"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CommandLineError(f"{config_file} is not valid JSON ({error})") from error
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "flamingo":
        raise CommandLineError(
            f"{model} is not a Flamingo checkpoint: its config.json has model_type {model_type!r} (expected "
            "'flamingo'); convert it or build one with FlamingoForConditionalGeneration.from_backbones"
        )


def _check_hub_model(model: str) -> None:
    """A Hub id, checked in the local cache only (no network): refused if it is not a Flamingo, or if it is missing
    while downloads are off."""
    import huggingface_hub.constants
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(model, "config.json")
    except HFValidationError:
        raise CommandLineError(f"model {model!r} is neither a local directory nor a valid Hub id") from None
    if isinstance(cached, str):
        _check_flamingo_config(Path(cached), model)
    elif huggingface_hub.constants.HF_HUB_OFFLINE:
        raise CommandLineError(
            f"model {model!r} is not a local directory and not in the Hub cache, and HF_HUB_OFFLINE=1 forbids "
            f"downloading it; download it while online (`hf download {model}`) or pass a local directory"
        )


def _check_device(device: str) -> None:
    """Refuses, before anything is loaded, a device this machine does not have."""
    import torch

    parsed = torch.device(device)
    if parsed.type == "cpu":
        return
    if parsed.type == "meta":
        raise CommandLineError("--device meta holds no data and cannot run a model; use cpu or an accelerator")
    backend = getattr(torch, parsed.type, None) if parsed.type != "mps" else torch.backends.mps
    is_available = getattr(backend, "is_available", None)
    if is_available is not None and not is_available():
        name = parsed.type.upper() if parsed.type in ("cuda", "mps", "xpu", "hpu", "npu") else parsed.type
        raise CommandLineError(f"--device {device}: {name} is not available on this machine; use --device cpu")
    count = getattr(backend, "device_count", None)
    if parsed.index is not None and count is not None and parsed.index >= count():
        raise CommandLineError(
            f"--device {device}: this machine has {count()} {parsed.type} device(s), numbered from 0"
        )


def _check_output_file(output: str) -> None:
    """`eval --output`: a file path whose folder can be written, checked before the evaluation (nothing is
    created now; `EvaluationResults.save` creates missing parent folders at the end)."""
    from .conversion.writing import check_writable_location

    if Path(output).is_dir():
        raise CommandLineError(
            f"--output {output} is a directory; expected a JSON file path, e.g. {Path(output) / 'results.json'}"
        )
    check_writable_location(output, "--output")


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
    _check_device(args.device)
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


def _evaluation_config(args: argparse.Namespace):
    """The `EvaluationConfig` of `eval`'s arguments; its messages name the command-line flags."""
    from .evaluation.runner import EvaluationConfig

    paths = {name: getattr(args, name) for name in _EVAL_PATH_FLAGS}
    for name, value in paths.items():
        if value is not None and not Path(value).exists():
            raise CommandLineError(f"{_flag(name)}: not found: {value}")
    try:
        return EvaluationConfig(
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
        raise CommandLineError(_with_flags(str(error))) from error


def _with_flags(message: str) -> str:
    """An `EvaluationConfig` message with its field names written as the flags that set them."""
    from dataclasses import fields

    from .evaluation.runner import EvaluationConfig

    for field in fields(EvaluationConfig):
        message = message.replace(f"`{field.name}`", _flag(field.name))
    for name in _EVAL_PATH_FLAGS:
        message = re.sub(rf"(?<![\w-]){name}(?!\w)", _flag(name), message)
    return message.replace("`rices=True`", "--rices")


def _run_eval(args: argparse.Namespace) -> int:
    from .evaluation.runner import evaluate, load_evaluation_data

    model_source = _model_source(args.model)
    config = _evaluation_config(args)
    _check_device(args.device)
    if args.output:
        _check_output_file(args.output)
    try:
        data = load_evaluation_data(config)  # reads the data set and checks the shots against its pool
    except ValueError as error:
        raise CommandLineError(_with_flags(str(error))) from error
    model, processor = _load_model_and_processor(model_source, args.device)
    results = evaluate(
        model,
        processor,
        config,
        output_path=args.output,
        progress=not args.no_progress,
        cpu_fast_path=not args.no_cpu_fast_path,
        data=data,
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
    return int(module.main(argv, prog=f"{PROG} {name}") or 0)


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
        message = " ".join(str(error).split())  # one line, whatever the library's message looks like
        print(f"{PROG} {command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
