"""This machine's measured float32 peak: the yardstick for a backend's achieved GFLOP/s.

A large square matmul is the most compute-bound thing a BLAS does, so its rate is the
practical ceiling for convolutions on the same cores (the datasheet peak is higher and
unreachable). torch's GEMM (oneDNN/MKL) is used because it is the fastest the project
already ships; numpy's OpenBLAS is within a few percent and would add nothing.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Peak:
    gflops: float  # best matmul rate seen
    n: int  # matrix side
    threads: int
    seconds: float  # how long it was measured
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_peak(seconds: float = 1.0, n: int = 2048, threads: int | None = None) -> Peak:
    """Best rate of `n`x`n` float32 matmuls run for about `seconds` (after one warm-up)."""
    import torch

    from scarlet_deploy.runtime.core.host import physical_cores

    threads = threads or physical_cores()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        c = torch.empty(n, n)
        torch.mm(a, b, out=c)  # warm-up: thread pool and packing buffers
        best, start = float("inf"), time.perf_counter()
        while True:
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            best = min(best, time.perf_counter() - t0)
            if time.perf_counter() - start >= seconds:
                break
    finally:
        torch.set_num_threads(previous)
    # best, not mean: the question is what the cores can do, not how busy the machine was.
    return Peak(gflops=2 * n ** 3 / best / 1e9, n=n, threads=threads, seconds=seconds,
                method=f"torch.mm float32 {n}x{n}, best of {seconds:g} s")
