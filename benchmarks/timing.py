"""Timing: device synchronisation, interleaved rounds, medians and quartiles."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a clock read covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(seconds: list[float]) -> dict[str, Any]:
    """Median, quartiles and IQR (ms) of timed samples, with the samples themselves."""
    ms = sorted(s * 1e3 for s in seconds)
    if len(ms) == 1:
        q1 = med = q3 = ms[0]
    else:
        q1, med, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "min": ms[0], "n": len(ms), "samples": ms}


def zero_stats(n: int) -> dict[str, Any]:
    """Stats of a stage that does no work (the reducer of the uncompressed variant)."""
    return {"median": 0.0, "q1": 0.0, "q3": 0.0, "iqr": 0.0, "min": 0.0, "n": n, "samples": [0.0] * n}


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int,
) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved round by round (order rotated) so drift hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)  # rotate, so no function always runs first (or after the same one)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_index >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def per_round_ratios(numerators: list[float], denominators: list[float]) -> dict[str, float]:
    """Median and quartiles of a/b over rounds: with interleaved rounds, drift in machine load cancels in each ratio."""
    ratios = sorted(a / b for a, b in zip(numerators, denominators, strict=True))
    if len(ratios) == 1:
        return {"median": ratios[0], "q1": ratios[0], "q3": ratios[0]}
    q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3}


class StageClock:
    """Seconds between successive marks, the device synchronised at each: one generation timed stage by stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = {}
        synchronize(device)
        self.start = time.perf_counter()

    def mark(self, name: str) -> None:
        """Time since the last mark (or restart) is stage ``name``."""
        synchronize(self.device)
        now = time.perf_counter()
        self.times[name] = now - self.start
        self.start = now

    def restart(self) -> None:
        """Leave the time since the last mark out of every stage (bookkeeping between stages)."""
        self.start = time.perf_counter()
