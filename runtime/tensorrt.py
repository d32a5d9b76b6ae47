"""TensorRT 11 backend: build FP32/FP16/INT8 plans from ONNX, check them, run and time them.

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
import datetime as _dt
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from export.artifacts import atomic_path, read_manifest, sha256_file, tool_versions, write_bytes_atomic, write_manifest
from export.errors import ScarletError

from .backends import Runner

PRECISIONS = ("fp32", "fp16", "int8")
TRT_MISSING = "TensorRT 11 is not installed: pip install .[tensorrt] on a machine with an NVIDIA GPU"
CUDA_PYTHON_MISSING = "cuda-python >= 13 is not installed: pip install .[tensorrt] on a machine with an NVIDIA GPU"
NO_GPU = "no CUDA GPU visible"
PLAN_KIND = "tensorrt-plan"


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


# ----------------------------------------------------------------------------- build inputs

@dataclass(frozen=True)
class BatchProfile:
    """The one optimisation profile: batch sizes TensorRT must accept (min/max) and tune for (opt)."""

    min: int = 1
    opt: int = 8
    max: int = 32

    def __post_init__(self):
        if min(self.min, self.opt, self.max) < 1:
            raise ScarletError(f"--batch {self}: batch sizes must be >= 1.")
        if not self.min <= self.opt <= self.max:
            raise ScarletError(f"--batch {self.min},{self.opt},{self.max}: need MIN <= OPT <= MAX.")

    def __str__(self) -> str:
        return f"{self.min},{self.opt},{self.max}"

    @classmethod
    def parse(cls, text: str) -> "BatchProfile":
        """'1,8,32' -> min/opt/max; a single 'N' means a fixed batch N."""
        try:
            values = [int(v) for v in str(text).split(",")]
        except ValueError:
            raise ScarletError(f"--batch {text!r}: expected MIN,OPT,MAX integers, e.g. 1,8,32.") from None
        if len(values) == 1:
            values *= 3
        if len(values) != 3:
            raise ScarletError(f"--batch {text!r}: expected MIN,OPT,MAX (three integers) or one fixed batch size.")
        return cls(*values)

    def fit_to(self, onnx_batch: int | None) -> None:
        """A fixed-batch ONNX admits only that batch; refuse a profile asking for others."""
        if onnx_batch is not None and (self.min, self.opt, self.max) != (onnx_batch,) * 3:
            raise ScarletError(f"the ONNX input has a fixed batch of {onnx_batch}, so --batch must be "
                               f"{onnx_batch} (got {self}); re-export with a dynamic batch to use a range.")


def timing_cache_path(arg: str | os.PathLike | None, plan: str | os.PathLike) -> Path:
    """Where the timing cache lives: the given file, `DIR/timing.cache` for a directory, else beside the plan.

    One cache per build directory lets later builds (other models, precisions) reuse timings.
    """
    if arg is None or str(arg) == "":
        return Path(plan).parent / "timing.cache"
    p = Path(arg)
    return p / "timing.cache" if p.is_dir() else p


def read_timing_cache(path: Path) -> bytes:
    """The serialized cache, or b'' (a new cache) when there is none yet."""
    try:
        return path.read_bytes() if path.is_file() else b""
    except OSError as e:
        raise ScarletError(f"timing cache {path} is unreadable ({e}); delete it or pass another --timing-cache.") from e


def onnx_io(path: str | os.PathLike) -> tuple[str, int | None, tuple[int, ...]]:
    """(input name, fixed batch or None when dynamic, C/H/W) of a single-input ONNX, read without weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ScarletError(f"{path} has {len(inputs)} inputs; expected one image input (N,3,H,W).")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not all(d.HasField("dim_value") for d in dims[1:]):
        raise ScarletError(f"{path}: input {inputs[0].name} is not (N,C,H,W) with fixed C/H/W.")
    batch = dims[0].dim_value if dims[0].HasField("dim_value") else None
    return inputs[0].name, batch, tuple(d.dim_value for d in dims[1:])


def check_precision(summary: dict[str, int], precision: str, where: str) -> None:
    """Refuse a graph whose tensor types do not give the requested precision.

    `summary` is export.fp16.type_summary (ONNX) or network_summary (TensorRT network):
    float16 / float32 tensor counts and the number of Q/DQ nodes.
    """
    half, qdq = summary.get("float16", 0), summary.get("qdq_nodes", 0)
    problems = {
        "fp32": (half or qdq) and f"it has {half} float16 tensors and {qdq} Q/DQ nodes; FP32 needs the exported float32 ONNX",
        "fp16": (not half and "it has no float16 tensors, so it would build as FP32")
                or (qdq and f"it has {qdq} Q/DQ nodes; FP16 needs the FP16 ONNX, not a quantized one"),
        "int8": not qdq and "it has no Q/DQ nodes, so nothing would run in INT8; use the Q/DQ ONNX from "
                            "`scarlet calibrate --target trt`",
    }
    if precision not in problems:
        raise ScarletError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}.")
    if problems[precision]:
        raise ScarletError(f"{where} does not match --precision {precision}: {problems[precision]}.")
    if precision == "fp16" and not summary.get("io_float32", 1):
        raise ScarletError(f"{where} has float16 inputs/outputs; the FP16 ONNX must keep float32 I/O.")


