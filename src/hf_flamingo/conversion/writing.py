"""Writing converted models: one convention for every converter (an existing output directory is refused before
any work unless overwriting is asked for; the directory is written atomically, so an interrupted or failing
conversion leaves nothing behind; optional upload to the Hub)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

PARTIAL_SUFFIX = ".partial"
"""Suffix of the temporary sibling directory a conversion writes into before moving it into place."""


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """The absolute output directory, checked before any conversion work.

    Raises:
        FileExistsError: if it exists and `overwrite` is false.
    """
    output_dir = Path(output_dir).absolute()
    if output_dir.exists() and not overwrite:
        raise FileExistsError(
            f"Output directory {str(output_dir)!r} already exists; pass --overwrite (overwrite=True) to replace it."
        )
    return output_dir


def write_directory_atomically(
    output_dir: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False
) -> Path:
    """Runs `write(tmp_dir)` in a temporary sibling directory, then moves it to `output_dir`.

    An interrupted or failing `write` leaves no `output_dir` behind (and an existing one untouched).

    Raises:
        FileExistsError: if `output_dir` exists and `overwrite` is false.
    """
    output_dir = check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=PARTIAL_SUFFIX, dir=output_dir.parent))
    try:
        write(tmp_dir)
        if output_dir.exists():
            old_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".old", dir=output_dir.parent))
            os.replace(output_dir, old_dir / output_dir.name)
            os.replace(tmp_dir, output_dir)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.replace(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return output_dir


def push_directory_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str,
    private: bool = False,
    token: str | None = None,
):
    """Uploads a converted directory to the Hub, creating the repository if needed."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message=commit_message)


__all__ = ["PARTIAL_SUFFIX", "check_output_dir", "push_directory_to_hub", "write_directory_atomically"]
