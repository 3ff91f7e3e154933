"""The GPU check (`benchmarks/gpu_check.py`) as a CPU dry run: the same code with tiny models, end to end, so that the
command runs as it is when a GPU is available; and its argument errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    completed = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_check.py",
            "--tiny",
            "--device",
            "cpu",
            "--output",
            str(directory / "RESULTS-gpu.md"),
            "--json",
            str(directory / "gpu_check.json"),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    return (directory / "RESULTS-gpu.md").read_text(), json.loads((directory / "gpu_check.json").read_text())


def test_every_correctness_check_passes(dry_run):
    text, report = dry_run
    assert "**0 failed check(s).**" in text
    checks = report["correctness"]
    assert {c["group"] for c in checks} == {"tiny", "small"}
    judged = [c for c in checks if c["passed"] is not None]
    assert len(judged) >= 50
    assert all(c["passed"] for c in judged), [c for c in judged if not c["passed"]]
    names = {c["name"] for c in checks}
    for expected in (
        "fp32 logits vs CPU fp32",
        "bf16 logits vs CPU fp32",
        "fp32 greedy: cached == uncached tokens",
        "fp32 3 beams: cached == uncached tokens",
        "fp32 bridge gradients vs CPU",
        "bf16-autocast bridge tensors with finite non-zero gradients",
        "8bit: quantized layers are exactly the LM's decoder linears",
        "4bit: quantized layers are exactly the LM's decoder linears",
        "4bit: QLoRA step updates every adapter tensor",
        "4bit: QLoRA step updates every bridge tensor",
        "8bit: QLoRA step updates every bridge tensor",
    ):
        assert expected in names, expected


def test_memory_section_covers_three_precisions(dry_run):
    _, report = dry_run
    memory = report["memory"]
    assert list(memory) == ["bf16", "8bit", "4bit"]
    for precision, result in memory.items():
        assert "error" not in result, (precision, result)
        assert result["generated_tokens"] == 20
        assert result["generation_peak_gib"] > 0 and result["training_peak_gib"] > 0
        assert result["description"]["LM linears"] == precision
    # The quantized language models are smaller than the bf16 one.
    lm = {p: memory[p]["language_model_footprint_gib"] for p in memory}
    assert lm["4bit"] < lm["8bit"] < lm["bf16"]


def test_speed_section_compares_the_three_models(dry_run):
    text, report = dry_run
    speed = report["speed"]
    assert speed["logits_relative_error"] <= gpu_check.SCALE_LOGITS_RTOL
    for workload in ("W1", "W2-5", "W2-20"):
        medians = speed[workload]["median_s"]
        assert set(medians) == {"hf_flamingo", "OpenFlamingo", "bare LM"}
        assert all(value > 0 for value in medians.values())
        assert f"| {workload}: " in text
    assert set(speed["W4"]["per_token_s"]) == {"hf_flamingo", "OpenFlamingo", "bare LM"}
    compiled = speed["W4 compiled"]["hf_flamingo"]
    assert compiled["compiled"] and compiled["cache"] == "StaticCache"
    assert compiled["same_tokens_as_eager"] == "21/21"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sections", "speed,bogus"], "--sections: unknown ['bogus']"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--device", "cuda"], "torch sees no CUDA device here"),
        (["--device", "mps"], "only cuda and cpu are supported"),
        (["--output", str(REPO_ROOT / "benchmarks")], "expected a file path in an existing directory"),
        (["--json", str(REPO_ROOT / "no-such-dir" / "r.json")], "expected a file path in an existing directory"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(argv, message, capsys):
    if argv == ["--device", "cuda"] and gpu_check.torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_arguments(["--device", "cpu", *argv] if "--device" not in argv else argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
