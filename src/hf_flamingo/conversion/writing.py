"""Writing converted models: one convention for every converter.

- The output location is checked before any conversion work: an existing output directory is refused unless
  overwriting is asked for, and the place it goes must be writable (a parent that is a file, or a folder without
  write permission, is reported at once instead of after a conversion of several minutes).
- The directory is written atomically: into a hidden sibling `.<name>.<pid>-<random>.partial`, then moved into place,
  so an interrupted or failing conversion leaves no output (and an existing one untouched).
- A process killed outright (SIGKILL, out-of-memory killer, power loss) cannot clean up its partial directory. The next
  conversion into the same output directory removes such stale partial directories (and says so in a log line) before
  it writes. Two conversions into the *same* output directory at the same time are therefore not supported.
- Optional upload to the Hub.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
"""Suffix of the temporary sibling directory a conversion writes into before moving it into place."""


def nearest_existing_ancestor(path: str | os.PathLike) -> Path:
    """The closest existing ancestor of `path` (the folder in which the first missing component would be created)."""
    current = Path(path).absolute().parent
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def check_writable_location(path: str | os.PathLike, what: str) -> None:
    """Checks, without leaving anything behind, that `path` (a file or directory to be created) could be written.

    The parents of `path` need not exist yet; the nearest existing one must be a directory in which a file can be
    created (probed with a temporary file, which also catches read-only file systems and ACLs).

    Args:
        path (`str` or `os.PathLike`): The path to be written.
        what (`str`): How to name the path in messages, e.g. `"--output-dir"`.

    Raises:
        NotADirectoryError: if a parent of `path` is a file.
        PermissionError: if the nearest existing parent is not writable.
    """
    ancestor = nearest_existing_ancestor(path)
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{what} {os.fspath(path)!r} cannot be created: {str(ancestor)!r} is a file.")
    try:
        with tempfile.TemporaryFile(dir=ancestor, prefix=".hf-flamingo-write-probe-"):
            pass
    except OSError as error:
        raise PermissionError(
            f"{what} {os.fspath(path)!r} cannot be written: creating a file in {str(ancestor)!r} failed "
            f"({error.strerror or error}). Choose a writable location."
        ) from error


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """The absolute output directory, checked before any conversion work.

    Raises:
        FileExistsError: if it exists and `overwrite` is false, or if it is an existing file.
        NotADirectoryError: if one of its parents is a file.
        PermissionError: if it cannot be created (or replaced) for lack of write permission.
    """
    output_dir = Path(output_dir).absolute()
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"Output directory {str(output_dir)!r} is an existing file; give a directory path.")
    if output_dir.exists() and not overwrite:
        raise FileExistsError(
            f"Output directory {str(output_dir)!r} already exists; pass --overwrite (overwrite=True) to replace it."
        )
    check_writable_location(output_dir, "Output directory")
    return output_dir


def _partial_pattern(output_dir: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(output_dir.name)}\.(\d+)-[0-9a-f]{{8}}(\.partial|\.old)")


def remove_stale_partial_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Removes the partial directories that killed conversions into `output_dir` left next to it.

    Only the names this module creates for `output_dir` itself are matched (`.<name>.<pid>-<8 hex>.partial`, and
    `.<name>.<pid>-<8 hex>.old` once `output_dir` exists), never those of another output directory.

    Returns:
        `list[Path]`: The directories removed (each one is also logged).
    """
    output_dir = Path(output_dir).absolute()
    if not output_dir.parent.is_dir():
        return []
    pattern, removed = _partial_pattern(output_dir), []
    for candidate in sorted(output_dir.parent.iterdir()):
        match = pattern.fullmatch(candidate.name)
        if match is None or not candidate.is_dir():
            continue
        if match.group(2) == ".old" and not output_dir.exists():
            continue  # the previous output, moved aside by an interrupted --overwrite: never delete it silently
        logger.warning(
            "Removing %s, left by an interrupted conversion (process %s) into %s.",
            candidate,
            match.group(1),
            output_dir,
        )
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


def _make_sibling_dir(output_dir: Path, suffix: str) -> Path:
    directory = output_dir.parent / f".{output_dir.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}"
    directory.mkdir()
    return directory


def write_directory_atomically(
    output_dir: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False
) -> Path:
    """Runs `write(tmp_dir)` in a temporary sibling directory, then moves it to `output_dir`.

    An interrupted or failing `write` leaves no `output_dir` behind (and an existing one untouched). Partial
    directories left by killed earlier runs into the same `output_dir` are removed first (see the module docstring).

    Raises:
        FileExistsError: if `output_dir` exists and `overwrite` is false.
    """
    output_dir = check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partial_dirs(output_dir)
    tmp_dir = _make_sibling_dir(output_dir, PARTIAL_SUFFIX)
    try:
        write(tmp_dir)
        if output_dir.exists():
            old_dir = _make_sibling_dir(output_dir, ".old")
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


__all__ = [
    "PARTIAL_SUFFIX",
    "check_output_dir",
    "check_writable_location",
    "nearest_existing_ancestor",
    "push_directory_to_hub",
    "remove_stale_partial_dirs",
    "write_directory_atomically",
]
