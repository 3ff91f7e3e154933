"""Data-parallel evaluation: 2 processes under `torchrun` (gloo, CPU) give exactly the single-process predictions and
scores, and only the main process writes the results file (through `evaluate` and through `hf-flamingo eval`).

The runs cover beam-search captioning with RICES demonstrations (pool features cached by the main process), VQA with
random demonstrations and two seeds, HatefulMemes rank classification with prompt ensembling, and ImageNet with a
single batch (the second process has none); every test split has 5 examples in batches of 2, so the processes get
2 and 1 batches.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from evaluation_fixtures import (
    build_tiny_flamingo,
    requires_java,
    single_torch_thread,
    write_coco,
    write_hateful_memes,
    write_imagenet,
    write_vqa,
)
from transformers import AutoProcessor

from hf_flamingo import FlamingoForConditionalGeneration
from hf_flamingo.cli import _flag
from hf_flamingo.evaluation import EvaluationConfig, evaluate

SCRIPT = Path(__file__).with_name("evaluation_distributed_script.py")
CONSOLE_SCRIPT = Path(sys.executable).with_name("hf-flamingo")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_torch_thread()


def _runs(root: Path, paths: dict[str, dict]) -> dict[str, dict]:
    common = {"batch_size": 2, "max_new_tokens": 3}
    return {
        "coco": {
            "task": "coco",
            "shots": [0, 2],
            "seeds": [0],
            "rices": True,
            "rices_cache_dir": str(root / "rices"),
            **common,
            **paths["coco"],
        },
        "vqav2": {"task": "vqav2", "shots": [0, 2], "seeds": [0, 1], "num_samples": 5, **common, **paths["vqav2"]},
        "hateful_memes": {
            "task": "hateful_memes",
            "shots": [2],
            "seeds": [0],
            "classification_prompt_ensembling": True,
            **common,
            **paths["hateful_memes"],
        },
        "imagenet": {"task": "imagenet", "shots": [0], "seeds": [0], "batch_size": 4, **paths["imagenet"]},
    }


def _environment() -> dict[str, str]:
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    environment["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes: accelerate sets up gloo
    return environment


def _cli_command(root: Path, runs: dict[str, dict]) -> list[str]:
    vqa = runs["vqav2"]
    command = [str(CONSOLE_SCRIPT), "eval", str(root / "model"), "--task", "vqav2", "--shots", "0", "2"]
    command += ["--seeds", "0", "1", "--num-samples", "5", "--batch-size", "2", "--max-new-tokens", "3"]
    command += ["--no-progress", "--output", str(root / "cli" / "vqav2.json")]
    return (
        TORCHRUN
        + command
        + [
            arg
            for name in (
                "train_questions",
                "train_annotations",
                "train_image_dir",
                "test_questions",
                "test_annotations",
                "test_image_dir",
            )
            for arg in (_flag(name), vqa[name])
        ]
    )


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Both 2-process runs (the script and the CLI), started together; then the single-process reference."""
    root = tmp_path_factory.mktemp("distributed_eval")
    model, processor = build_tiny_flamingo()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    paths = {
        "coco": write_coco(root, num_test=5),
        "vqav2": write_vqa(root, "vqav2", num_test=5),
        "hateful_memes": write_hateful_memes(root, num_test=5),
        "imagenet": write_imagenet(root),
    }
    runs = _runs(root, paths)
    plan = root / "plan.json"
    failing = {"vqav2_failing": {**runs["vqav2"], "shots": [0], "seeds": [0]}}
    plan.write_text(json.dumps({"model": str(root / "model"), "runs": runs, "failing": failing}))
    for folder in ("distributed", "cli"):
        (root / folder).mkdir()
    processes = {
        "script": subprocess.Popen(
            TORCHRUN + [str(SCRIPT), str(plan), str(root / "distributed")],
            env=_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        "cli": subprocess.Popen(
            _cli_command(root, runs), env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ),
    }
    outputs = {name: (process, *process.communicate(timeout=300)) for name, process in processes.items()}
    for name, (process, _, stderr) in outputs.items():
        assert process.returncode == 0, f"{name}: {stderr[-4000:]}"

    # The reference: one process, the same saved model, its own RICES features (the 2-process run's cache removed).
    assert [path.name for path in (root / "rices").iterdir()] == ["coco.safetensors"]  # written by the main process
    shutil.rmtree(root / "rices")
    (root / "single").mkdir()
    model = FlamingoForConditionalGeneration.from_pretrained(root / "model").eval()
    processor = AutoProcessor.from_pretrained(root / "model")
    for name, kwargs in runs.items():
        evaluate(model, processor, EvaluationConfig(**kwargs), output_path=root / "single" / f"{name}.json")
    return {"root": root, "runs": runs, "cli": outputs["cli"]}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _without_num_processes(results: dict, expected: int) -> dict:
    results = json.loads(json.dumps(results))
    assert results["environment"].pop("num_processes") == expected
    return results


@requires_java
@pytest.mark.parametrize("name", ["coco", "vqav2", "hateful_memes", "imagenet"])
def test_two_processes_give_the_single_process_results(launched, name):
    root = launched["root"]
    single = _load(root / "single" / f"{name}.json")
    distributed = _load(root / "distributed" / f"{name}.json")
    assert _without_num_processes(distributed, 2) == _without_num_processes(single, 1)
    # Every trial has all 5 (ImageNet: 3) predictions, in the single-process order, and finite scores.
    for entry in distributed["results"]:
        for predictions in entry["predictions"].values():
            assert len(predictions) == (3 if name == "imagenet" else 5)
    # Both processes returned the saved results.
    for rank in (0, 1):
        assert _load(root / "distributed" / f"{name}.returned-rank{rank}.json") == distributed


@requires_java
def test_only_the_main_process_writes_results(launched):
    root = launched["root"]
    saves = (root / "distributed" / "saves.txt").read_text().splitlines()
    assert saves == [f"0 {name}.json" for name in launched["runs"]]
    for rank in (0, 1):
        assert _load(root / "distributed" / f"process-rank{rank}.json") == {"world_size": 2, "backend": "gloo"}


@requires_java
def test_cli_under_torchrun_writes_one_results_file_and_prints_once(launched):
    root = launched["root"]
    _, stdout, _ = launched["cli"]
    assert sorted(path.name for path in (root / "cli").iterdir()) == ["vqav2.json"]
    saved = _load(root / "cli" / "vqav2.json")
    assert saved["environment"]["num_processes"] == 2
    assert saved["results"] == _load(root / "single" / "vqav2.json")["results"]
    lines = stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "vqav2 0-shot VQA accuracy",
        "vqav2 2-shot VQA accuracy",
        f"Wrote {root / 'cli' / 'vqav2.json'}",
    ]


@requires_java
def test_a_failure_on_one_process_is_raised_on_every_process(launched):
    distributed = launched["root"] / "distributed"
    assert (distributed / "vqav2_failing.error-rank1.txt").read_text() == "ValueError: injected failure on rank 1"
    assert (distributed / "vqav2_failing.error-rank0.txt").read_text() == (
        "RuntimeError: evaluation failed on process 1: ValueError('injected failure on rank 1')"
    )
    assert not (distributed / "vqav2_failing.json").exists()
