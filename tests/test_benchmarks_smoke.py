"""Smoke test of the benchmark harness: the tiny config end to end (no timing assertions)."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_harness_runs_tiny_config(tmp_path):
    output = tmp_path / "RESULTS.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    completed = subprocess.run(
        [
            sys.executable,
            "benchmarks/run_benchmarks.py",
            "--config",
            "tiny",
            "--repeats",
            "1",
            "--warmup",
            "0",
            # One thread: the tiny models gain nothing from two, and two OpenMP threads on a busy 2-core machine slow
            # tiny ops down by up to 50x (each barrier waits for a descheduled thread).
            "--threads",
            "1",
            "--output",
            str(output),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    text = output.read_text()
    for workload in ("W1", "W2-5", "W2-20", "W3", "W4"):
        assert re.search(rf"^\| {re.escape(workload)} \| ", text, re.MULTILINE), f"no summary row for {workload}"
    for workload in ("W1", "W2-5", "W2-20"):
        assert f"| {workload} generated token ids identical | true |" in text
    assert "## Acceptance targets" in text and "W1 floor" in text and "FLOP ratio" in text
    assert "## W2 floors" in text
    # Counted FLOPs: both models do positive work; OpenFlamingo never does less than hf_flamingo.
    for workload in ("W1", "W2-5", "W2-20", "W3"):
        row = re.search(
            rf"^\| {re.escape(workload)} \| ([0-9.]+) \| ([0-9.]+) \| ", text.split("## Counted FLOPs")[1], re.M
        )
        assert row, f"no counted-FLOPs row for {workload}"
        ours, theirs = float(row.group(1)), float(row.group(2))
        assert 0 < ours <= theirs * 1.001, (workload, ours, theirs)