def int8_onnx_path(onnx_path: str | os.PathLike) -> Path:
    """`build/m.onnx` -> `build/m.int8-trt.onnx`, the name `scarlet calibrate --target trt` writes."""
    p = Path(onnx_path)
    return p.with_name(p.name.removesuffix(".onnx") + ".int8-trt.onnx")


# ----------------------------------------------------------------------------- manifest checks

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


# ----------------------------------------------------------------------------- build

@dataclass(frozen=True)
class EngineConfig:
    onnx: Path  # the exported FP32 ONNX
    precision: str
    output: Path
    int8_onnx: Path | None = None  # default: <onnx>.int8-trt.onnx beside it
    batch: BatchProfile = field(default_factory=BatchProfile)
    workspace_gb: float | None = None  # None: TensorRT's default (the device's memory)
    timing_cache: Path | None = None  # None: build dir/timing.cache
    rebuild: bool = False


@dataclass
class EngineReport:
    plan: Path
    reused: bool
    precision: str
    build_onnx: Path
    seconds: float
    manifest: dict[str, Any]


def _request(cfg: EngineConfig) -> dict[str, Any]:
    """What the user asked for, with the inputs' hashes: a plan is current only if all of it matches."""
    int8 = cfg.int8_onnx or int8_onnx_path(cfg.onnx)
    return {
        "onnx": str(cfg.onnx),
        "onnx_sha256": sha256_file(cfg.onnx),
        "precision": cfg.precision,
        "int8_onnx": str(int8) if cfg.precision == "int8" else None,
        "int8_onnx_sha256": sha256_file(int8) if cfg.precision == "int8" else None,
        "batch": [cfg.batch.min, cfg.batch.opt, cfg.batch.max],
        "workspace_gb": cfg.workspace_gb,
    }


def stale_reasons(plan: Path, request: dict[str, Any], current: RuntimeInfo) -> list[str]:
    """Why an existing plan must be rebuilt for this request here (empty: it is current)."""
    m = read_manifest(plan) if plan.is_file() else None
    if m is None:
        return ["no plan with a manifest exists"]
    old = m.get("request") or {}
    reasons = [f"{k} changed" for k in request if old.get(k) != request[k]]
    reasons += plan_compatibility(m, current)
    if not reasons and m.get("plan_sha256") != sha256_file(plan):
        reasons.append("the plan file does not match its manifest")
    return reasons


def validate(cfg: EngineConfig) -> None:
    """Everything checkable before touching TensorRT, so bad flags fail fast on any machine."""
    if cfg.precision not in PRECISIONS:
        raise ScarletError(f"--precision {cfg.precision!r}: choose one of {', '.join(PRECISIONS)}.")
    if not Path(cfg.onnx).is_file():
        raise ScarletError(f"ONNX model {cfg.onnx} does not exist; create it with `scarlet export` (or `make export`).")
    if cfg.precision == "int8":
        int8 = cfg.int8_onnx or int8_onnx_path(cfg.onnx)
        if not Path(int8).is_file():
            raise ScarletError(f"INT8 needs the TensorRT Q/DQ ONNX {int8}; make it with "
                               f"`scarlet calibrate --target trt` (or `make calib`), or pass --int8-onnx.")
    elif cfg.int8_onnx:
        raise ScarletError("--int8-onnx applies to --precision int8 only.")
    if cfg.workspace_gb is not None and cfg.workspace_gb <= 0:
        raise ScarletError(f"--workspace {cfg.workspace_gb}: must be a positive number of GB.")
    cfg.batch.fit_to(onnx_io(cfg.onnx)[1])


def build_onnx(cfg: EngineConfig) -> Path:
    """The ONNX whose tensor types give the requested precision (FP16 converted here), checked."""
    import onnx

    from export.fp16 import Fp16Config, convert_to_fp16, type_summary

    if cfg.precision == "fp16":
        src = convert_to_fp16(Fp16Config(cfg.onnx)).output
    elif cfg.precision == "int8":
        src = Path(cfg.int8_onnx or int8_onnx_path(cfg.onnx))
    else:
        src = Path(cfg.onnx)
    check_precision(type_summary(onnx.load(str(src), load_external_data=False)), cfg.precision, f"ONNX {src}")
    return src


