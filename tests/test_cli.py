"""The `hf-flamingo` console script: every subcommand through its real entry point, with one bad input each.

The subprocesses are started together (two at a time) by one module fixture, since each spends seconds importing
torch and transformers; the tests then check their outputs. Further bad-input cases call `main()` in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from evaluation_fixtures import build_tiny_flamingo, single_torch_thread, write_benchmark
from helpers import make_test_image

from hf_flamingo import cli
from hf_flamingo.evaluation import load_image, prompts
from hf_flamingo.evaluation.inference import generate_batch

SCRIPT = Path(sys.executable).with_name("hf-flamingo")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_torch_thread()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model, processor = build_tiny_flamingo()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    for seed in range(3):
        make_test_image(seed).save(root / f"image_{seed}.png")
    (root / "examples.jsonl").write_text(json.dumps({"image": "image_0.png", "text": "A red fox."}) + "\n")
    (root / "bad.jsonl").write_text(json.dumps({"image": "image_0.png", "text": "ok"}) + "\n{oops\n")
    (root / "not_an_image.png").write_text("plain text")
    return {"root": root, "vqav2": write_benchmark("vqav2", root), "model": model, "processor": processor}


def _generate_args(files) -> list[str]:
    """`generate` of the tiny model: two examples, 12 new tokens (no `--num-beams`)."""
    root = files["root"]
    return ["generate", str(root / "model"), "--examples", str(root / "examples.jsonl")] + [
        "--image",
        str(root / "image_1.png"),
        "--caption",
        "A blue bird.",
        "--query-image",
        str(root / "image_2.png"),
        "--max-new-tokens",
        "12",
    ]


def _commands(files) -> dict[str, list[str]]:
    root, model_dir, vqa = files["root"], str(files["root"] / "model"), files["vqav2"]
    script = [str(SCRIPT)]
    return {
        "convert_help": [sys.executable, "-m", "hf_flamingo.cli", "convert", "--help"],  # the module form too
        "convert_missing_checkpoint": script
        + [
            "convert",
            "--checkpoint",
            str(root / "missing.pt"),
            "--vision-model",
            str(root / "no_vision"),
            "--language-model",
            str(root / "no_lm"),
            "--output-dir",
            str(root / "converted"),
        ],
        "generate": script
        + [
            "generate",
            model_dir,
            "--examples",
            str(root / "examples.jsonl"),
            "--image",
            str(root / "image_1.png"),
            "--caption",
            " A blue bird. ",
            "--query-image",
            str(root / "image_2.png"),
            "--max-new-tokens",
            "4",
            "--show-prompt",
        ],
        "generate_greedy": script + [*_generate_args(files), "--num-beams", "1"],
        "generate_stream": script + [*_generate_args(files), "--stream"],
        "generate_bad_jsonl": script
        + ["generate", model_dir, "--examples", str(root / "bad.jsonl"), "--query-image", str(root / "image_2.png")],
        "eval": script
        + [
            "eval",
            model_dir,
            "--task",
            "vqav2",
            "--shots",
            "0",
            "2",
            "--seeds",
            "1",
            "--num-samples",
            "2",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "2",
            "--no-progress",
            "--output",
            str(root / "eval.json"),
        ]
        + [arg for name, value in vqa.items() for arg in (cli._flag(name), value)],
        "eval_missing_file": script
        + [
            "eval",
            model_dir,
            "--task",
            "vqav2",
            "--train-questions",
            str(root / "nope.json"),
            "--train-annotations",
            vqa["train_annotations"],
            "--train-image-dir",
            vqa["train_image_dir"],
            "--test-questions",
            vqa["test_questions"],
            "--test-annotations",
            vqa["test_annotations"],
        ],
    }


@pytest.fixture(scope="module")
def runs(files):
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }

    def run(command):
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=files["root"])

    commands = _commands(files)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(commands, pool.map(run, commands.values()), strict=True))
    return results


def _assert_clean_failure(result, *fragments):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_top_level_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    output = capsys.readouterr().out
    for command in ("convert", "generate", "eval"):
        assert command in output
    assert "demo" not in output  # the quick-start is example code: examples/quickstart.py


def test_version(capsys):
    from hf_flamingo import __version__

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"hf-flamingo {__version__}\n"


def test_convert(runs, files):
    result = runs["convert_help"]
    assert result.returncode == 0, result.stderr
    assert "usage: hf-flamingo convert" in result.stdout and "--release" in result.stdout
    _assert_clean_failure(runs["convert_missing_checkpoint"])
    assert runs["convert_missing_checkpoint"].stderr.splitlines() == [
        f"hf-flamingo convert: error: The vision model directory '{files['root'] / 'no_vision'}' does not exist."
    ]
    assert not (files["root"] / "converted").exists()


def test_generate_builds_the_captioning_prompt_and_prints_the_caption(runs, files):
    result = runs["generate"]
    assert result.returncode == 0, result.stderr
    prompt = "<image>Output:A red fox.<|endofchunk|>\n<image>Output:A blue bird.<|endofchunk|>\n<image>Output:"
    assert prompt in result.stderr
    # The printed caption is what the same model generates in-process for the same prompt and images.
    root = files["root"]
    images = [load_image(root / f"image_{seed}.png") for seed in range(3)]
    settings = prompts.GenerationSettings(max_new_tokens=4, num_beams=3)
    expected = generate_batch(files["model"], files["processor"], [prompt], [images], settings)[0]
    assert result.stdout.rstrip("\n") == prompts.postprocess_caption(expected).strip()


def test_generate_stream_prints_the_greedy_caption(runs, files):
    """`--stream` decodes greedily (its default `--num-beams` is 1) and streams exactly the caption that
    `--num-beams 1` prints, which is the in-process greedy caption."""
    streamed, greedy = runs["generate_stream"], runs["generate_greedy"]
    assert streamed.returncode == 0, streamed.stderr
    assert greedy.returncode == 0, greedy.stderr
    assert streamed.stdout == greedy.stdout
    prompt = "<image>Output:A red fox.<|endofchunk|>\n<image>Output:A blue bird.<|endofchunk|>\n<image>Output:"
    images = [load_image(files["root"] / f"image_{seed}.png") for seed in range(3)]
    settings = prompts.GenerationSettings(max_new_tokens=12, num_beams=1)
    expected = prompts.postprocess_caption(
        generate_batch(files["model"], files["processor"], [prompt], [images], settings)[0]
    ).strip()
    assert expected and streamed.stdout == expected + "\n"


def test_stream_refuses_beam_search(files, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*_generate_args(files), "--stream", "--num-beams", "3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "hf-flamingo generate: error: argument --stream: streaming needs greedy decoding (--num-beams 1), got "
        "--num-beams 3; transformers' streamers follow one sequence, not a beam search"
    )


class _Tokenizer:
    """Enough of a tokenizer for `TextStreamer`: token ids are indices into a list of text pieces."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, **kwargs):
        return "".join(self.pieces[i] for i in ([ids] if isinstance(ids, int) else ids))


