"""onnxruntime CPU sessions, configured once for every command."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from export.errors import ScarletError


@lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores (hyper-threads share execution units, so ORT gains nothing from them)."""
    try:
        pairs, phys, core = set(), None, None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    pairs.add((phys, core))
        if pairs:
            return min(len(pairs), len(os.sched_getaffinity(0)))
    except OSError:
        pass
    return os.cpu_count() or 1


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
