"""This machine's measured FP32, BF16 and INT8 peaks: the yardsticks for a backend's achieved GOP/s.

Each peak is a large GEMM run through a runtime's own CPU kernels, with the bench's thread count:
- FP32: onnxruntime `MatMul` (MLAS SGEMM), the kernels our float models run on;
- BF16: the faster of OpenVINO `MatMul` compiled with INFERENCE_PRECISION_HINT bf16 (the
  kernels ov-bf16 runs on) and torch.mm on bfloat16 tensors (oneDNN, the kernels
  torch-compile-bf16 reaches), each where installed; both use AMX-BF16 or AVX512-BF16. Only on
  CPUs with native bf16: elsewhere it would be emulated, which is nobody's ceiling;
- INT8: onnxruntime `MatMulInteger` (u8 x s8 QGEMM; VNNI or AMX where the CPU has them).
A backend's rate is a share of the peak of its precision only (`peak_kind`). A square GEMM is
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

from scarlet_deploy.runtime.core.host import HOST, cpu_isa, physical_cores

KINDS = ("fp32", "bf16", "int8")


@dataclass
class Peak:
    gops: float  # best rate seen, 1e9 multiply-adds x 2 per second
    kind: str  # fp32 | bf16 | int8
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


BF16_ISA = ("BF16", "AMX-BF16")  # runtime.core.host.ISA_FLAGS names of native bf16 dot products


def peak_unavailable(kind: str, isa: dict[str, bool] | None | object = HOST) -> str | None:
    """Why the `kind` peak cannot be measured here, or None. Only bf16 can be missing: on a CPU
    without native bf16 dot products a bf16 GEMM is emulated or widened to f32, and its rate
    would be nobody's ceiling."""
    if kind != "bf16":
        return None
    isa = cpu_isa() if isa is HOST else isa
    if isa is None:
        return "no BF16 peak: this CPU's flags cannot be read (no /proc/cpuinfo)"
    if not any(isa[name] for name in BF16_ISA):
        return "no BF16 peak: this CPU has no native bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo)"
    return None


def _best_seconds(run, seconds: float) -> float:
    run()  # warm-up: thread pool, packed B, compiled kernels
    best, start = float("inf"), time.perf_counter()
    while True:
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start >= seconds:
            break
    # best, not mean: the question is what the cores can do, not how busy the machine was.
    return best


def _openvino_bf16(n: int, threads: int):
    """A run() of the FP32 GEMM graph on OpenVINO, float ops lowered to bf16, as ov-bf16 compiles a model."""
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    core = ov.Core()
    model = core.read_model(_gemm_model("fp32", n).SerializeToString(), b"")
    compiled = core.compile_model(model, "CPU", {props.inference_num_threads: threads,
                                                 hints.performance_mode: hints.PerformanceMode.LATENCY,
                                                 hints.enable_cpu_pinning: False,
                                                 hints.inference_precision: ov.Type.bf16})
    request = compiled.create_infer_request()
    a = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    return lambda: request.infer({0: a})


def _torch_bf16(n: int, threads: int):
    """A run() of torch.mm on bf16 tensors (oneDNN's bf16 GEMM, the kernels torch-compile-bf16 reaches)."""
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(n, n, generator=g).to(torch.bfloat16) for _ in range(2))
    return lambda: torch.mm(a, b)


def _bf16_methods(n: int, threads: int) -> list[tuple[str, object]]:
    """(method, run) for each bf16 GEMM whose runtime is installed: OpenVINO's and torch's."""
    from scarlet_deploy.runtime.runners.openvino import openvino_missing

    out = []
    if openvino_missing() is None:
        out.append((f"OpenVINO MatMul, INFERENCE_PRECISION_HINT bf16, {n}x{n}x{n}", lambda: _openvino_bf16(n, threads)))
    try:
        import torch  # noqa: F401

        out.append((f"torch.mm bfloat16 (oneDNN), {n}x{n}x{n}", lambda: _torch_bf16(n, threads)))
    except ImportError:
        pass
    return out


def measure_peak(kind: str = "fp32", seconds: float = 1.0, n: int = 1024, threads: int | None = None) -> Peak | None:
    """Best rate of `n`x`n` GEMMs on a runtime's CPU kernels, run for about `seconds` (after a warm-up);
    None where the kind cannot be measured here (`peak_unavailable`). bf16 runs every installed
    method for `seconds` each and keeps the fastest, named: the ceiling is the best kernel's."""
    if kind not in KINDS:
        raise ValueError(f"peak kind {kind!r} is not one of {KINDS}")
    if peak_unavailable(kind):
        return None
    threads = threads or physical_cores()
    if kind == "bf16":
        methods = _bf16_methods(n, threads)
        if not methods:
            return None
        timed = [(_best_seconds(make(), seconds), method) for method, make in methods]
        best, method = min(timed)
        method += f", best of {seconds:g} s" + (f" (faster of {len(timed)} methods)" if len(timed) > 1 else "")
    else:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(_gemm_model(kind, n).SerializeToString(), so, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(1)
        a = rng.standard_normal((n, n), dtype=np.float32) if kind == "fp32" else rng.integers(0, 256, (n, n), dtype=np.uint8)
        best = _best_seconds(lambda: sess.run(None, {"A": a}), seconds)
        op = "MatMul float32" if kind == "fp32" else "MatMulInteger uint8 x int8"
        method = f"onnxruntime {op} {n}x{n}x{n}, best of {seconds:g} s"
    return Peak(gops=2 * n ** 3 / best / 1e9, kind=kind, n=n, threads=threads, seconds=seconds, method=method)


def peak_kind(backend: str) -> str | None:
    """Which CPU peak a backend's rate is a share of: the precision its bulk of MACs runs in.

    INT8 models (ov-int8-bf16 included: its convolutions are INT8, only what stays float is
    bf16) -> int8; bf16 float models -> bf16; other CPU float models -> fp32. None for GPU
    backends (a CPU peak says nothing there).
    """
    if backend.startswith("trt"):
        return None
    if "int8" in backend:
        return "int8"
    return "bf16" if backend.endswith("bf16") else "fp32"


def share_of_peak(achieved_gops: float, peak: Peak | None) -> float | None:
    """Percent of `peak`, or None when there is no peak or the peak is below what was achieved:
    then the yardstick is wrong, and a figure above 100 % would be printed as if it meant something."""
    if peak is None or peak.gops <= 0 or achieved_gops > peak.gops:
        return None
    return 100 * achieved_gops / peak.gops