def network_summary(trt, network) -> dict[str, int]:
    """type_summary's counts for a parsed TensorRT network: what TensorRT will actually build."""
    half = fp32 = qdq = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE):
            qdq += 1
        for j in range(layer.num_outputs):
            dt = layer.get_output(j).dtype
            half += dt == trt.DataType.HALF
            fp32 += dt == trt.DataType.FLOAT
    io = [network.get_input(i) for i in range(network.num_inputs)] + [network.get_output(i) for i in range(network.num_outputs)]
    return {"float16": half, "float32": fp32, "qdq_nodes": qdq,
            "io_float32": int(all(t.dtype == trt.DataType.FLOAT for t in io))}


def _logger(trt):
    """A TensorRT logger that prints warnings and keeps errors for our ScarletError messages."""

    class Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
                print(f"[TensorRT] error: {msg}", file=sys.stderr)
            elif severity == trt.ILogger.WARNING:
                print(f"[TensorRT] warning: {msg}", file=sys.stderr)

    return Log()


def parser_errors(parser) -> str:
    """Each ONNX parser error with the node that failed."""
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        lines.append(f"node #{e.node()} '{e.node_name()}' ({e.node_operator()}): {e.desc()} [{e.code()}]")
    return "; ".join(lines) or "no details"


def build_engine(cfg: EngineConfig, progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> EngineReport:
    """Build (or reuse an up-to-date) plan + manifest for cfg; never a silently different precision."""
    validate(cfg)
    current = require_gpu()
    request = _request(cfg)
    stale = stale_reasons(Path(cfg.output), request, current)
    if not cfg.rebuild and not stale:
        m = read_manifest(cfg.output, required=True)
        return EngineReport(Path(cfg.output), True, cfg.precision, Path(m["build_onnx"]), 0.0, m)
    if Path(cfg.output).is_file():
        progress(f"replacing {cfg.output}: {'; '.join(stale) or '--rebuild'}")

    trt = import_tensorrt()
    src = build_onnx(cfg)
    input_name, _, chw = onnx_io(src)
    log = _logger(trt)
    t0 = time.perf_counter()
    builder = trt.Builder(log)
    network = builder.create_network(0)  # TensorRT 11: always strongly typed
    parser = trt.OnnxParser(network, log)
    progress(f"parsing {src}")
    if not parser.parse_from_file(str(src)):
        raise ScarletError(f"TensorRT's ONNX parser rejected {src}: {parser_errors(parser)}.")
    summary = network_summary(trt, network)
    check_precision(summary, cfg.precision, "the parsed TensorRT network")

    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)  # TF32 is on by default; FP32 must mean FP32
    if cfg.workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    b = cfg.batch
    profile.set_shape(input_name, (b.min, *chw), (b.opt, *chw), (b.max, *chw))
    config.add_optimization_profile(profile)

    cache_path = timing_cache_path(cfg.timing_cache, cfg.output)
    cache_bytes = read_timing_cache(cache_path)
    cache = config.create_timing_cache(cache_bytes)  # kept referenced until the build ends
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another GPU or TensorRT version, or a damaged file: start afresh rather
        # than mix timings; the new cache overwrites it after the build.
        progress(f"timing cache {cache_path} is unusable here (other GPU/TensorRT, or damaged); starting a new one")
        cache_bytes, cache = b"", config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    progress(f"building {cfg.precision} engine for {src.name} (batch {b}); this takes a minute or two")
    plan_mem = builder.build_serialized_network(network, config)
    if plan_mem is None:
        raise ScarletError(f"TensorRT could not build {cfg.output}: {'; '.join(log.errors) or 'see the log above'}.")
    seconds = time.perf_counter() - t0
    with atomic_path(cfg.output) as tmp:
        with open(tmp, "wb") as f:
            f.write(plan_mem)
        plan_sha = sha256_file(tmp)
        plan_bytes = tmp.stat().st_size
    write_bytes_atomic(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))

    source_manifest = read_manifest(cfg.onnx) or {}
    manifest = {
        "kind": PLAN_KIND,
        "model": source_manifest.get("model"),
        "precision": cfg.precision,
        "request": request,
        "build_onnx": str(src),
        "build_onnx_sha256": sha256_file(src),
        "profile": {"input": input_name, "min": [b.min, *chw], "opt": [b.opt, *chw], "max": [b.max, *chw]},
        "tensorrt": current.tensorrt,
        "gpu": {"name": current.gpu_name, "compute_capability": current.compute_capability},
        "version_compatible": False,
        "hardware_compatibility_level": "NONE",
        "tf32": False,
        "network": summary,
        "timing_cache": str(cache_path),
        "timing_cache_reused": bool(cache_bytes),
        "build_seconds": round(seconds, 2),
        "plan_sha256": plan_sha,
        "plan_bytes": plan_bytes,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": tool_versions(),
    }
    write_manifest(cfg.output, manifest)
    return EngineReport(Path(cfg.output), False, cfg.precision, src, seconds, manifest)


