"""The `hf-flamingo` commands: what `convert`, `generate` and `eval` do once their arguments are parsed.

The command line itself (parser, argument types, error reporting, `env`) is `hf_flamingo_cli`, which imports only the
standard library so that `--help` answers without importing torch; it imports this module when a command runs.
`main` is re-exported here, so `hf_flamingo.cli.main` and `python -m hf_flamingo.cli` keep working.

Errors in the input raise `CommandLineError` (or a `ValueError`/`OSError` naming the input); `main` reports them as one
line `hf-flamingo <command>: error: ...` with exit code 1.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from transformers import TextStreamer

from hf_flamingo_cli import EVAL_PATH_FLAGS, PROG, CommandLineError, build_parser, main
from hf_flamingo_cli import flag as _flag

from .evaluation.prompts import postprocess_caption

__all__ = ["CommandLineError", "build_parser", "main", "run_command", "run_convert"]


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
        if args.stream:
            _stream_caption(model, processor, prompt, images, settings)
        else:
            output = generate_batch(model, processor, [prompt], [images], settings)[0]
            print(prompts.postprocess_caption(output).strip())
    return 0


class _CaptionStreamer(TextStreamer):
    """Prints, of the text `TextStreamer` finalises, what `postprocess_caption(text).strip()` keeps: a piece of
    text is held back while it could still be cut (trailing whitespace, or the start of a closing "Output"), so
    the streamed caption is exactly the one printed without `--stream`."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.text = ""
        self.printed = 0

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        stable = self.text if stream_end or "Output" in self.text else _without_partial_marker(self.text)
        caption = postprocess_caption(stable).strip()
        print(caption[self.printed :], end="\n" if stream_end else "", flush=True)
        self.printed = len(caption)


def _stream_caption(model, processor, prompt: str, images: list, settings) -> None:
    """Greedy `generate` of one prompt (the settings of `generate_batch`), printing the caption as it is produced."""
    inputs = processor(images=[images], text=[prompt], return_tensors="pt", padding_side="left").to(model.device)
    model.generate(
        **inputs,
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens,
        num_beams=1,
        do_sample=False,
        eos_token_id=processor.eoc_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
        streamer=_CaptionStreamer(processor.tokenizer),
    )


def _without_partial_marker(text: str, marker: str = "Output") -> str:
    """`text` without its longest ending that `marker` starts with (more text may complete the marker)."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return text[:-length]
    return text


def _evaluation_config(args: argparse.Namespace):
    """The `EvaluationConfig` of `eval`'s arguments; its messages name the command-line flags."""
    from .evaluation.runner import EvaluationConfig

    paths = {name: getattr(args, name) for name in EVAL_PATH_FLAGS}
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
    for name in EVAL_PATH_FLAGS:
        message = re.sub(rf"(?<![\w-]){name}(?!\w)", _flag(name), message)
    return message.replace("`rices=True`", "--rices")


def _run_eval(args: argparse.Namespace) -> int:
    from .evaluation.runner import end_processes, evaluate, is_main_process, load_evaluation_data, process_device

    model_source = _model_source(args.model)
    config = _evaluation_config(args)
    _check_device(args.device)
    if args.output:
        _check_output_file(args.output)
    try:
        data = load_evaluation_data(config)  # reads the data set and checks the shots against its pool
    except ValueError as error:
        raise CommandLineError(_with_flags(str(error))) from error
    try:
        model, processor = _load_model_and_processor(model_source, process_device(args.device))  # cuda:<rank>
        results = evaluate(
            model,
            processor,
            config,
            output_path=args.output,
            progress=not args.no_progress,
            cpu_fast_path=not args.no_cpu_fast_path,
            data=data,
        )
        main_process = is_main_process()
    finally:
        end_processes()
    if not main_process:  # under torchrun / accelerate launch the main process prints (and wrote the file)
        return 0
    for result in results.results:
        trials = ", ".join(f"{score:.2f}" for score in result.trials)
        print(
            f"{results.task} {result.shots}-shot {results.metric}: {result.mean:.2f} "
            f"(std {result.stddev:.2f}; trials {trials})"
        )
    if args.output:
        print(f"Wrote {args.output}")
    return 0


def run_convert(argv: list[str]) -> int:
    """`hf-flamingo convert`: the converter's own parser and `main(argv, prog) -> int`, under this program's name
    (its errors read `hf-flamingo convert: error: ...`)."""
    from .conversion import openflamingo_to_hf

    prog = f"{PROG} convert"
    if any(arg in ("-h", "--help") for arg in argv):
        parser = openflamingo_to_hf.build_parser()
        parser.prog = prog
        parser.print_help()
        return 0
    return int(openflamingo_to_hf.main(argv, prog=prog) or 0)


def run_command(args: argparse.Namespace) -> int:
    """Runs `generate` or `eval` on arguments parsed by `hf_flamingo_cli.build_parser`; returns the exit code.

    Raises:
        CommandLineError, ValueError, OSError: for bad input (reported by `main` as one line, exit code 1).
    """
    handlers = {"generate": _run_generate, "eval": _run_eval}
    if args.command not in handlers:
        raise ValueError(f"unknown command {args.command!r}; expected one of {', '.join(handlers)}")
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
