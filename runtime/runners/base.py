"""Backends behind one small interface (like Polygraphy's runners): load, infer, close.

verify and bench only ever see `Runner`, so PyTorch, onnxruntime and TensorRT are
measured alike. `infer` takes a float32 NCHW batch and returns float32 logits (N, 1000).

Two modes, one interface: `infer` is latency mode (one batch, every core on it, as a user who
waits for each answer calls it); `infer_many` is throughput mode (many batches in flight at
once, `streams(batch)` of them concurrently, as bulk work wants it). A runner without a
concurrent path runs `infer_many` one batch after the other and reports one stream.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np


class Runner(ABC):
    name: str = "runner"
    kind: str = "?"  # torch | ort | trt

    def load(self) -> "Runner":
        return self

    @abstractmethod
    def infer(self, x: np.ndarray) -> np.ndarray: ...

    def infer_many(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Logits of every batch, in order; runners with streams override it to keep several in flight."""
        return [self.infer(x) for x in batches]

    def streams(self, batch: int) -> int:
        """How many batches of `batch` images `infer_many` runs concurrently."""
        return 1

    def close(self) -> None:
        pass

    def infer_bulk(self, x: np.ndarray) -> np.ndarray:
        """Logits of one large batch in throughput mode: split into one part per stream, run at once.

        For bulk work (verify's 64-image batches), where no one waits on a single image."""
        n = min(len(x), self.streams(max(1, len(x) // 2)))
        if n <= 1:
            return self.infer(x)
        return np.concatenate(self.infer_many(np.array_split(x, n)))

    def timed(self, x: np.ndarray) -> list[float]:
        """Seconds per run of one `infer(x)`; runners with their own clocks (CUDA events) override it."""
        t0 = time.perf_counter()
        self.infer(x)
        return [time.perf_counter() - t0]

    def describe(self) -> dict[str, Any]:
        """What goes into reports: name, kind, and the artifact manifest where there is one."""
        return {"name": self.name, "kind": self.kind}

    def __enter__(self) -> "Runner":
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()
