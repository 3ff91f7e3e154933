"""The `hf-flamingo` command line answers `--help`, `--version` and usage errors without importing torch or
transformers (`hf_flamingo_cli` is standard library only), and its static copies of the package's facts (the
`eval` task names, the version) stay equal to the package's."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import hf_flamingo
import hf_flamingo_cli
from hf_flamingo import cli
from hf_flamingo.evaluation.tasks import TASK_CLASSES

SCRIPT = Path(sys.executable).with_name("hf-flamingo")
HEAVY = ("torch", "transformers", "hf_flamingo")


def _imported_modules(argv: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Runs `python -X importtime -m hf_flamingo_cli *argv`; returns the result and every module it imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "hf_flamingo_cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # importtime lines: "import time: <self us> | <cumulative us> | <indented module name>"
    modules = {
        line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    modules.discard("imported package")
    return result, modules


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--help"], 0),
        (["generate", "--help"], 0),
        (["eval", "--help"], 0),
        (["env", "--help"], 0),
        (["--version"], 0),
        (["generate", "model", "--query-image", "x.png", "--num-beams", "0"], 2),
        (["eval", "model", "--task", "no_such_task"], 2),
        (["no_such_command"], 2),
    ],
)
def test_parsing_imports_neither_torch_nor_transformers(argv, code):
    result, modules = _imported_modules(argv)
    assert result.returncode == code, result.stderr
    assert "argparse" in modules  # the importtime report was read
    heavy = sorted(name for name in modules if name.split(".")[0] in HEAVY)
    assert heavy == [], heavy


def test_a_command_imports_the_package():
    """The other side of the test above: running a command does import `hf_flamingo` (and registers its classes)."""
    result, modules = _imported_modules(["generate", "no_model_here/x/y", "--query-image", "x.png"])
    assert result.returncode == 1, result.stderr
    messages = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert messages == ["hf-flamingo generate: error: model directory not found: no_model_here/x/y"]
    assert {"torch", "transformers", "hf_flamingo", "hf_flamingo.cli"} <= modules


def test_eval_task_choices_are_the_task_classes():
    assert hf_flamingo_cli.EVAL_TASKS == tuple(TASK_CLASSES)


def test_version_is_the_distribution_metadata():
    assert hf_flamingo_cli.version() == metadata.version("hf_flamingo") == hf_flamingo.__version__
    result = subprocess.run([str(SCRIPT), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"hf-flamingo {hf_flamingo.__version__}\n"


def test_console_script_and_module_entry_points():
    (entry_point,) = metadata.entry_points(group="console_scripts", name="hf-flamingo")
    assert entry_point.value == "hf_flamingo_cli:main"
    assert cli.main is hf_flamingo_cli.main  # `hf_flamingo.cli.main` is the same command line
    assert cli.CommandLineError is hf_flamingo_cli.CommandLineError
