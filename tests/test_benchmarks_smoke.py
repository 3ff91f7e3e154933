"""Smoke test of the benchmark harness: the tiny config end to end (no timing assertions), with transformers' IDEFICS
built at the tiny shapes; the compiled column is skipped (`--no-compile`: compiling takes minutes on a 2-core CPU; the
compiled path's correctness is tested in `tests/test_compile.py`)."""

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
            "--no-compile",
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
    # IDEFICS ran every workload: a median, a speed-up and a peak RSS in every summary row; no failure recorded.
    summary = text.split("## Summary")[1].split("## Acceptance targets")[0]
    for workload in ("W1", "W2-5", "W2-20", "W3", "W4"):
        cells = re.search(rf"^\| {re.escape(workload)} \| .*$", summary, re.M).group(0).split(" | ")
        assert re.fullmatch(r"[0-9.]+", cells[7]) and re.fullmatch(r"[0-9.]+x", cells[8]), (workload, cells)
        assert cells[9] == "-" and re.fullmatch(r"[0-9]+ \|", cells[-1]), (workload, cells)  # no compiled column
    assert "failed:" not in text and "not built" not in text
    assert "| W3 peak RSS increase, default (eager) | <= both peers' |" in text
    # Counted FLOPs: every model does positive work; OpenFlamingo never does less than hf_flamingo.
    for workload in ("W1", "W2-5", "W2-20", "W3"):
        row = re.search(
            rf"^\| {re.escape(workload)} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ",
            text.split("## Counted FLOPs")[1],
            re.M,
        )
        assert row, f"no counted-FLOPs row for {workload}"
        ours, theirs, idefics = (float(row.group(i)) for i in (1, 2, 3))
        assert 0 < ours <= theirs * 1.001 and idefics > 0, (workload, ours, theirs, idefics)
