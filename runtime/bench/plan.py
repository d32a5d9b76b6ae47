from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scarlet_deploy.calib.model import OUTPUT_SUFFIX, calibrate_model, model_config
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.host import physical_cores
from scarlet_deploy.runtime.core.onnx_io import read_io
from scarlet_deploy.runtime.runners.openvino import OV_BACKENDS, ov_unavailable
from scarlet_deploy.runtime.runners.ort import OrtOptions
from scarlet_deploy.runtime.runners.pytorch import COMPILE_BACKENDS, torch_compile_unavailable

BACKENDS = ("torch", *COMPILE_BACKENDS, "ort", "ort-int8", *OV_BACKENDS, "trt-fp32", "trt-fp16", "trt-int8")


BACKEND_LABELS = {"torch": "PyTorch eager", "torch-compile": "PyTorch compile FP32",
                  "torch-compile-bf16": "PyTorch compile BF16", "ort": "ORT FP32", "ort-int8": "ORT INT8",
                  "ov": "OpenVINO FP32", "ov-bf16": "OpenVINO BF16", "ov-int8": "OpenVINO INT8",
                  "ov-int8-bf16": "OpenVINO INT8+BF16",
                  "trt-fp32": "TensorRT FP32", "trt-fp16": "TensorRT FP16", "trt-int8": "TensorRT INT8"}


REFERENCES = ("torch", "ort")  # every row gets a speed-up against these two

# latency: `infer`, one batch at a time, every core on it (p50/p90/p99); throughput: `infer_many`,
# as many batches in flight as the runner has streams (img/s). See runtime.runners.base.
MODES = ("latency", "throughput")


TRT_PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["scarlet_a", "scarlet_b", "scarlet_c", "efficientnet_lite0"])
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    batches: list[int] = field(default_factory=lambda: [1, 8])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    threads: int | None = None  # None: physical cores, for torch, onnxruntime and OpenVINO alike
    build_dir: Path = Path("build")
    engines: list[Path] = field(default_factory=list)
    repeats: int = 5
    seconds: float = 1.0
    warmup_s: float = 0.5
    memory: bool = True
    tune: bool = False
    calibrate: bool = False  # create a missing build/<model>.int8.onnx the way `make calib` does
    ort: OrtOptions = OrtOptions()
    torch_channels_last: bool = False
    reports_dir: Path = Path("reports")  # where verify-<model>.json are looked for
    peak_seconds: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        from scarlet_deploy.export.registry import get_spec

        for m in self.models:
            get_spec(m)
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad:
            raise ScarletError(f"unknown backend(s) {', '.join(bad)}; choose from {', '.join(BACKENDS)}.")
        if not self.batches or any(b < 1 for b in self.batches):
            raise ScarletError(f"batch sizes must be positive integers, got {self.batches}.")
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ScarletError(f"modes must be some of {', '.join(MODES)}, got {self.modes}.")
        if self.repeats < 1 or self.seconds <= 0:
            raise ScarletError("--repeats must be >= 1 and --seconds > 0.")
        self.batches = sorted(set(self.batches))
        self.build_dir, self.reports_dir = Path(self.build_dir), Path(self.reports_dir)
        self.engines = [Path(e) for e in self.engines]
        for e in self.engines:
            model, _, precision = e.name.removesuffix(".plan").rpartition(".")
            if not e.name.endswith(".plan") or model not in self.models or precision not in TRT_PRECISIONS:
                raise ScarletError(f"--engine {e}: name it <model>.<{'|'.join(TRT_PRECISIONS)}>.plan for one of the "
                                   f"benchmarked models ({', '.join(self.models)}), as `make engine` does.")
            if not e.is_file():
                raise ScarletError(f"--engine {e} does not exist; build it with `make engine`.")
        self.threads = self.threads or physical_cores()
        if self.ort.threads is None:
            self.ort = OrtOptions(self.threads, self.ort.opt_level, self.ort.execution_mode, self.ort.memory_arena)


@dataclass
class Artifact:
    backend: str
    path: Path | None  # None for torch (built in memory)
    size_mb: float


