"""Backends behind one small interface (like Polygraphy's runners): load, infer, close.

verify and bench only ever see `Runner`, so PyTorch, onnxruntime and TensorRT are
measured alike. `infer` takes a float32 NCHW batch and returns float32 logits (N, 1000).
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from .ort import OrtOptions, make_session


class Runner(ABC):
    name: str = "runner"
    kind: str = "?"  # torch | ort | trt

    def load(self) -> "Runner":
        return self

    @abstractmethod
    def infer(self, x: np.ndarray) -> np.ndarray: ...

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        """What goes into reports: name, kind, and the artifact manifest where there is one."""
        return {"name": self.name, "kind": self.kind}

    def __enter__(self) -> "Runner":
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()


class TorchRunner(Runner):
    kind = "torch"

    def __init__(self, model, name: str = "pytorch", threads: int | None = None):
        self.model = model.eval()
        self.name = name
        self.threads = threads

    def load(self) -> "TorchRunner":
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        return self

    def infer(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()


class OrtRunner(Runner):
    kind = "ort"

    def __init__(self, path: str | os.PathLike, name: str | None = None, options: OrtOptions = OrtOptions()):
        self.path = str(path)
        self.name = name or os.path.basename(self.path)
        self.options = options
        self.session = None

    def load(self) -> "OrtRunner":
        if self.session is None:
            self.session = make_session(self.path, self.options)
            self.input_name = self.session.get_inputs()[0].name
        return self

    def infer(self, x: np.ndarray) -> np.ndarray:
        if self.session is None:
            self.load()
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})[0]

    def close(self) -> None:
        self.session = None

    def describe(self) -> dict[str, Any]:
        from export.artifacts import read_manifest

        return {"name": self.name, "kind": self.kind, "path": self.path, "manifest": read_manifest(self.path)}
