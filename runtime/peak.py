"""This machine's measured FP32 and INT8 peaks: the yardsticks for a backend's achieved GOP/s.

Each peak is a large GEMM run through onnxruntime's own CPU kernels (MLAS), the ones our
float and INT8 models run on: `MatMul` (SGEMM) for float32 and `MatMulInteger` (u8 x s8
QGEMM, VNNI where the CPU has it) for INT8, with the bench's thread count. A square GEMM is
the most compute-bound thing those kernels do, so a convolution network on the same cores
stays below it. An earlier version used torch.mm, which on some CPUs runs AVX2 kernels where
MLAS uses AVX-512: models then ran at "116 % of peak". A share above 100 % means the
yardstick is wrong, so the bench prints none (see `share_of_peak`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from scarlet_deploy.runtime.core.host import physical_cores

KINDS = ("fp32", "int8")


@dataclass
class Peak:
    gops: float  # best rate seen, 1e9 multiply-adds x 2 per second
    kind: str  # fp32 | int8
    n: int  # matrix side
    threads: int
    seconds: float  # how long it was measured
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _gemm_model(kind: str, n: int):
    """A one-node ONNX graph: input A (n x n) times a constant B (n x n)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "fp32":
        b = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "B")
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        a_type, y_type, inits = TensorProto.FLOAT, TensorProto.FLOAT, [b]
    else:
        b = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "B")
        zp_a = numpy_helper.from_array(np.array(128, np.uint8), "a_zero")
        zp_b = numpy_helper.from_array(np.array(0, np.int8), "b_zero")
        node = helper.make_node("MatMulInteger", ["A", "B", "a_zero", "b_zero"], ["Y"])
        a_type, y_type, inits = TensorProto.UINT8, TensorProto.INT32, [b, zp_a, zp_b]
    graph = helper.make_graph([node], f"peak_{kind}", [helper.make_tensor_value_info("A", a_type, [n, n])],
                              [helper.make_tensor_value_info("Y", y_type, [n, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def measure_peak(kind: str = "fp32", seconds: float = 1.0, n: int = 1024, threads: int | None = None) -> Peak:
    """Best rate of `n`x`n` GEMMs on onnxruntime's CPU kernels, run for about `seconds` (after a warm-up)."""
    import onnxruntime as ort

    if kind not in KINDS:
        raise ValueError(f"peak kind {kind!r} is not one of {KINDS}")
    threads = threads or physical_cores()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(_gemm_model(kind, n).SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n), dtype=np.float32) if kind == "fp32" else rng.integers(0, 256, (n, n), dtype=np.uint8)
    sess.run(None, {"A": a})  # warm-up: thread pool, packed B
    best, start = float("inf"), time.perf_counter()
    while True:
        t0 = time.perf_counter()
        sess.run(None, {"A": a})
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start >= seconds:
            break
    # best, not mean: the question is what the cores can do, not how busy the machine was.
    op = "MatMul float32" if kind == "fp32" else "MatMulInteger uint8 x int8"
    return Peak(gops=2 * n ** 3 / best / 1e9, kind=kind, n=n, threads=threads, seconds=seconds,
                method=f"onnxruntime {op} {n}x{n}x{n}, best of {seconds:g} s")


def peak_kind(backend: str) -> str | None:
    """Which CPU peak a backend's rate is a share of; None for GPU backends (a CPU peak says nothing there)."""
    if backend.startswith("trt"):
        return None
    return "int8" if backend.endswith("int8") else "fp32"


def share_of_peak(achieved_gops: float, peak: Peak | None) -> float | None:
    """Percent of `peak`, or None when there is no peak or the peak is below what was achieved:
    then the yardstick is wrong, and a figure above 100 % would be printed as if it meant something."""
    if peak is None or peak.gops <= 0 or achieved_gops > peak.gops:
        return None
    return 100 * achieved_gops / peak.gops
