"""Timing and memory measurement: wall time with `time.perf_counter`, peak RSS sampled from `/proc/self/statm`.

Runs of the compared models are interleaved run by run (`run_alternating`), so that slow phases of a shared machine
hit every model alike; statistics are medians, with the minimum and every sample kept.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MB = 1024 * 1024
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: no malloc_trim
    _LIBC = None


def rss_bytes() -> int:
    """The process's resident set size (second field of `/proc/self/statm`, in pages)."""
    with open("/proc/self/statm", "rb") as file:
        return int(file.read().split()[1]) * _PAGE_SIZE


def release_free_memory() -> None:
    """Collects garbage and hands freed heap pages back to the OS (glibc `malloc_trim`), so that every run starts
    from a comparable RSS baseline instead of reusing pages an earlier run (of either model) left in the heap."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class RSSSampler:
    """Samples the RSS in a background thread every `interval` seconds while active (a context manager).

    torch releases the GIL inside its kernels, so the thread keeps sampling during long operations.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None

    def _read(self) -> int:
        return int(os.pread(self._fd, 128, 0).split()[1]) * _PAGE_SIZE

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            value = self._read()
            self.samples += 1
            if value > self.peak:
                self.peak = value

    def __enter__(self) -> RSSSampler:
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self.peak = self._read()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())
        os.close(self._fd)


@dataclass
class Sample:
    seconds: float
    peak_rss_mb: float
    """Peak RSS during the run minus the RSS just before it."""
    cpu_seconds: float = 0.0
    """CPU time of the whole process during the run: about `threads x seconds` on an otherwise idle machine, less
    when other processes take the cores."""
    result: Any = None


def measure(fn: Callable[[], Any], before: Callable[[], None] | None = None) -> Sample:
    """Runs `before()` (untimed), then times `fn()` while sampling the RSS."""
    if before is not None:
        before()
    release_free_memory()
    baseline = rss_bytes()
    with RSSSampler() as sampler:
        cpu_start = time.process_time()
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
    return Sample(seconds, (sampler.peak - baseline) / MB, cpu_seconds, result)


@dataclass
class Stats:
    """The samples of one model on one workload."""

    seconds: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    last_result: Any = None

    def add(self, sample: Sample) -> None:
        self.seconds.append(sample.seconds)
        self.peak_rss_mb.append(sample.peak_rss_mb)
        self.cpu_seconds.append(sample.cpu_seconds)
        self.last_result = sample.result

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def cpu_utilisation(self) -> float:
        """Median of CPU time / wall time over the runs (cores kept busy)."""
        return statistics.median(c / s for c, s in zip(self.cpu_seconds, self.seconds, strict=True) if s > 0)

    @property
    def peak_mb(self) -> float:
        """The largest RSS increase over the timed runs."""
        return max(self.peak_rss_mb)

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "min_s": self.min,
            "samples_s": [round(s, 6) for s in self.seconds],
            "peak_rss_mb": self.peak_mb,
            "peak_rss_mb_samples": [round(m, 1) for m in self.peak_rss_mb],
            "cpu_s_samples": [round(c, 6) for c in self.cpu_seconds],
            "cpu_utilisation": self.cpu_utilisation,
        }


@dataclass
class Candidate:
    """One model's run on a workload: `fn` is timed, `before` (e.g. zeroing gradients) runs untimed before it."""

    name: str
    fn: Callable[[], Any]
    before: Callable[[], None] | None = None


def run_alternating(
    candidates: list[Candidate], *, repeats: int, warmup: int, log: Callable[[str], None] = print
) -> dict[str, Stats]:
    """`warmup` untimed runs per candidate, then `repeats` rounds in which every candidate runs once, in order
    (ours, OpenFlamingo, ours, OpenFlamingo, ...)."""
    for candidate in candidates:
        for _ in range(warmup):
            if candidate.before is not None:
                candidate.before()
            candidate.fn()
    stats = {candidate.name: Stats() for candidate in candidates}
    for repeat in range(repeats):
        parts = []
        for candidate in candidates:
            sample = measure(candidate.fn, candidate.before)
            stats[candidate.name].add(sample)
            parts.append(
                f"{candidate.name} {sample.seconds:.3f}s (+{sample.peak_rss_mb:.0f} MB, "
                f"cpu/wall {sample.cpu_seconds / max(sample.seconds, 1e-9):.2f})"
            )
        log(f"    run {repeat + 1}/{repeats}: " + ", ".join(parts))
    return stats
