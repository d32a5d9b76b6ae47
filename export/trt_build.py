"""TensorRT 11 engine building: FP32/FP16/INT8 plans from ONNX, with manifests.

TensorRT 11 networks are always strongly typed: precision comes from the ONNX tensor
types (FP32 ONNX, FP16 ONNX from export.fp16, INT8 = explicit Q/DQ ONNX); there are no
precision builder flags or calibrators. We check the requested precision against both
the ONNX and the parsed network, so a build can never silently fall back to FP32.

Everything that needs no GPU (batch profiles, timing-cache paths, precision checks) is a
plain function that tests call on CPU. `tensorrt` is imported only when needed.
"""
from __future__ import annotations

import datetime as _dt
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from scarlet_deploy.runtime.core.artifacts import (
    atomic_path,
    read_manifest,
    sha256_file,
    tool_versions,
    write_bytes_atomic,
    write_manifest,
)
from scarlet_deploy.runtime.core.errors import OutOfTime, ScarletError
from scarlet_deploy.runtime.runners.trt import (
    ERRORS,
    PLAN_KIND,
    RuntimeInfo,
    check_plan,
    explain,
    import_tensorrt,
    plan_compatibility,
    require_gpu,
    trt_logger,
)

from .fp16 import Fp16Config, convert_qdq_to_fp16, convert_to_fp16, type_summary

PRECISIONS = ("fp32", "fp16", "int8")
# The type of what runs outside the quantized layers of an INT8 plan (TensorRT 11 runs the
# types the ONNX declares). fp16 is what NVIDIA's ModelOpt writes by default
# (high_precision_dtype='fp16'); fp32 keeps the calibrated Q/DQ ONNX as it is.
HIGH_PRECISIONS = ("fp16", "fp32")


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
    int8_high_precision: str = "fp16"  # one of HIGH_PRECISIONS; INT8 only


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
        "int8_high_precision": cfg.int8_high_precision if cfg.precision == "int8" else None,
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
        check_int8_onnx(cfg.int8_onnx or int8_onnx_path(cfg.onnx), cfg.onnx)
        if cfg.int8_high_precision not in HIGH_PRECISIONS:
            raise ScarletError(f"--int8-high-precision {cfg.int8_high_precision!r}: choose one of {', '.join(HIGH_PRECISIONS)}.")
    elif cfg.int8_onnx:
        raise ScarletError("--int8-onnx applies to --precision int8 only.")
    if cfg.workspace_gb is not None and cfg.workspace_gb <= 0:
        raise ScarletError(f"--workspace {cfg.workspace_gb}: must be a positive number of GB.")
    cfg.batch.fit_to(onnx_io(cfg.onnx)[1])


def check_int8_onnx(int8: str | os.PathLike, onnx_path: str | os.PathLike) -> dict[str, Any]:
    """The Q/DQ ONNX's manifest when it is the TensorRT-target calibration of exactly this ONNX;
    otherwise a ScarletError saying how to remake it. Reads files only: no TensorRT needed."""
    int8 = Path(int8)
    remake = (f"`scarlet calibrate --onnx {onnx_path} --images DIR --target trt -o {int8}` (or `make calib`), "
              "or pass --int8-onnx with a current one")
    if not int8.is_file():
        raise ScarletError(f"INT8 needs the TensorRT Q/DQ ONNX {int8}; make it with {remake}.")
    m = read_manifest(int8)
    if m is None:
        raise ScarletError(f"{int8} has no manifest, so nothing says which ONNX it was calibrated from; "
                           f"recalibrate with {remake}.")
    if m.get("target") != "trt":
        raise ScarletError(f"{int8} was calibrated for target {m.get('target')!r}, not TensorRT (symmetric INT8, "
                           f"Q/DQ where TensorRT fuses); recalibrate with {remake}.")
    if m.get("source_onnx_sha256") != sha256_file(onnx_path):
        raise ScarletError(f"{int8} is stale: it was calibrated from an ONNX with sha256 "
                           f"{str(m.get('source_onnx_sha256'))[:12]}..., not from {onnx_path} as it is now "
                           f"({sha256_file(onnx_path)[:12]}...); recalibrate with {remake}.")
    return m


def build_onnx(cfg: EngineConfig) -> Path:
    """The ONNX whose tensor types give the requested precision (FP16 converted here), checked."""
    import onnx

    if cfg.precision == "fp16":
        src = convert_to_fp16(Fp16Config(cfg.onnx)).output
    elif cfg.precision == "int8":
        src = Path(cfg.int8_onnx or int8_onnx_path(cfg.onnx))
        if cfg.int8_high_precision == "fp16":
            src = convert_qdq_to_fp16(Fp16Config(src)).output
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


def parser_errors(parser) -> str:
    """Each ONNX parser error with the node that failed."""
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        lines.append(f"node #{e.node()} '{e.node_name()}' ({e.node_operator()}): {e.desc()} [{e.code()}]")
    return "; ".join(lines) or "no details"


def _deadline_monitor(trt, deadline: float):
    """A TensorRT progress monitor that cancels the build once time.monotonic() passes `deadline`."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            pass

        def step_complete(self, phase_name, step):
            return time.monotonic() < deadline  # False asks TensorRT to cancel the build

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def build_engine(cfg: EngineConfig, progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
                 deadline: float | None = None) -> EngineReport:
    """Build (or reuse an up-to-date) plan + manifest for cfg; never a silently different precision.

    `deadline` (a time.monotonic() value): TensorRT cancels the build when it passes, and
    nothing is written.
    """
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
    log = trt_logger(trt)
    t0 = time.perf_counter()
    builder = trt.Builder(log)
    network = builder.create_network(0)  # TensorRT 11: always strongly typed
    parser = trt.OnnxParser(network, log)
    progress(f"parsing {src}")
    with ERRORS.capture() as errors:
        parsed = parser.parse_from_file(str(src))
    if not parsed:
        raise ScarletError(f"TensorRT's ONNX parser rejected {src}: {parser_errors(parser)} "
                           f"(TensorRT: {explain(errors, 'nothing logged')}).")
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

    if deadline is not None:
        config.progress_monitor = _deadline_monitor(trt, deadline)
    progress(f"building {cfg.precision} engine for {src.name} (batch {b}); this takes a minute or two")
    with ERRORS.capture() as errors:
        plan_mem = builder.build_serialized_network(network, config)
    if plan_mem is None:
        if deadline is not None and time.monotonic() >= deadline:
            raise OutOfTime(f"the build of {cfg.output} was cancelled after {time.perf_counter() - t0:.0f} s: "
                            "the time budget ran out; nothing was written")
        raise ScarletError(f"TensorRT could not build {cfg.output}: {explain(errors)}.")
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
                        batch=BatchProfile(*req["batch"]), workspace_gb=req.get("workspace_gb"), rebuild=True,
                        int8_high_precision=req.get("int8_high_precision") or "fp16")


def report_dict(r: EngineReport) -> dict[str, Any]:
    return asdict(r) | {"plan": str(r.plan), "build_onnx": str(r.build_onnx)}


def rebuild_if_stale(plan: str | os.PathLike, device: int = 0) -> dict[str, Any]:
    """The plan's manifest, after rebuilding the plan from the request its manifest recorded
    when it cannot be loaded with this TensorRT/GPU (`scarlet engine --rebuild`, in place)."""
    try:
        return check_plan(plan, require_gpu(device))
    except ScarletError:
        manifest = read_manifest(plan) if Path(plan).is_file() else None
        if not manifest:
            raise
        return build_engine(config_from_manifest(plan, manifest)).manifest
