"""TensorRT 11 runner: check a plan against this TensorRT and GPU, run it and time it with CUDA events.

Plans are built by export.trt_build; a runner only runs.

TensorRT 11 networks are always strongly typed: precision comes from the ONNX tensor
types (FP32 ONNX, FP16 ONNX from export.fp16, INT8 = explicit Q/DQ ONNX); there are no
precision builder flags or calibrators. We check the requested precision against both
the ONNX and the parsed network, so a build can never silently fall back to FP32.

Everything that needs no GPU (batch profiles, timing-cache paths, manifests and their
compatibility with the running TensorRT/GPU, precision checks) is a plain function
that tests call on CPU. `tensorrt` and `cuda.bindings` are imported only when needed.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scarlet_deploy.runtime.core.artifacts import read_manifest, sha256_file
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.runners.base import Runner

TRT_MISSING = "TensorRT 11 is not installed: pip install .[tensorrt] on a machine with an NVIDIA GPU"
CUDA_PYTHON_MISSING = "cuda-python >= 13 is not installed: pip install .[tensorrt] on a machine with an NVIDIA GPU"
NO_GPU = "no CUDA GPU visible"
PLAN_KIND = "tensorrt-plan"


class CaptureError(ScarletError):
    """An engine that cannot be captured in a CUDA graph (it can still run without one)."""


# ----------------------------------------------------------------------------- environment

def import_tensorrt():
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: bindings present but libnvinfer.so.11 missing
        raise ScarletError(f"{TRT_MISSING} (import tensorrt failed: {e}).") from e
    if int(trt.__version__.split(".")[0]) < 11:
        raise ScarletError(f"TensorRT {trt.__version__} is installed, but this backend targets TensorRT 11 "
                           "(strongly typed networks, Q/DQ INT8): pip install 'tensorrt>=11'.")
    return trt


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as e:
        raise ScarletError(f"{CUDA_PYTHON_MISSING} (import cuda.bindings failed: {e}).") from e
    return cudart


def _ck(cudart, result):
    """cuda.bindings calls return (err, *values); raise on error, unwrap the values."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise ScarletError(f"CUDA error {cudart.cudaGetErrorName(err)[1].decode()}: "
                           f"{cudart.cudaGetErrorString(err)[1].decode()}.")
    return values[0] if len(values) == 1 else (tuple(values) or None)


@dataclass(frozen=True)
class RuntimeInfo:
    """What a plan is tied to: the TensorRT version and the GPU it was built on."""

    tensorrt: str
    gpu_name: str
    compute_capability: str  # "9.0"


def require_gpu(device: int = 0) -> RuntimeInfo:
    """TensorRT 11, cuda-python and a visible CUDA GPU, or a ScarletError naming what is missing."""
    trt = import_tensorrt()
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        why = cudart.cudaGetErrorName(err)[1].decode() if err != cudart.cudaError_t.cudaSuccess else "0 devices"
        raise ScarletError(f"{NO_GPU} ({why}): TensorRT engines need an NVIDIA GPU (Turing or newer) with a "
                           "CUDA 13 driver (r580+); check nvidia-smi and CUDA_VISIBLE_DEVICES.")
    if device >= count:
        raise ScarletError(f"CUDA device {device} does not exist ({count} visible).")
    props = _ck(cudart, cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return RuntimeInfo(trt.__version__, name.split("\x00")[0].strip(), f"{props.major}.{props.minor}")


# ----------------------------------------------------------------------------- manifest checks


def trt_unavailable() -> str | None:
    """Why TensorRT backends cannot run here, or None when they can: a skip reason, never an error."""
    try:
        require_gpu()
    except ScarletError as e:
        return str(e).rstrip(".")
    return None

def plan_compatibility(manifest: dict[str, Any], current: RuntimeInfo) -> list[str]:
    """Why a plan cannot run here (empty list: it can). Reads only the manifest and the running versions.

    TensorRT plans are tied to the exact TensorRT version (unless built version-compatible,
    then any later 11.x) and to the GPU model they were tuned on.
    """
    if manifest.get("kind") != PLAN_KIND:
        return [f"its manifest is not a TensorRT plan manifest (kind={manifest.get('kind')!r})"]
    reasons = []
    built = str(manifest.get("tensorrt", "?"))
    if manifest.get("version_compatible"):
        if _version(built)[0] != _version(current.tensorrt)[0] or _version(current.tensorrt) < _version(built):
            reasons.append(f"it was built version-compatible with TensorRT {built}, which runs on later "
                           f"{_version(built)[0]}.x only; this is TensorRT {current.tensorrt}")
    elif built != current.tensorrt:
        reasons.append(f"it was built with TensorRT {built}; this is TensorRT {current.tensorrt}")
    gpu = manifest.get("gpu") or {}
    if gpu.get("compute_capability") != current.compute_capability or gpu.get("name") != current.gpu_name:
        reasons.append(f"it was built for {gpu.get('name', '?')} (compute capability {gpu.get('compute_capability', '?')}); "
                       f"this GPU is {current.gpu_name} (compute capability {current.compute_capability})")
    return reasons


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".") if x.isdigit())


