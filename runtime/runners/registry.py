"""One place that turns a backend name and an artifact into a Runner, for verify, bench and serve alike."""
from __future__ import annotations

import os
from typing import Any

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.runners.base import Runner
from scarlet_deploy.runtime.runners.openvino import OvOptions, OvRunner
from scarlet_deploy.runtime.runners.ort import OrtOptions, OrtRunner

KINDS = ("torch", "ort", "ov", "trt")
# Runtimes that take any of our ONNX files (FP32, FP16, Q/DQ INT8) as they are; ov-bf16 an FP32 one,
# ov-int8-bf16 a Q/DQ one calibrated for OpenVINO.
ONNX_RUNTIMES = ("ort", "ov", "ov-bf16", "ov-int8-bf16")


def open_runner(kind: str, path: str | os.PathLike | None = None, *, name: str | None = None,
                threads: int | None = None, ort: OrtOptions | None = None, module: Any = None) -> Runner:
    """A runner of `kind` (not loaded yet): torch (eager) and torch-compile[-bf16] over an nn.Module, ort and ov over an ONNX file, trt over a plan.

    Backend names such as `ort-int8` or `trt-fp16` select by their prefix: the precision lives in the artifact.
    `ov-bf16` and `ov-int8-bf16` are the exceptions: the FP32 or the Q/DQ ONNX, with OpenVINO running
    its float ops in bf16.
    """
    family = kind.split("-", 1)[0]
    if family == "torch":
        from scarlet_deploy.runtime.runners.pytorch import TorchCompileRunner, TorchRunner  # lazy: torch is heavy

        if kind.startswith("torch-compile"):
            return TorchCompileRunner(module, name=name or kind, threads=threads,
                                      precision="bf16" if kind.endswith("bf16") else "fp32")
        return TorchRunner(module, name=name or "pytorch", threads=threads)
    if family == "ort":
        options = ort or OrtOptions(threads=threads)
        return OrtRunner(path, name=name or kind, options=options)
    if family == "ov":
        return OvRunner(path, name=name or kind, options=OvOptions.for_backend(kind, threads))
    if family == "trt":
        from scarlet_deploy.runtime.runners.trt import TrtRunner

        return TrtRunner(path, name=name)
    raise ScarletError(f"unknown backend {kind!r}; choose one of: {', '.join(KINDS)}.")
