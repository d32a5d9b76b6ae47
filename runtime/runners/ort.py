"""onnxruntime CPU sessions, configured once for every command.

Latency mode (`infer`): one session whose intra-op pool spans every physical core.
Throughput mode (`infer_many`): a second session with `threads_per_stream` intra-op threads,
run from `threads // threads_per_stream` caller threads at once. One session serves them all
(`InferenceSession.run` is thread-safe and releases the GIL), so weights are held once; with
one intra-op thread a run executes on its caller's thread, with no pool hand-off per node.
"""
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
    # Throughput mode: intra-op threads per concurrent run; None: ort_threads_per_stream(threads).
    threads_per_stream: int | None = None


def ort_threads_per_stream(threads: int) -> int:
    """Intra-op threads per stream in throughput mode: 1, one stream per core.

    Why: a convolution network's small layers cannot keep several threads busy, and each node
    pays a thread-pool hand-off; single-threaded runs on their callers' threads pay neither.
    A first check (SCARLET-A, 2 cores, batch 8, on a machine other processes kept ~60 % busy)
    had two single-threaded streams at 1.3-2.7x one two-threaded session; a quiet `make bench`
    (ORT FP32 rows of both modes) is the figure that confirms or overturns this default.
    """
    return 1


def throughput_plan(threads: int, threads_per_stream: int | None = None) -> tuple[int, int]:
    """(streams, threads per stream) for throughput mode on `threads` cores: what OrtRunner.infer_many
    runs, and how many Triton instances `scarlet serve` starts on a CPU by default."""
    per = min(threads, threads_per_stream or ort_threads_per_stream(threads))
    return max(1, threads // per), per


def make_session(path: str | os.PathLike, options: OrtOptions = OrtOptions(), profile_prefix: str | None = None,
                 threads: int | None = None):
    """An onnxruntime CPU session (`threads` intra-op threads, default options.threads);
    with `profile_prefix`, onnxruntime's profiler writes there."""
    import onnxruntime as ort

    if not os.path.exists(path):
        raise ScarletError(f"ONNX model {path} does not exist; create it with `scarlet export` (or `make export`).")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or options.threads or physical_cores()
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
        self.bulk = None  # the throughput-mode session, made on first infer_many
        self.pool = None

    def load(self) -> "OrtRunner":
        if self.session is None:
            self.session = make_session(self.path, self.options)
            self.input_name = self.session.get_inputs()[0].name
        return self

    def infer(self, x: np.ndarray) -> np.ndarray:
        if self.session is None:
            self.load()
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})[0]

    def _plan(self) -> tuple[int, int]:
        """(streams, threads per stream) of throughput mode."""
        return throughput_plan(self.options.threads or physical_cores(), self.options.threads_per_stream)

    def streams(self, batch: int) -> int:
        return self._plan()[0]

    def infer_many(self, batches) -> list[np.ndarray]:
        streams, per = self._plan()
        if streams == 1:
            return super().infer_many(batches)
        if self.bulk is None:
            from concurrent.futures import ThreadPoolExecutor

            self.bulk = make_session(self.path, self.options, threads=per)
            self.pool = ThreadPoolExecutor(streams, thread_name_prefix="ort-stream")
        name = self.bulk.get_inputs()[0].name
        run = lambda x: self.bulk.run(None, {name: np.ascontiguousarray(x, np.float32)})[0]  # noqa: E731
        return list(self.pool.map(run, batches))

    def close(self) -> None:
        self.session = self.bulk = None
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def describe(self) -> dict[str, Any]:
        from scarlet_deploy.runtime.core.artifacts import read_manifest

        streams, per = self._plan()
        return {"name": self.name, "kind": self.kind, "path": self.path, "manifest": read_manifest(self.path),
                "throughput": {"streams": streams, "threads_per_stream": per}}