def rebuild_hint(plan: str | os.PathLike, manifest: dict[str, Any]) -> str:
    req = manifest.get("request") or {}
    cmd = f"scarlet engine --onnx {req.get('onnx', 'MODEL.onnx')} --precision {req.get('precision', manifest.get('precision', 'fp32'))}"
    if req.get("int8_onnx"):
        cmd += f" --int8-onnx {req['int8_onnx']}"
    if req.get("int8_high_precision"):
        cmd += f" --int8-high-precision {req['int8_high_precision']}"
    if req.get("batch"):
        cmd += f" --batch {','.join(map(str, req['batch']))}"
    return f"{cmd} -o {plan} --rebuild"


def check_plan(plan: str | os.PathLike, current: RuntimeInfo) -> dict[str, Any]:
    """The plan's manifest if the plan may be loaded here; otherwise a ScarletError saying why and how to rebuild."""
    plan = Path(plan)
    if not plan.is_file():
        raise ScarletError(f"TensorRT plan {plan} does not exist; build it with `scarlet engine` (or `make engine`).")
    manifest = read_manifest(plan, required=True)
    reasons = plan_compatibility(manifest, current)
    if not reasons and manifest.get("plan_sha256") != sha256_file(plan):
        reasons.append("the plan file does not match its manifest (replaced or truncated)")
    if reasons:
        raise ScarletError(f"refusing to load {plan}: {'; '.join(reasons)}. Rebuild it here with: "
                           f"{rebuild_hint(plan, manifest)}")
    return manifest


# ----------------------------------------------------------------------------- logging

