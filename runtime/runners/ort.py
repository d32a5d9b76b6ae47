"""onnxruntime CPU sessions, configured once for every command."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.host import physical_cores
from scarlet_deploy.runtime.runners.base import Runner


@dataclass(frozen=True)
class OrtOptions:
    threads: int | None = None  # None: physical cores
    opt_level: str = "all"  # disable | basic | extended | all
    execution_mode: str = "sequential"  # sequential | parallel
    memory_arena: bool = True


def make_session(path: str | os.PathLike, options: OrtOptions = OrtOptions(), profile_prefix: str | None = None):
    """An onnxruntime CPU session; with `profile_prefix`, onnxruntime's profiler writes there."""
    import onnxruntime as ort

    if not os.path.exists(path):
        raise ScarletError(f"ONNX model {path} does not exist; create it with `scarlet export` (or `make export`).")
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.threads or physical_cores()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[options.opt_level]
    so.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if options.execution_mode == "parallel"
                         else ort.ExecutionMode.ORT_SEQUENTIAL)
    so.enable_cpu_mem_arena = options.memory_arena
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ScarletError(f"onnxruntime cannot load {path}: {e}. Re-export it; the file may be truncated.") from e


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
        from scarlet_deploy.runtime.core.artifacts import read_manifest

        return {"name": self.name, "kind": self.kind, "path": self.path, "manifest": read_manifest(self.path)}