def config_from_manifest(plan: str | os.PathLike, manifest: dict[str, Any]) -> EngineConfig:
    """The build request a manifest recorded, for rebuilding a plan on this machine."""
    req = manifest.get("request") or {}
    if not req.get("onnx"):
        raise ScarletError(f"{plan}'s manifest does not say which ONNX it came from; rebuild it with `scarlet engine`.")
    return EngineConfig(onnx=Path(req["onnx"]), precision=req["precision"], output=Path(plan),
                        int8_onnx=Path(req["int8_onnx"]) if req.get("int8_onnx") else None,
                        batch=BatchProfile(*req["batch"]), workspace_gb=req.get("workspace_gb"), rebuild=True)


# ----------------------------------------------------------------------------- run

class TrtRunner(Runner):
    """runtime.backends.Runner over a TensorRT plan, with CUDA-event timing for bench.

    Device and pinned host buffers are sized once for the profile's max batch, so
    addresses stay fixed (needed for CUDA graphs); larger inputs run in chunks.
    """

    kind = "trt"

    def __init__(self, plan_path: str | os.PathLike, name: str | None = None, rebuild: bool = False, device: int = 0):
        self.path = Path(plan_path)
        self.name = name or self.path.name
        self.rebuild = rebuild
        self.device = device
        self.manifest: dict[str, Any] | None = None
        self._engine = None

    # -- lifecycle
    def load(self) -> "TrtRunner":
        if self._engine is not None:
            return self
        current = require_gpu(self.device)
        try:
            self.manifest = check_plan(self.path, current)
        except ScarletError:
            manifest = read_manifest(self.path) if self.path.is_file() else None
            if not (self.rebuild and manifest):
                raise
            self.manifest = build_engine(config_from_manifest(self.path, manifest)).manifest
        trt, cudart = import_tensorrt(), import_cudart()
        self._trt, self._cudart = trt, cudart
        _ck(cudart, cudart.cudaSetDevice(self.device))
        self._log = _logger(trt)
        self._runtime = trt.Runtime(self._log)
        engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise ScarletError(f"TensorRT could not load {self.path}: {'; '.join(self._log.errors) or 'see the log above'}. "
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
            if not self._enqueue(len(chunk), copies=True):
                raise ScarletError(f"TensorRT failed to run {self.path}: {'; '.join(self._log.errors) or 'see the log'}.")
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
        if not self._enqueue(batch, copies=True):  # fills the device input; also TensorRT's first-run set-up
            raise ScarletError(f"TensorRT failed to run {self.path}: {'; '.join(self._log.errors) or 'see the log'}.")
        _ck(cudart, cudart.cudaStreamSynchronize(s))
        graph, gexec = self._capture(batch, include_copies) if cuda_graph else (None, None)

        def launch() -> bool:
            if gexec is None:
                return self._enqueue(batch, include_copies)
            _ck(cudart, cudart.cudaGraphLaunch(gexec, s))
            return True

        e0, e1 = self._events
        times = []
        try:
            for i in range(warmup + iters):
                _ck(cudart, cudart.cudaEventRecord(e0, s))
                if not launch():
                    raise ScarletError(f"TensorRT failed to run {self.path}: {'; '.join(self._log.errors) or 'see the log'}.")
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
        cudart, s = self._cudart, self._stream
        # ThreadLocal, as trtexec does: other threads' CUDA calls do not break our capture.
        _ck(cudart, cudart.cudaStreamBeginCapture(s, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        try:
            ok = self._enqueue(batch, include_copies)
        finally:
            err, graph = cudart.cudaStreamEndCapture(s)
        if not ok or err != cudart.cudaError_t.cudaSuccess:
            if err == cudart.cudaError_t.cudaSuccess:
                cudart.cudaGraphDestroy(graph)
            raise ScarletError(f"{self.path} cannot be captured in a CUDA graph (it has work TensorRT cannot "
                               "enqueue during capture); time it without --cuda-graph.")
        return graph, _ck(cudart, cudart.cudaGraphInstantiate(graph, 0))

    def describe(self) -> dict[str, Any]:
        m = self.manifest or read_manifest(self.path) or {}
        return {"name": self.name, "kind": self.kind, "path": str(self.path), "precision": m.get("precision"),
                "manifest": m}


def report_dict(r: EngineReport) -> dict[str, Any]:
    return asdict(r) | {"plan": str(r.plan), "build_onnx": str(r.build_onnx)}
