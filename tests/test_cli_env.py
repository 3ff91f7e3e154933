"""`hf-flamingo env`: the stack's versions from the installed metadata, the devices torch sees and the backend
bitsandbytes loaded, through the console script; a bitsandbytes that fails to import is one line of the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from hf_flamingo_cli.env import format_report

SCRIPT = Path(sys.executable).with_name("hf-flamingo")
VERSIONED = ("transformers", "accelerate", "peft", "huggingface_hub", "safetensors")


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _env(*args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ)
    if pythonpath is not None:
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), environment.get("PYTHONPATH")]))
    return subprocess.run(
        [str(SCRIPT), "env", *args], capture_output=True, text=True, timeout=300, env=environment, check=False
    )


def test_env_json_reports_the_installed_stack():
    result = _env("--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["hf_flamingo"] == metadata.version("hf_flamingo")
    assert report["python"] == ".".join(map(str, sys.version_info[:3]))
    for name in VERSIONED:
        assert report[name] == metadata.version(name), name
    assert report["open_flamingo"] == _version("open-flamingo")
    assert report["torch"] == {
        "version": metadata.version("torch"),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "hip_version": torch.version.hip,
        "mps_available": torch.backends.mps.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
    }
    if _version("bitsandbytes") is None:
        assert report["bitsandbytes"] == {"version": None}
    else:
        import bitsandbytes.cextension

        assert report["bitsandbytes"]["version"] == metadata.version("bitsandbytes")
        assert report["bitsandbytes"]["backend"] == bitsandbytes.cextension.BNB_BACKEND
        assert report["bitsandbytes"]["library"].startswith("libbitsandbytes_")


def test_env_text_report():
    result = _env()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "Copy-and-paste the text below in your GitHub issue.",
        "",
        f"- hf_flamingo: {metadata.version('hf_flamingo')}",
    ]
    for name in VERSIONED:
        assert f"- {name}: {metadata.version(name)}" in lines, name
    torch_line = next(line for line in lines if line.startswith("- torch: "))
    assert torch_line.startswith(f"- torch: {metadata.version('torch')} (")
    assert f"CUDA available: {torch.cuda.is_available()}; MPS available: {torch.backends.mps.is_available()})" in (
        torch_line
    )
    if not torch.cuda.is_available():
        assert "- CUDA devices: none" in lines


@pytest.mark.skipif(_version("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_env_reports_a_bitsandbytes_that_fails_to_import(tmp_path):
    """A bitsandbytes without a usable native library raises on import: the report says so in one line."""
    (tmp_path / "bitsandbytes").mkdir()
    (tmp_path / "bitsandbytes" / "__init__.py").write_text(
        'raise RuntimeError("no native library\\nfor this platform")\n'
    )
    result = _env(pythonpath=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    expected = (
        f"- bitsandbytes: {metadata.version('bitsandbytes')} (import failed: RuntimeError: no native library for this "
        "platform)"
    )
    assert expected in result.stdout.splitlines(), result.stdout


def test_missing_packages_read_not_installed():
    report = {"hf_flamingo": "1.0", "torch": {"version": None}, "peft": None, "bitsandbytes": {"version": None}}
    assert format_report(report).splitlines() == [
        "- hf_flamingo: 1.0",
        "- torch: not installed",
        "- peft: not installed",
        "- bitsandbytes: not installed",
    ]
