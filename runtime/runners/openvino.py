"""OpenVINO (CPU) as a Runner: the very ONNX files onnxruntime runs, FP32 and our Q/DQ INT8 as they are.

Four backend names, one runner:
- `ov`: float ops in f32 (INFERENCE_PRECISION_HINT f32). OpenVINO's CPU plugin otherwise picks
  bf16 by itself on CPUs with AVX512_BF16 or AMX, which would make `ov` a silent bf16 backend.
- `ov-bf16`: float ops in bf16, only where the CPU has BF16 instructions (`bf16_unsupported`);
  without them a bf16 row would measure an emulation or plain f32.
- `ov-int8`: a Q/DQ ONNX read as it is (OpenVINO turns Q/DQ pairs into its own INT8 kernels);
  what stays float runs in f32, so its parity measures the quantisation and nothing else. Bench
  runs the model `scarlet calibrate --target ov` writes, whose Q/DQ pairs sit where OpenVINO fuses.
- `ov-int8-bf16`: the same Q/DQ model with what stays float (the layers calibration kept in float,
  softmax, pooling, the Q/DQ scale arithmetic) in bf16, as TensorRT's FP16 high precision does
  for INT8 engines; only on CPUs with BF16, and gated in verify on its own (bf16 rounding on top
  of the quantisation).

Latency mode (`infer`), as a user who calls it on one batch at a time wants it: PERFORMANCE_HINT
LATENCY (one stream, every thread on the one request), INFERENCE_NUM_THREADS = physical cores,
as onnxruntime gets, and threads not pinned to cores (see OvOptions).
Throughput mode (`infer_many`): the same model compiled a second time with PERFORMANCE_HINT
THROUGHPUT, so OpenVINO splits the threads into streams; an AsyncInferQueue of as many requests
as OpenVINO asks for (optimal_number_of_infer_requests) keeps every stream fed.
Each batch size is compiled once with a static shape: OpenVINO picks faster INT8 kernels for a
static batch than for a dynamic one (SCARLET-A INT8, batch 8: ~1.8x).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.host import ISA_FLAGS, cpu_isa, physical_cores
from scarlet_deploy.runtime.runners.base import Runner

OV_BACKENDS = ("ov", "ov-bf16", "ov-int8", "ov-int8-bf16")
BF16_BACKENDS = ("ov-bf16", "ov-int8-bf16")  # float ops in bf16
BF16_ISA = ("BF16", "AMX-BF16")  # runtime.core.host.ISA_FLAGS names of native bf16 dot products


@dataclass(frozen=True)
class OvOptions:
    threads: int | None = None  # INFERENCE_NUM_THREADS; None: physical cores
    precision: str = "f32"  # INFERENCE_PRECISION_HINT for the float ops: f32 | bf16
    hint: str = "LATENCY"  # PERFORMANCE_HINT: LATENCY | THROUGHPUT
    # ENABLE_CPU_PINNING. Off, as onnxruntime's threads are: on a machine other processes share, a thread
    # pinned to a busy core waits for it (SCARLET-A INT8, batch 8, busy 2-core host: 1.46x ORT INT8 unpinned, 1.30x pinned).
    pin_threads: bool = False

    @classmethod
    def for_backend(cls, backend: str, threads: int | None = None) -> OvOptions:
        return cls(threads=threads, precision="bf16" if backend in BF16_BACKENDS else "f32")


def openvino_missing() -> str | None:
    """Why OpenVINO cannot be imported here, or None."""
    try:
        import openvino  # noqa: F401
    except ImportError as e:
        return (f"OpenVINO is not installed ({e}); install the optional extra: "
                "pip install -c constraints.txt 'scarlet-deploy[openvino]'")
    return None


def bf16_unsupported(isa: dict[str, bool] | None, capabilities: list[str] | None, backend: str = "ov-bf16") -> str | None:
    """Why bf16 inference should not run on this CPU, or None when it should.

    `isa`: runtime.core.host.cpu_isa() (None when the CPU's flags cannot be read); `capabilities`:
    OpenVINO's CPU OPTIMIZATION_CAPABILITIES (None before OpenVINO is asked). Both must say BF16: the
    flags that the hardware has it, OpenVINO that its kernels use it.
    """
    flags = " or ".join(f for name in BF16_ISA for f in ISA_FLAGS[name])
    if isa is None:
        return f"this CPU's flags cannot be read (no /proc/cpuinfo), so whether it has {flags} is unknown: {backend} is skipped"
    if not any(isa[name] for name in BF16_ISA):
        return (f"this CPU has no native bf16 ({flags} not in /proc/cpuinfo flags), so {backend} is skipped: "
                "OpenVINO would emulate bf16 (slower than f32) or run f32, and neither is a bf16 figure")
    if capabilities is not None and "BF16" not in capabilities:
        return (f"OpenVINO does not offer BF16 on this CPU (OPTIMIZATION_CAPABILITIES: {', '.join(capabilities)}), "
                f"so {backend} is skipped")
    return None


def _core():
    import openvino as ov

    return ov.Core()


def ov_unavailable(backend: str) -> str | None:
    """Why `backend` (one of OV_BACKENDS) cannot run here, or None when it can: a skip reason, never an error."""
    missing = openvino_missing()
    if missing:
        return missing
    if backend in BF16_BACKENDS:
        return bf16_unsupported(cpu_isa(), list(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")), backend)
    return None


class OvRunner(Runner):
    kind = "ov"

    def __init__(self, path: str | os.PathLike, name: str | None = None, options: OvOptions = OvOptions()):
        self.path = str(path)
        self.name = name or os.path.basename(self.path)
        self.options = options
        self.model = None
        self.requests: dict[int, Any] = {}  # batch size -> infer request of the model compiled for it
        self.queues: dict[int, Any] = {}  # batch size -> AsyncInferQueue of the THROUGHPUT-compiled model

    def load(self) -> OvRunner:
        if self.model is not None:
            return self
        reason = ov_unavailable("ov-bf16" if self.options.precision == "bf16" else "ov")
        if reason:
            raise ScarletError(reason + ".")
        if not os.path.exists(self.path):
            raise ScarletError(f"ONNX model {self.path} does not exist; create it with `scarlet export` (or `make export`).")
        self.core = _core()
        try:
            self.model = self.core.read_model(self.path)
        except RuntimeError as e:  # OpenVINO reports unreadable or unsupported graphs as RuntimeError
            raise ScarletError(f"OpenVINO cannot read {self.path}: {e}. Re-export it; the file may be truncated.") from e
        if len(self.model.inputs) != 1:
            raise ScarletError(f"{self.path} has {len(self.model.inputs)} inputs; an image classifier has one.")
        self._request(1)  # compiled once here, so an unsupported graph fails at load, not mid-run
        return self

    def _config(self, hint: str | None = None) -> dict[str, Any]:
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        return {props.inference_num_threads: self.options.threads or physical_cores(),
                hints.performance_mode: getattr(hints.PerformanceMode, hint or self.options.hint),
                hints.enable_cpu_pinning: self.options.pin_threads,
                hints.inference_precision: {"f32": ov.Type.f32, "bf16": ov.Type.bf16}[self.options.precision]}

    def _compile(self, batch: int, hint: str | None = None):
        model = self.model.clone()
        shape = model.inputs[0].get_partial_shape()
        shape[0] = batch
        try:
            model.reshape({model.inputs[0]: shape})
            return self.core.compile_model(model, "CPU", self._config(hint))
        except RuntimeError as e:  # e.g. an ONNX exported with a fixed --batch other than this one
            raise ScarletError(f"OpenVINO cannot compile {self.path} for batch {batch}: {e}.") from e

    def _request(self, batch: int):
        if batch not in self.requests:
            self.requests[batch] = self._compile(batch).create_infer_request()
        return self.requests[batch]

    def _queue(self, batch: int):
        if batch not in self.queues:
            import openvino as ov
            import openvino.properties as props

            compiled = self._compile(batch, "THROUGHPUT")
            self.queues[batch] = ov.AsyncInferQueue(compiled, compiled.get_property(props.optimal_number_of_infer_requests))
        return self.queues[batch]

    def streams(self, batch: int) -> int:
        if self.model is None:
            self.load()
        return len(self._queue(batch))

    def infer_many(self, batches) -> list[np.ndarray]:
        if self.model is None:
            self.load()
        out: list[np.ndarray | None] = [None] * len(batches)

        def done(request, i: int) -> None:  # runs on OpenVINO's thread; the buffer is reused by the next job
            out[i] = request.get_output_tensor(0).data.copy()

        for size in sorted({x.shape[0] for x in batches}):
            queue = self._queue(size)
            queue.set_callback(done)
            for i, x in enumerate(batches):
                if x.shape[0] == size:
                    queue.start_async({0: np.ascontiguousarray(x, np.float32)}, userdata=i)
            queue.wait_all()
        return out  # type: ignore[return-value]

    def infer(self, x: np.ndarray) -> np.ndarray:
        if self.model is None:
            self.load()
        x = np.ascontiguousarray(x, np.float32)
        request = self._request(x.shape[0])
        request.infer({0: x})
        # The output tensor is the request's own buffer, overwritten by its next run: hand out a copy.
        return request.get_output_tensor(0).data.copy()

    def close(self) -> None:
        self.requests.clear()
        self.queues.clear()
        self.model = None

    def describe(self) -> dict[str, Any]:
        from dataclasses import asdict

        from scarlet_deploy.runtime.core.artifacts import read_manifest

        return {"name": self.name, "kind": self.kind, "path": self.path, "options": asdict(self.options),
                "manifest": read_manifest(self.path)}
