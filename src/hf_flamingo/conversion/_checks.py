"""Key-set and shape checks shared by the converters, with messages that name the offending keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def format_keys(keys: Sequence[str], limit: int = 20) -> str:
    """`a, b, c, ... (N more)`."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def key_set_problems(
    found: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]], limit: int = 20
) -> list[str]:
    """Compares the shapes of a state dict with the expected ones.

    Args:
        found: Key -> shape of the state dict being checked.
        expected: Key -> shape it must have.

    Returns:
        `list[str]`: `"Missing keys: ..."`, `"Unexpected keys: ..."` and `"Wrong shapes: key: expected (...), got
        (...)"` entries, for the kinds of problem present; empty if the state dict fits.
    """
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = [
        f"{key}: expected {tuple(shape)}, got {tuple(found[key])}"
        for key, shape in sorted(expected.items())
        if key in found and tuple(found[key]) != tuple(shape)
    ]
    problems = []
    if missing:
        problems.append(f"Missing keys: {format_keys(missing, limit)}")
    if unexpected:
        problems.append(f"Unexpected keys: {format_keys(unexpected, limit)}")
    if wrong:
        problems.append(f"Wrong shapes: {format_keys(wrong, limit)}")
    return problems
