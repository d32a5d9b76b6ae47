from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass
class Ratio:
    median: float
    low: float
    high: float

    def text(self) -> str:
        return f"{self.median:.2f} ({self.low:.2f}-{self.high:.2f})"


@dataclass
class CellStats:
    """One (model, backend, batch) measurement, from per-round call latencies in seconds."""

    batch: int
    calls: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # images/s, median round
    throughput_rounds: list[float]
    spread_pct: float  # (max - min) / median of the rounds' throughput

    @classmethod
    def from_rounds(cls, rounds: Sequence[Sequence[float]], batch: int) -> "CellStats":
        if not rounds or any(len(r) == 0 for r in rounds):
            raise ValueError("every round needs at least one timed call")
        pooled = np.concatenate([np.asarray(r, np.float64) for r in rounds]) * 1e3
        p50, p90, p99 = np.percentile(pooled, [50, 90, 99])
        tput = [batch * len(r) / float(np.sum(r)) for r in rounds]
        med = float(np.median(tput))
        return cls(batch=batch, calls=int(pooled.size), p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99),
                   mean_ms=float(pooled.mean()), throughput=med, throughput_rounds=tput,
                   spread_pct=100.0 * (max(tput) - min(tput)) / med)


def paired_ratio(rounds: Sequence[float], reference: Sequence[float]) -> Ratio:
    """Speed-up of `rounds` over `reference`, round by round (they ran next to each other)."""
    if len(rounds) != len(reference) or not rounds:
        raise ValueError("paired ratios need the same, non-zero number of rounds")
    r = np.asarray(rounds, np.float64) / np.asarray(reference, np.float64)
    return Ratio(float(np.median(r)), float(r.min()), float(r.max()))


def round_orders(names: Sequence[str], repeats: int) -> list[list[str]]:
    """Rotate the order every round so no backend always runs first (caches, turbo budget)."""
    n = len(names)
    return [[names[(i + r) % n] for i in range(n)] for r in range(repeats)]


def measure_interleaved(calls: dict[str, Callable[[], list[float]]], repeats: int, seconds: float,
                        warmup_s: float = 0.5, min_calls: int = 3, progress=None,
                        settle_s: float = 0.05) -> dict[str, list[list[float]]]:
    """Run each timed call (returns latencies in s of the runs it made) for ~`seconds` per round, interleaved.

    Between rounds the machine idles `settle_s`: onnxruntime's and OpenMP's worker threads spin
    for a while after their last task, and must not steal cores from the next backend's round.
    """
    for call in calls.values():  # warm-up: thread pools, arenas, lazy init, caches; not recorded
        start, n = time.perf_counter(), 0
        while n < 2 or time.perf_counter() - start < warmup_s:
            call()
            n += 1
    out: dict[str, list[list[float]]] = {name: [] for name in calls}
    for order in round_orders(list(calls), repeats):
        for name in order:
            time.sleep(settle_s)
            lat: list[float] = []
            start = time.perf_counter()
            while len(lat) < min_calls or time.perf_counter() - start < seconds:
                lat += calls[name]()
            out[name].append(lat)
            if progress is not None:
                progress.update(1)
    return out


def wall_timer(runner, x: np.ndarray) -> Callable[[], list[float]]:
    def call() -> list[float]:
        t0 = time.perf_counter()
        runner.infer(x)
        return [time.perf_counter() - t0]

    return call


# Batches per throughput-mode call, per stream: enough that filling and draining the streams
# (the first and last batch run with idle streams beside them) is a small part of the call.
BATCHES_PER_STREAM = 4


def throughput_timer(runner, x: np.ndarray) -> Callable[[], list[float]]:
    """A timed call of `runner.infer_many` on `BATCHES_PER_STREAM * streams` copies of `x`.

    Its wall time is spread evenly over the batches, so CellStats' images / busy time is the
    throughput mode's img/s; its percentiles are per-batch averages, not latencies, and are not reported.
    """
    n = BATCHES_PER_STREAM * runner.streams(x.shape[0])
    batches = [x] * n

    def call() -> list[float]:
        t0 = time.perf_counter()
        runner.infer_many(batches)
        return [(time.perf_counter() - t0) / n] * n

    return call