class ErrorLog:
    """The errors TensorRT reports, collected per operation.

    TensorRT wants one logger that outlives every builder, runtime and engine made with it
    (its documentation calls the logger a per-process singleton), and may call it from
    its own threads. So the process has one logger (`trt_logger`), and each operation
    (parse, build, deserialize, enqueue) opens `capture()` to receive only the errors
    reported while it ran: a later failure never repeats an earlier one's message.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[list[str]] = []

    def error(self, msg: str) -> None:
        with self._lock:
            for errors in self._open:
                errors.append(msg)

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[str]]:
        errors: list[str] = []
        with self._lock:
            self._open.append(errors)
        try:
            yield errors
        finally:
            with self._lock:
                self._open.remove(errors)


ERRORS = ErrorLog()
_LOGGER = None


def trt_logger(trt):
    """The process's one TensorRT logger: prints warnings and errors, hands errors to ERRORS."""
    global _LOGGER
    if _LOGGER is None:
        class Log(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                    ERRORS.error(msg)
                    print(f"[TensorRT] error: {msg}", file=sys.stderr)
                elif severity == trt.ILogger.WARNING:
                    print(f"[TensorRT] warning: {msg}", file=sys.stderr)

        _LOGGER = Log()
    return _LOGGER


def explain(errors: list[str], fallback: str = "see the log above") -> str:
    return "; ".join(errors) or fallback


# ----------------------------------------------------------------------------- run

class TrtRunner(Runner):
    """runners.base.Runner over a TensorRT plan, with CUDA-event timing for bench.

    Device and pinned host buffers are sized once for the profile's max batch, so
    addresses stay fixed (needed for CUDA graphs); larger inputs run in chunks.
    """

    kind = "trt"

    def __init__(self, plan_path: str | os.PathLike, name: str | None = None, device: int = 0):
        self.path = Path(plan_path)
        self.name = name or self.path.name
        self.device = device
        self.manifest: dict[str, Any] | None = None
        self._engine = None

    # -- lifecycle
    def load(self) -> "TrtRunner":
        if self._engine is not None:
            return self
        self.manifest = check_plan(self.path, require_gpu(self.device))
        trt, cudart = import_tensorrt(), import_cudart()
        self._trt, self._cudart = trt, cudart
        _ck(cudart, cudart.cudaSetDevice(self.device))
        self._runtime = trt.Runtime(trt_logger(trt))
        with ERRORS.capture() as errors:
            engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise ScarletError(f"TensorRT could not load {self.path}: {explain(errors)}. "
                               f"Rebuild it with: {rebuild_hint(self.path, self.manifest)}")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if n not in ins]
        if len(ins) != 1 or len(outs) != 1:
            raise ScarletError(f"{self.path} has inputs {ins} and outputs {outs}; expected one image input and one logits output.")
        self._engine, self._in, self._out = engine, ins[0], outs[0]
        self._ctx = engine.create_execution_context()
        mn, _, mx = engine.get_tensor_profile_shape(self._in, 0)
        self.min_batch, self.max_batch, self._chw = int(mn[0]), int(mx[0]), tuple(int(d) for d in mx[1:])
        self._in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._in)))
        self._out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._out)))
        self._ctx.set_input_shape(self._in, (self.max_batch, *self._chw))
        self._out_tail = tuple(int(d) for d in self._ctx.get_tensor_shape(self._out))[1:]
        self._stream = _ck(cudart, cudart.cudaStreamCreate())  # never the default stream
        self._events = (_ck(cudart, cudart.cudaEventCreate()), _ck(cudart, cudart.cudaEventCreate()))
        self._dev, self._host = {}, {}
        for n, shape, dt in ((self._in, (self.max_batch, *self._chw), self._in_dtype),
                             (self._out, (self.max_batch, *self._out_tail), self._out_dtype)):
            nbytes = int(np.prod(shape)) * dt.itemsize
            self._dev[n] = _ck(cudart, cudart.cudaMalloc(nbytes))
            ptr = _ck(cudart, cudart.cudaMallocHost(nbytes))  # pinned: async copies, honest copy timings
            self._host[n] = (ptr, np.ctypeslib.as_array((ctypes.c_byte * nbytes).from_address(ptr)).view(dt).reshape(shape))
            self._ctx.set_tensor_address(n, int(self._dev[n]))
        return self

    def close(self) -> None:
        if self._engine is None:
            return
        cudart = self._cudart
        with contextlib.suppress(ScarletError):
            _ck(cudart, cudart.cudaStreamSynchronize(self._stream))
        for ptr in self._dev.values():
            cudart.cudaFree(ptr)
        for ptr, _ in self._host.values():
            cudart.cudaFreeHost(ptr)
        for ev in self._events:
            cudart.cudaEventDestroy(ev)
        cudart.cudaStreamDestroy(self._stream)
        self._ctx = self._engine = self._runtime = None
        self._dev, self._host = {}, {}

    # -- inference
    def _enqueue(self, batch: int, copies: bool) -> bool:
        cudart, s = self._cudart, self._stream
        in_ptr, in_host = self._host[self._in]
        out_ptr, out_host = self._host[self._out]
        if copies:
            _ck(cudart, cudart.cudaMemcpyAsync(self._dev[self._in], in_ptr, batch * in_host[0].nbytes,
                                               cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, s))
        ok = self._ctx.execute_async_v3(int(s))
        if ok and copies:
            _ck(cudart, cudart.cudaMemcpyAsync(out_ptr, self._dev[self._out], batch * out_host[0].nbytes,
                                               cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, s))
        return ok

    def _run(self, batch: int, copies: bool) -> None:
        """One enqueue outside graph capture; a refusal is an error with TensorRT's own words."""
        with ERRORS.capture() as errors:
            ok = self._enqueue(batch, copies)
        if not ok:
            raise ScarletError(f"TensorRT failed to run {self.path}: {explain(errors, 'see the log')}.")

    def _set_batch(self, batch: int) -> None:
        if not self.min_batch <= batch <= self.max_batch:
            raise ScarletError(f"batch {batch} is outside the plan's profile [{self.min_batch}, {self.max_batch}]; "
                               "rebuild with a wider --batch.")
        if not self._ctx.set_input_shape(self._in, (batch, *self._chw)):
            raise ScarletError(f"TensorRT refused input shape {(batch, *self._chw)} for {self.path}.")

    def infer(self, x: np.ndarray) -> np.ndarray:
        self.load()
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self._chw:
            raise ScarletError(f"input shape {x.shape} does not match the plan's (N, {', '.join(map(str, self._chw))}).")
        outs = []
        for start in range(0, len(x), self.max_batch):
            chunk = x[start:start + self.max_batch]
            n = len(chunk)
            if n < self.min_batch:  # pad a short tail up to the profile's minimum
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.min_batch - n, axis=0)])
            self._set_batch(len(chunk))
            self._host[self._in][1][:len(chunk)] = chunk  # casts float32 -> the engine's input type
            self._run(len(chunk), copies=True)
            _ck(self._cudart, self._cudart.cudaStreamSynchronize(self._stream))
            outs.append(self._host[self._out][1][:n].astype(np.float32))
        return np.concatenate(outs) if outs else np.zeros((0, *self._out_tail), np.float32)

    def time(self, batch: int, iters: int = 100, warmup: int = 10, include_copies: bool = False,
             cuda_graph: bool = False) -> list[float]:
        """Milliseconds per run for `iters` runs at `batch`, measured with CUDA events on the runner's stream.

        include_copies: each run also copies the input host->device and the logits back
        (pinned memory). cuda_graph: runs are replays of one captured CUDA graph (raises a
        ScarletError when the engine cannot be captured, rather than timing something else).
        Each run is synchronised before the next starts, so a value is one run's latency.
        """
        self.load()
        if iters < 1 or warmup < 0:
            raise ScarletError(f"iters must be >= 1 and warmup >= 0 (got {iters}, {warmup}).")
        cudart, s = self._cudart, self._stream
        self._set_batch(batch)
        rng = np.random.default_rng(0)
        self._host[self._in][1][:batch] = rng.standard_normal((batch, *self._chw), dtype=np.float32)
        self._run(batch, copies=True)  # fills the device input; also TensorRT's first-run set-up
        _ck(cudart, cudart.cudaStreamSynchronize(s))
        graph, gexec = self._capture(batch, include_copies) if cuda_graph else (None, None)

        def launch() -> None:
            if gexec is None:
                self._run(batch, include_copies)
            else:
                _ck(cudart, cudart.cudaGraphLaunch(gexec, s))

        e0, e1 = self._events
        times = []
        try:
            for i in range(warmup + iters):
                _ck(cudart, cudart.cudaEventRecord(e0, s))
                launch()
                _ck(cudart, cudart.cudaEventRecord(e1, s))
                _ck(cudart, cudart.cudaEventSynchronize(e1))
                if i >= warmup:
                    times.append(float(_ck(cudart, cudart.cudaEventElapsedTime(e0, e1))))
        finally:
            if gexec is not None:
                cudart.cudaGraphExecDestroy(gexec)
                cudart.cudaGraphDestroy(graph)
        return times

    def _capture(self, batch: int, include_copies: bool):
        """(graph, executable graph) of one enqueue; a ScarletError saying it cannot be captured otherwise.

        Whatever fails in between (TensorRT refusing to enqueue, a CUDA error from a copy, an
        invalidated capture, instantiation), capture is ended and the graph destroyed, so the
        stream is usable again and nothing leaks.
        """
        cudart, s = self._cudart, self._stream
        success = cudart.cudaError_t.cudaSuccess
        # ThreadLocal, as trtexec does: other threads' CUDA calls do not break our capture.
        _ck(cudart, cudart.cudaStreamBeginCapture(s, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        why, ok = "", False
        with ERRORS.capture() as errors:
            try:
                ok = self._enqueue(batch, include_copies)
            except ScarletError as e:  # a CUDA error while capturing
                why = str(e).rstrip(".")
            finally:
                err, graph = cudart.cudaStreamEndCapture(s)
        if not ok and not why:
            why = f"TensorRT could not enqueue during capture ({explain(errors, 'no TensorRT error logged')})"
        gexec = None
        if ok and err == success:
            err, gexec = cudart.cudaGraphInstantiate(graph, 0)
        if err != success and not why:
            why = f"{cudart.cudaGetErrorName(err)[1].decode()}: {cudart.cudaGetErrorString(err)[1].decode()}"
        if why:
            # An invalidated capture returns a NULL graph; anything else was created and is ours to free.
            if graph is not None and int(graph) != 0:
                cudart.cudaGraphDestroy(graph)
            cudart.cudaGetLastError()  # capture errors are not sticky: clear them for the next call
            raise CaptureError(f"{self.path} cannot be captured in a CUDA graph ({why}); time it without --cuda-graph.")
        return graph, gexec

    def timed(self, x: np.ndarray) -> list[float]:
        # CUDA events, not host timing (launch and sync jitter); the runs include the pinned host<->device
        # copies so they compare end to end with CPU backends.
        return [ms / 1e3 for ms in self.time(len(x), iters=10, warmup=0, include_copies=True)]

    def describe(self) -> dict[str, Any]:
        m = self.manifest or read_manifest(self.path) or {}
        return {"name": self.name, "kind": self.kind, "path": str(self.path), "precision": m.get("precision"),
                "manifest": m}
