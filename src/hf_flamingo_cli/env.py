"""`hf-flamingo env`: the versions of the stack and the devices of this machine, for bug reports (as
`transformers env`).

Versions come from the installed distributions' metadata; torch and bitsandbytes are imported to report the devices
and the backend bitsandbytes loaded. Nothing here imports `hf_flamingo`, so the report also works when importing it
fails. A package that fails to import is reported in one line, never with a traceback.
"""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["collect_report", "format_report", "print_report"]

# (label, distribution name) of the plain version lines, in report order.
_PACKAGES = (
    ("transformers", "transformers"),
    ("accelerate", "accelerate"),
    ("peft", "peft"),
    ("huggingface_hub", "huggingface_hub"),
    ("safetensors", "safetensors"),
    ("open_flamingo", "open-flamingo"),
    ("open_clip_torch", "open_clip_torch"),
)


def _version(distribution: str) -> str | None:
    """The installed version of `distribution`, or None if it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _import_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _torch_report() -> dict[str, Any]:
    """torch's version, the accelerators it sees and their names."""
    report: dict[str, Any] = {"version": _version("torch")}
    if report["version"] is None:
        return report
    try:
        import torch
    except Exception as error:  # a broken install is part of the report, not a crash
        report["error"] = _import_error(error)
        return report
    report["cuda_available"] = torch.cuda.is_available()
    report["cuda_version"] = torch.version.cuda  # None on CPU and ROCm builds
    report["hip_version"] = torch.version.hip
    report["mps_available"] = torch.backends.mps.is_available()
    report["cuda_devices"] = (
        [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
        if report["cuda_available"]
        else []
    )
    return report


def _bitsandbytes_report() -> dict[str, Any]:
    """bitsandbytes' version and the backend and native library it loaded (or why importing it failed)."""
    report: dict[str, Any] = {"version": _version("bitsandbytes")}
    if report["version"] is None:
        return report
    try:
        import bitsandbytes.cextension as cextension
    except Exception as error:  # e.g. no native library for this platform
        report["error"] = _import_error(error)
        return report
    report["backend"] = getattr(cextension, "BNB_BACKEND", None)
    library = getattr(getattr(cextension, "lib", None), "_lib", None)
    report["library"] = Path(library._name).name if getattr(library, "_name", None) else None
    return report


def collect_report() -> dict[str, Any]:
    """The report: `{name: version or details}`; a package that is not installed has the version None.

    Returns:
        `dict[str, Any]`: `hf_flamingo`, `python`, `platform`, `torch` (a dict: `version`, `cuda_available`,
        `cuda_version`, `hip_version`, `mps_available`, `cuda_devices`, or `error`), the versions of transformers,
        accelerate, peft, huggingface_hub, safetensors, open_flamingo and open_clip_torch, and `bitsandbytes` (a dict:
        `version`, `backend`, `library`, or `error`).
    """
    report: dict[str, Any] = {
        "hf_flamingo": _version("hf_flamingo"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _torch_report(),
    }
    report.update({label: _version(distribution) for label, distribution in _PACKAGES[:3]})
    report["bitsandbytes"] = _bitsandbytes_report()
    report.update({label: _version(distribution) for label, distribution in _PACKAGES[3:]})
    return report


def _describe_torch(torch_report: dict[str, Any]) -> str:
    if "error" in torch_report:
        return f"{torch_report['version']} (import failed: {torch_report['error']})"
    build = f"CUDA {torch_report['cuda_version']}" if torch_report["cuda_version"] else "no CUDA"
    if torch_report["hip_version"]:
        build = f"ROCm {torch_report['hip_version']}"
    return (
        f"{torch_report['version']} ({build}; CUDA available: {torch_report['cuda_available']}; "
        f"MPS available: {torch_report['mps_available']})"
    )


def _describe_devices(devices: list[str]) -> str:
    if not devices:
        return "none"
    return f"{len(devices)}: " + ", ".join(f"cuda:{index} {name}" for index, name in enumerate(devices))


def _describe_bitsandbytes(bnb_report: dict[str, Any]) -> str:
    if "error" in bnb_report:
        return f"{bnb_report['version']} (import failed: {bnb_report['error']})"
    details = [f"backend {bnb_report['backend']}" if bnb_report["backend"] else "backend unknown"]
    if bnb_report["library"]:
        details.append(f"native library {bnb_report['library']}")
    return f"{bnb_report['version']} ({', '.join(details)})"


def format_report(report: dict[str, Any]) -> str:
    """The report as the `- name: value` lines `hf-flamingo env` prints."""
    lines = []
    for name, value in report.items():
        if isinstance(value, dict) and value["version"] is None:
            value = None
        elif name == "torch":
            lines.append(f"- torch: {_describe_torch(value)}")
            if "error" not in value:
                lines.append(f"- CUDA devices: {_describe_devices(value['cuda_devices'])}")
            continue
        elif name == "bitsandbytes":
            value = _describe_bitsandbytes(value)
        lines.append(f"- {name}: {'not installed' if value is None else value}")
    return "\n".join(lines)


def print_report(as_json: bool = False) -> int:
    """Prints the report (as text, or one JSON object); returns the exit code 0."""
    report = collect_report()
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print("Copy-and-paste the text below in your GitHub issue.\n")
        print(format_report(report))
    sys.stdout.flush()
    return 0