@dataclass
class ModelPlan:
    model: str
    onnx: Path
    image_size: int
    artifacts: dict[str, Artifact]  # backend -> what it runs
    skipped: dict[str, str]  # backend -> why not


def onnx_image_size(path: Path) -> int:
    """Spatial size of the model's (N, 3, S, S) input; 224 for every registry model."""
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return dims[-1].dim_value or 224


def _mb(path: Path) -> float:
    return path.stat().st_size / 2 ** 20


def _engine_for(model: str, precision: str, cfg: BenchConfig) -> Path:
    for e in cfg.engines:  # an explicit --engine wins over the build-dir convention
        if e.name == f"{model}.{precision}.plan":
            return e
    return cfg.build_dir / f"{model}.{precision}.plan"




# The calibration target whose Q/DQ ONNX each INT8 backend runs: the one made for its runtime
INT8_TARGETS = {"ort-int8": "ort", "ov-int8": "ov", "ov-int8-bf16": "ov"}


def calibrate_int8(model: str, target: str, cfg: BenchConfig) -> None:
    """build/<model><suffix> for `target` as `make calib` makes it; method comparison and its speed
    check are skipped since this run measures speed itself."""
    # calib-<model>.json (what known_accuracy reads) is the onnxruntime model's; `make calib` writes it too
    report = cfg.reports_dir / (f"calib-{model}" if target == "ort" else f"calib-{model}-{target}")
    calibrate_model(model, cfg.build_dir, None, [target], str(report), None,
                    model_config(compare_methods=False, bench_rounds=0, threads=cfg.threads))


def plan_model(model: str, cfg: BenchConfig, loaded=None) -> ModelPlan:
    from scarlet_deploy.export.onnx_export import ensure_onnx  # lazy: torch

    onnx_path = ensure_onnx(model, cfg.build_dir, loaded=loaded)
    for path in (onnx_path, *(cfg.build_dir / f"{model}{OUTPUT_SUFFIX[t]}" for t in INT8_TARGETS.values())):
        if path.exists():  # a damaged file: one sentence before any timing (any input size is measured as it is)
            read_io(path)
    arts: dict[str, Artifact] = {}
    skipped: dict[str, str] = {}
    from scarlet_deploy.runtime.runners.trt import trt_unavailable

    trt_reason = trt_unavailable() if any(b.startswith("trt-") for b in cfg.backends) else None
    for b in cfg.backends:
        why_not = ov_unavailable(b) if b in OV_BACKENDS else \
            torch_compile_unavailable(b) if b in COMPILE_BACKENDS else None
        if why_not:
            skipped[b] = why_not
        elif b.startswith("torch"):
            arts[b] = Artifact(b, None, 0.0)  # size filled in once the model is built
        elif b in ("ort", "ov", "ov-bf16"):
            arts[b] = Artifact(b, onnx_path, _mb(onnx_path))
        elif b in INT8_TARGETS:
            target = INT8_TARGETS[b]
            p = cfg.build_dir / f"{model}{OUTPUT_SUFFIX[target]}"
            if not p.exists() and cfg.calibrate:
                try:
                    calibrate_int8(model, target, cfg)
                except ScarletError as e:
                    skipped[b] = f"calibration failed: {str(e).rstrip('.')}"
                    continue
            if p.exists():
                arts[b] = Artifact(b, p, _mb(p))
            else:
                skipped[b] = f"no calibrated INT8 model {p}; create it with `make calib MODEL={model}`" + \
                    (f' CALIB_ARGS="--targets {target}"' if target != "ort" else "")
        else:
            precision = b.split("-", 1)[1]
            p = _engine_for(model, precision, cfg)
            if trt_reason:
                skipped[b] = trt_reason
            elif not p.exists():
                skipped[b] = f"no engine {p}; build it with `make engine MODEL={model} PRECISION={precision}`"
            else:
                arts[b] = Artifact(b, p, _mb(p))
    return ModelPlan(model, onnx_path, onnx_image_size(onnx_path), arts, skipped)


def bench_input(batch: int, seed: int = 0, size: int = 224) -> np.ndarray:
    # Speed does not depend on pixel values for these dense models; a fixed seed keeps runs identical.
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size), dtype=np.float32)