@pytest.mark.parametrize(
    "pieces, caption",
    [
        ([" ", ' "A', " red ", "fox. Out", "put", ":more", " text"], "A red fox."),  # cut at a split "Output"
        (["A", " Out", "er ", "space ", " "], "A Outer space"),  # "Out" that does not become "Output"
        (["  ", "\n"], ""),
    ],
)
def test_caption_streamer_prints_the_postprocessed_caption(pieces, caption, capsys):
    """What `TextStreamer` finalises piece by piece, the streamer prints as `postprocess_caption(text).strip()`,
    never printing text that a later piece cuts."""
    streamer = cli._CaptionStreamer(_Tokenizer(pieces))
    streamer.put(torch.tensor([[0]]))  # the prompt, skipped
    printed = []
    for index in range(len(pieces)):
        streamer.put(torch.tensor([index]))
        printed.append(capsys.readouterr().out)
        assert caption.startswith("".join(printed)), printed
    streamer.end()
    assert "".join(printed) + capsys.readouterr().out == caption + "\n"


def test_generate_bad_jsonl(runs):
    _assert_clean_failure(runs["generate_bad_jsonl"], "bad.jsonl, line 2: not valid JSON")


def test_eval_writes_results(runs, files):
    result = runs["eval"]
    assert result.returncode == 0, result.stderr
    assert "vqav2 0-shot VQA accuracy:" in result.stdout and "vqav2 2-shot VQA accuracy:" in result.stdout
    saved = json.loads((files["root"] / "eval.json").read_text())
    assert saved["config"]["shots"] == [0, 2] and saved["config"]["seeds"] == [1]
    assert saved["config"]["train_questions"] == files["vqav2"]["train_questions"]
    assert saved["generation"]["max_new_tokens"] == 2 and saved["generation"]["num_beams"] == 3


def test_eval_missing_file(runs):
    _assert_clean_failure(runs["eval_missing_file"], "--train-questions: not found:", "nope.json")


def _main(argv, capsys):
    code = cli.main([str(arg) for arg in argv])
    return code, capsys.readouterr()


def test_generate_bad_inputs_in_process(files, capsys):
    root = files["root"]
    model_dir = root / "model"
    query = ["--query-image", root / "image_2.png"]
    code, out = _main(["generate", model_dir, "--image", root / "missing.png", "--caption", "x", *query], capsys)
    assert code == 1 and "image file not found:" in out.err and "missing.png" in out.err
    code, out = _main(["generate", model_dir, "--image", root / "not_an_image.png", "--caption", "x", *query], capsys)
    assert code == 1 and "cannot read image" in out.err and "not_an_image.png" in out.err
    code, out = _main(["generate", model_dir, "--image", root / "image_0.png", *query], capsys)
    assert code == 1 and "1 --image but 0 --caption" in out.err
    code, out = _main(["generate", root / "no_model_here", *query], capsys)
    assert code == 1 and "model directory not found" in out.err
    (root / "no_text.jsonl").write_text('{"image": "image_0.png"}\n')
    code, out = _main(["generate", model_dir, "--examples", root / "no_text.jsonl", *query], capsys)
    assert code == 1 and 'line 1: missing "text"' in out.err
    code, out = _main(["generate", model_dir, "--examples", root / "absent.jsonl", *query], capsys)
    assert code == 1 and "examples file not found" in out.err


def test_eval_missing_task_paths_names_the_flags(files, capsys):
    code, out = _main(["eval", files["root"] / "model", "--task", "coco"], capsys)
    assert code == 1 and "needs --karpathy-json, --image-dir" in out.err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", str(files["root"] / "model"), "--task", "no_such_task"])
    assert exit_info.value.code == 2
