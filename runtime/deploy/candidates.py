"""Every backend and precision `scarlet deploy` knows, and whether this machine can run it.

A candidate names a Runner backend (runtime/runners/registry.open_runner), the precision it
computes in, and the artifact it runs; the package's Triton repository and `scarlet serve
--package` run the same artifact on the same runtime.
"""
from __future__ import annotations

from dataclasses import dataclass

from scarlet_deploy.runtime.core.errors import ScarletError


@dataclass(frozen=True)
class Candidate:
    name: str  # the Runner backend, as bench and verify name it
    precision: str  # fp32 | bf16 | fp16 | int8: what the arithmetic is
    runtime: str  # onnxruntime | openvino | tensorrt
    artifact: str  # fp32 | fp16 | int8-ort | int8-ov | plan-fp16 | plan-int8
    summary: str

    @property
    def triton_backend(self) -> str:
        """`scarlet triton`'s --backend for the package's repository (ONNX artifacts)."""
        return "ov" if self.runtime == "openvino" else "ort"

    @property
    def serve_backend(self) -> str:
        """`scarlet serve`'s --backend: OpenVINO runs a Q/DQ ONNX as INT8 under plain `ov`."""
        return {"ov-bf16": "ov-bf16", "ov-int8-bf16": "ov-int8-bf16"}.get(self.name, "ov" if self.runtime == "openvino" else "ort")


# Order matters twice: within a precision tier the earlier candidate wins a tie within noise, and
# reports list them in this order.
CANDIDATES: tuple[Candidate, ...] = (
    Candidate("ort", "fp32", "onnxruntime", "fp32", "onnxruntime, the exported FP32 ONNX"),
    Candidate("ov", "fp32", "openvino", "fp32", "OpenVINO, FP32 ONNX, float ops forced to f32"),
    Candidate("ov-bf16", "bf16", "openvino", "fp32", "OpenVINO, FP32 ONNX, float ops in bf16"),
    Candidate("ort-fp16", "fp16", "onnxruntime", "fp16", "onnxruntime, FP16 ONNX (float32 I/O)"),
    Candidate("ort-int8", "int8", "onnxruntime", "int8-ort", "onnxruntime INT8 kernels, Q/DQ ONNX (target ort)"),
    Candidate("ov-int8", "int8", "openvino", "int8-ov", "OpenVINO INT8 kernels, Q/DQ ONNX (target ov), float ops f32"),
    Candidate("ov-int8-bf16", "int8", "openvino", "int8-ov", "OpenVINO INT8 kernels, Q/DQ ONNX (target ov), float ops in bf16"),
    Candidate("trt-fp16", "fp16", "tensorrt", "plan-fp16", "TensorRT 11 plan from the FP16 ONNX (GPU)"),
    Candidate("trt-int8", "int8", "tensorrt", "plan-int8", "TensorRT 11 plan from the Q/DQ ONNX (target trt, GPU)"),
)
BY_NAME = {c.name: c for c in CANDIDATES}


def get(name: str) -> Candidate:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ScarletError(f"unknown backend {name!r} for deploy; choose from {', '.join(BY_NAME)} "
                           "(comma-separated, e.g. --backends ort,ort-int8).") from None


def select(names: list[str] | None) -> list[Candidate]:
    """The candidates to consider, in CANDIDATES order; `names` (--backends) narrows the list."""
    if not names:
        return list(CANDIDATES)
    wanted = {get(n).name for n in names}
    return [c for c in CANDIDATES if c.name in wanted]


def unavailable(c: Candidate) -> str | None:
    """Why `c` cannot run on this machine, or None."""
    if c.runtime == "openvino":
        from scarlet_deploy.runtime.runners.openvino import ov_unavailable

        return ov_unavailable(c.name)
    if c.runtime == "tensorrt":
        from scarlet_deploy.runtime.runners.trt import trt_unavailable

        return trt_unavailable()
    return None  # onnxruntime is a dependency of the package itself
