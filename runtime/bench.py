"""`scarlet bench`: every backend measured side by side, in one run, into the README's table.

How a number is made (also written into every report):
- Per model and batch size, all backends are loaded, warmed up (excluded), then measured in
  `repeats` interleaved rounds (A B C, B C A, ...), each backend for about `seconds` per
  round, so a machine that drifts (other users, turbo, thermal) affects every backend alike.
- Latency percentiles pool every call of every round. Throughput is images / busy time per
  round; the table shows the median round and the spread (max - min) / median across rounds.
- Speed-ups are paired: round r of a backend over round r of the reference (PyTorch eager,
  ORT FP32), then the median and range of those ratios. At batch 1 this is the mean-latency ratio.
- Memory: a fresh subprocess per backend imports the library, resets its high-water mark
  (/proc/self/clear_refs), loads the model, runs each batch; peak RSS growth (VmHWM - RSS after
  import) is reported: weights + arenas + activations, not the library's code. GPU memory is not.
- Work: MACs per image from the ONNX graph (runtime.flops); achieved GFLOP/s = 2 * MACs *
  images/s, against this machine's measured float32 matmul peak (runtime.peak).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from export.errors import ScarletError

from .ort import OrtOptions, physical_cores

BACKENDS = ("torch", "ort", "ort-int8", "trt-fp32", "trt-fp16", "trt-int8")
BACKEND_LABELS = {"torch": "PyTorch eager", "ort": "ORT FP32", "ort-int8": "ORT INT8",
                  "trt-fp32": "TensorRT FP32", "trt-fp16": "TensorRT FP16", "trt-int8": "TensorRT INT8"}
REFERENCES = ("torch", "ort")  # every row gets a speed-up against these two
TRT_PRECISIONS = ("fp32", "fp16", "int8")


# ---------------------------------------------------------------- statistics (pure)

@dataclass
class Ratio:
    median: float
    low: float
    high: float

    def text(self) -> str:
        return f"{self.median:.2f} ({self.low:.2f}-{self.high:.2f})"


@dataclass
class CellStats:
    """One (model, backend, batch) measurement, from per-round call latencies in seconds."""

    batch: int
    calls: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # images/s, median round
    throughput_rounds: list[float]
    spread_pct: float  # (max - min) / median of the rounds' throughput

    @classmethod
    def from_rounds(cls, rounds: Sequence[Sequence[float]], batch: int) -> "CellStats":
        if not rounds or any(len(r) == 0 for r in rounds):
            raise ValueError("every round needs at least one timed call")
        pooled = np.concatenate([np.asarray(r, np.float64) for r in rounds]) * 1e3
        p50, p90, p99 = np.percentile(pooled, [50, 90, 99])
        tput = [batch * len(r) / float(np.sum(r)) for r in rounds]
        med = float(np.median(tput))
        return cls(batch=batch, calls=int(pooled.size), p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99),
                   mean_ms=float(pooled.mean()), throughput=med, throughput_rounds=tput,
                   spread_pct=100.0 * (max(tput) - min(tput)) / med)


def paired_ratio(rounds: Sequence[float], reference: Sequence[float]) -> Ratio:
    """Speed-up of `rounds` over `reference`, round by round (they ran next to each other)."""
    if len(rounds) != len(reference) or not rounds:
        raise ValueError("paired ratios need the same, non-zero number of rounds")
    r = np.asarray(rounds, np.float64) / np.asarray(reference, np.float64)
    return Ratio(float(np.median(r)), float(r.min()), float(r.max()))


def round_orders(names: Sequence[str], repeats: int) -> list[list[str]]:
    """Rotate the order every round so no backend always runs first (caches, turbo budget)."""
    n = len(names)
    return [[names[(i + r) % n] for i in range(n)] for r in range(repeats)]


def measure_interleaved(calls: dict[str, Callable[[], list[float]]], repeats: int, seconds: float,
                        warmup_s: float = 0.5, min_calls: int = 3, progress=None,
                        settle_s: float = 0.05) -> dict[str, list[list[float]]]:
    """Run each timed call (returns latencies in s of the runs it made) for ~`seconds` per round, interleaved.

    Between rounds the machine idles `settle_s`: onnxruntime's and OpenMP's worker threads spin
    for a while after their last task, and must not steal cores from the next backend's round.
    """
    for call in calls.values():  # warm-up: thread pools, arenas, lazy init, caches; not recorded
        start, n = time.perf_counter(), 0
        while n < 2 or time.perf_counter() - start < warmup_s:
            call()
            n += 1
    out: dict[str, list[list[float]]] = {name: [] for name in calls}
    for order in round_orders(list(calls), repeats):
        for name in order:
            time.sleep(settle_s)
            lat: list[float] = []
            start = time.perf_counter()
            while len(lat) < min_calls or time.perf_counter() - start < seconds:
                lat += calls[name]()
            out[name].append(lat)
            if progress is not None:
                progress.update(1)
    return out


def wall_timer(runner, x: np.ndarray) -> Callable[[], list[float]]:
    def call() -> list[float]:
        t0 = time.perf_counter()
        runner.infer(x)
        return [time.perf_counter() - t0]

    return call


# ---------------------------------------------------------------- configuration and planning

@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["scarlet_a", "scarlet_b", "scarlet_c", "efficientnet_lite0"])
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    batches: list[int] = field(default_factory=lambda: [1, 8])
    threads: int | None = None  # None: physical cores, for torch and onnxruntime alike
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
        from export.registry import get_spec

        for m in self.models:
            get_spec(m)
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad:
            raise ScarletError(f"unknown backend(s) {', '.join(bad)}; choose from {', '.join(BACKENDS)}.")
        if not self.batches or any(b < 1 for b in self.batches):
            raise ScarletError(f"batch sizes must be positive integers, got {self.batches}.")
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


def ensure_onnx(model: str, build_dir: Path, loaded=None) -> Path:
    """build/<model>.onnx, exported through the project's exporter when missing (fresh clone).

    `loaded` (export.checkpoint.LoadedModel) saves loading the model a second time.
    """
    path = build_dir / f"{model}.onnx"
    if not path.exists():
        from export.onnx_export import ExportConfig, export_model

        export_model(ExportConfig(model=model, output=path), loaded)
    return path


def _engine_for(model: str, precision: str, cfg: BenchConfig) -> Path:
    for e in cfg.engines:  # an explicit --engine wins over the build-dir convention
        if e.name == f"{model}.{precision}.plan":
            return e
    return cfg.build_dir / f"{model}.{precision}.plan"


def trt_unavailable() -> str | None:
    """Why TensorRT backends cannot run here, or None when they can."""
    try:
        from .tensorrt import require_gpu  # lazy: pulls TensorRT and CUDA bindings

        require_gpu()
    except ScarletError as e:
        return str(e).rstrip(".")
    return None


def calibrate_int8(model: str, cfg: BenchConfig) -> None:
    """`scarlet calibrate-model --targets ort`, parsed by calib's own parser so its defaults
    (images, method, accuracy budget) stay the ones `make calib` uses; method comparison and
    its speed check are skipped since this run measures speed itself."""
    from calib import cli as calib_cli

    parser = argparse.ArgumentParser(prog="scarlet")
    calib_cli.register(parser.add_subparsers())
    args = parser.parse_args(["calibrate-model", "--model", model, "--out-dir", str(cfg.build_dir), "--targets", "ort",
                              "--no-compare", "--bench-rounds", "0", "--threads", str(cfg.threads),
                              "--report", str(cfg.reports_dir / f"calib-{model}")])
    args.func(args)


def plan_model(model: str, cfg: BenchConfig, loaded=None) -> ModelPlan:
    onnx_path = ensure_onnx(model, cfg.build_dir, loaded)
    arts: dict[str, Artifact] = {}
    skipped: dict[str, str] = {}
    trt_reason = trt_unavailable() if any(b.startswith("trt-") for b in cfg.backends) else None
    for b in cfg.backends:
        if b == "torch":
            arts[b] = Artifact(b, None, 0.0)  # size filled in once the model is built
        elif b == "ort":
            arts[b] = Artifact(b, onnx_path, _mb(onnx_path))
        elif b == "ort-int8":
            p = cfg.build_dir / f"{model}.int8.onnx"
            if not p.exists() and cfg.calibrate:
                try:
                    calibrate_int8(model, cfg)
                except ScarletError as e:
                    skipped[b] = f"calibration failed: {str(e).rstrip('.')}"
                    continue
            if p.exists():
                arts[b] = Artifact(b, p, _mb(p))
            else:
                skipped[b] = f"no calibrated INT8 model {p}; create it with `make calib MODEL={model}`"
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


# ---------------------------------------------------------------- runners

def load_baseline(model: str):
    """The PyTorch model as a user has it: the project's checkpoint loader (export.checkpoint.LoadedModel)."""
    from export.checkpoint import load_model

    return load_model(model)


def torch_module(module, channels_last: bool):
    import torch

    module = module.eval()
    return module.to(memory_format=torch.channels_last) if channels_last else module


def make_runner(backend: str, path: Path | None, threads: int, ort: OrtOptions, module=None):
    from .backends import OrtRunner, TorchRunner

    if backend == "torch":
        return TorchRunner(module, name="pytorch", threads=threads)
    if backend.startswith("ort"):
        return OrtRunner(path, name=backend, options=ort)
    from .tensorrt import TrtRunner

    return TrtRunner(path)


def timed_call(runner, batch: int, x: np.ndarray) -> Callable[[], list[float]]:
    """A call that runs the backend and returns per-run latencies in seconds.

    TensorRT times itself with CUDA events (host-side timing would add launch and sync
    jitter); its runs include the pinned host<->device copies, so they compare end to end.
    """
    if getattr(runner, "kind", None) == "trt":
        return lambda: [ms / 1e3 for ms in runner.time(batch, iters=10, warmup=0, include_copies=True)]
    return wall_timer(runner, x)


def bench_input(batch: int, seed: int = 0, size: int = 224) -> np.ndarray:
    # Speed does not depend on pixel values for these dense models; a fixed seed keeps runs identical.
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size), dtype=np.float32)


# ---------------------------------------------------------------- memory (subprocess probe)

def _status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the peak-RSS high-water mark to the current RSS
        return True
    except OSError:
        return False


def _probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh interpreter: peak RSS growth of loading and running one backend."""
    backend = spec["backend"]
    if backend == "torch":
        import torch  # noqa: F401  (imported before the baseline: library code is not the model's memory)
    else:
        import onnxruntime  # noqa: F401
    base = _status_kb()["VmRSS"]
    reset = _reset_hwm()
    if backend == "torch":  # same architecture and tensor sizes as the trained model; values do not matter
        from export.registry import get_spec

        module = torch_module(get_spec(spec["model"]).create(), spec["channels_last"])
    else:
        module = None
    peaks = {}
    with make_runner(backend, spec["path"], spec["threads"], OrtOptions(**spec["ort"]), module) as runner:
        for b in spec["batches"]:  # ascending: the peak after batch b is what serving batches <= b needs
            runner.infer(bench_input(b, size=spec["size"]))
            runner.infer(bench_input(b, size=spec["size"]))  # arenas may grow on the second call as well
            peaks[str(b)] = (_status_kb()["VmHWM"] - base) / 1024
    return {"peak_mb": peaks, "baseline_mb": base / 1024, "hwm_reset": reset}


def measure_memory(model: str, backend: str, art: Artifact, cfg: BenchConfig, size: int = 224) -> dict[str, Any]:
    spec = {"model": model, "backend": backend, "path": str(art.path) if art.path else None,
            "batches": cfg.batches, "threads": cfg.threads, "size": size, "ort": asdict(cfg.ort), "channels_last": cfg.torch_channels_last}
    proc = subprocess.run([sys.executable, "-m", "runtime.bench", "--memory-probe", json.dumps(spec)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": f"memory probe failed: {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- onnxruntime tuning

TUNE_MARGIN = 0.03  # a setting must beat the default by more than round-to-round noise to replace it


def tune_grid(threads: int) -> list[OrtOptions]:
    # "basic" is left out: it skips the fusions (QDQ -> QLinearConv among them) that INT8 models need.
    thread_choices = sorted({threads, os.cpu_count() or threads})  # physical vs logical cores
    return [OrtOptions(t, lvl, mode, arena) for t in thread_choices for lvl in ("extended", "all")
            for mode in ("sequential", "parallel") for arena in (True, False)]


def tune_ort(onnx_path: Path, batch: int, cfg: BenchConfig, repeats: int = 3, seconds: float = 0.5,
             warmup_s: float = 0.2, progress=None) -> dict[str, Any]:
    """Try the grid on one model, interleaved like the main run.

    The fastest median throughput wins, but only if it beats the default settings by more
    than TUNE_MARGIN; otherwise the default stays (a noisy 1 % "win" is not a finding).
    """
    from .backends import OrtRunner

    grid = tune_grid(cfg.threads)
    if cfg.ort not in grid:
        grid.insert(0, cfg.ort)
    x = bench_input(batch, cfg.seed, onnx_image_size(onnx_path))
    runners = {f"option{i}": OrtRunner(onnx_path, options=o).load() for i, o in enumerate(grid)}
    try:
        rounds = measure_interleaved({k: wall_timer(r, x) for k, r in runners.items()}, repeats, seconds,
                                     warmup_s=warmup_s, progress=progress)
    finally:
        for r in runners.values():
            r.close()
    rows = [{"options": asdict(o), "throughput": CellStats.from_rounds(rounds[f"option{i}"], batch).throughput}
            for i, o in enumerate(grid)]
    rows.sort(key=lambda r: -r["throughput"])
    default = next(r for r in rows if r["options"] == asdict(cfg.ort))
    best = rows[0]
    gain = best["throughput"] / default["throughput"]
    chosen = best if gain > 1 + TUNE_MARGIN else default
    return {"model": onnx_path.stem, "batch": batch, "grid": rows, "best": best["options"], "winner": chosen["options"],
            "default": default["options"], "gain_over_default": gain, "margin": TUNE_MARGIN}


# ---------------------------------------------------------------- the run

def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def known_accuracy(plan: ModelPlan, reports_dir: Path) -> dict[str, float]:
    """top-1 (%) per backend from earlier reports, for the accuracy-vs-latency plot.

    `make calib` writes reports/calib-<model>.json (FP32 and INT8 top-1 on held-out images);
    it is used only when it was made from the very ONNX benchmarked here (sha256).
    `scarlet verify` (reports/verify-<model>.json: PyTorch reference and one row per backend file) adds to it.
    """
    from export.artifacts import sha256_file

    out: dict[str, float] = {}
    calib = _read_json(reports_dir / f"calib-{plan.model}.json")
    if calib and calib.get("source_onnx_sha256") == sha256_file(plan.onnx):
        if (calib.get("fp32") or {}).get("top1") is not None:
            out["ort"] = float(calib["fp32"]["top1"])
        int8 = plan.artifacts.get("ort-int8")
        for t in calib.get("targets", []):
            if t.get("target") == "ort" and int8 and Path(t.get("output", "")).name == int8.path.name \
                    and (t.get("int8") or {}).get("top1") is not None:
                out["ort-int8"] = float(t["int8"]["top1"])
    verify = _read_json(reports_dir / f"verify-{plan.model}.json")
    if verify:  # top-1 there is a fraction; rows are matched to what is benchmarked by file name
        ref = verify.get("reference") or {}
        if ref.get("top1") is not None and "torch" in plan.artifacts:
            out["torch"] = 100 * float(ref["top1"])
        names = {a.path.name: b for b, a in plan.artifacts.items() if a.path is not None}
        for row in verify.get("backends") or []:
            b = names.get(Path(row.get("path") or "").name)
            if b and row.get("top1") is not None:
                out[b] = 100 * float(row["top1"])
    return out


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds since boot: busy on the whole machine (/proc/stat), stolen by the hypervisor,
    and used by this process and the children it waited for (getrusage)."""
    busy: float
    steal: float
    own: float

    @classmethod
    def now(cls, stat_path: str = "/proc/stat") -> "CpuTimes | None":
        import resource

        try:
            with open(stat_path) as f:
                fields = [float(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0.0] * 8)[:8]
        own = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for a in ("ru_utime", "ru_stime"))
        return cls((user + nice + system + irq + softirq) / hz, steal / hz, own)


def machine_load(start: CpuTimes | None, end: CpuTimes | None, wall_s: float, cpus: int) -> dict[str, float] | None:
    """What else ran during a measurement, as percent of all CPUs: benchmarks on a shared or
    noisy machine are only comparable when this is near zero."""
    if start is None or end is None or wall_s <= 0:
        return None
    capacity = wall_s * cpus
    other = max(0.0, (end.busy - start.busy) - (end.own - start.own))
    return {"other_processes_pct": 100 * other / capacity, "steal_pct": 100 * (end.steal - start.steal) / capacity}


LOAD_WARN_PCT = 5.0


def load_text(load: dict[str, float] | None) -> str:
    if load is None:
        return "Machine load not measured (no /proc/stat)."
    text = (f"Other processes used {load['other_processes_pct']:.1f} % of the CPUs during the run "
            f"(hypervisor steal {load['steal_pct']:.1f} %).")
    if load["other_processes_pct"] + load["steal_pct"] > LOAD_WARN_PCT:
        text += " **Over 5 %: these numbers are suspect; rerun on an idle machine.**"
    return text


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    from tqdm import tqdm

    from .peak import measure_peak
    from .report import environment

    t_start, cpu_start = time.perf_counter(), CpuTimes.now()
    # Sampled before and after every model, best kept: one sample taken while the machine is busy
    # would understate the peak and overstate every "% peak".
    peaks = [measure_peak(cfg.peak_seconds, threads=cfg.threads)]
    # Loaded once, up front: the checkpoint loader can take seconds (seeded weights re-estimate BN
    # statistics), and a missing ONNX is exported from the same LoadedModel.
    loaded = {}
    if "torch" in cfg.backends or any(not (cfg.build_dir / f"{m}.onnx").exists() for m in cfg.models):
        loaded = {m: load_baseline(m) for m in tqdm(cfg.models, desc="load models", unit="model")}
    plans = [plan_model(m, cfg, loaded.get(m)) for m in cfg.models]
    tune = None
    if cfg.tune:
        with tqdm(total=(len(tune_grid(cfg.threads)) + 1) * 3, desc=f"tune ort ({plans[0].model})", unit="round") as bar:
            tune = tune_ort(plans[0].onnx, max(cfg.batches), cfg, progress=bar)
        cfg.ort = OrtOptions(**tune["winner"])

    total = sum(len(p.artifacts) for p in plans) * len(cfg.batches) * cfg.repeats
    models: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    with tqdm(total=total, desc="bench", unit="round") as bar:
        for plan in plans:
            module = torch_module(loaded[plan.model].model, cfg.torch_channels_last) if "torch" in plan.artifacts else None
            model_rows, models[plan.model] = bench_model(plan, module, cfg, bar)
            models[plan.model]["weights"] = getattr(loaded.get(plan.model), "source", None)  # pretrained or seeded
            rows += model_rows
            peaks.append(measure_peak(cfg.peak_seconds, threads=cfg.threads))
    peak = max(peaks, key=lambda p: p.gflops)
    for r in rows:
        r["pct_peak"] = 100 * r["gflops"] / peak.gflops
    elapsed = time.perf_counter() - t_start
    return {
        "environment": environment(),
        "config": {"models": cfg.models, "backends": cfg.backends, "batches": cfg.batches, "threads": cfg.threads,
                   "repeats": cfg.repeats, "seconds": cfg.seconds, "warmup_s": cfg.warmup_s, "input": "seeded N(0,1) float32"},
        "settings": {"torch": {"mode": "eval + torch.inference_mode", "threads": cfg.threads,
                               "channels_last": cfg.torch_channels_last},
                     "ort": {**asdict(cfg.ort), "provider": "CPUExecutionProvider"}},
        "peak": {**peak.to_dict(), "samples_gflops": [p.gflops for p in peaks]},
        "tune": tune,
        "models": models,
        "results": rows,
        "elapsed_s": elapsed,
        "machine_load": machine_load(cpu_start, CpuTimes.now(), elapsed, os.cpu_count() or 1),
    }


def bench_model(plan: ModelPlan, module, cfg: BenchConfig, bar) -> tuple[list[dict], dict]:
    """Every backend of one model at every batch size: the rows, and the model's report entry."""
    from .flops import count_macs

    macs = count_macs(plan.onnx)
    if module is not None:
        plan.artifacts["torch"].size_mb = sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 2 ** 20
    memory = {b: measure_memory(plan.model, b, a, cfg, plan.image_size) for b, a in plan.artifacts.items()
              if cfg.memory and not b.startswith("trt-")}
    runners, rows = {}, []
    try:
        for b, a in plan.artifacts.items():
            try:  # a plan built for another GPU or TensorRT version is reported, not fatal
                runners[b] = make_runner(b, a.path, cfg.threads, cfg.ort, module).load()
            except ScarletError as e:
                plan.skipped[b] = str(e).rstrip(".")
                bar.update(len(cfg.batches) * cfg.repeats)
        for batch in cfg.batches:
            bar.set_description(f"{plan.model} b={batch}")
            x = bench_input(batch, cfg.seed, plan.image_size)
            calls = {}
            for b, r in runners.items():
                call = timed_call(r, batch, x)
                try:  # e.g. a batch outside a TensorRT plan's profile: skip that cell, say why
                    call()
                    calls[b] = call
                except ScarletError as e:
                    plan.skipped[b] = f"batch {batch}: {str(e).rstrip('.')}"
                    bar.update(cfg.repeats)
            rounds = measure_interleaved(calls, cfg.repeats, cfg.seconds, cfg.warmup_s, progress=bar)
            stats = {b: CellStats.from_rounds(r, batch) for b, r in rounds.items()}
            rows += [_row(plan, b, st, stats, macs.macs, memory.get(b)) for b, st in stats.items()]
    finally:
        for r in runners.values():
            r.close()
    entry = {"onnx": str(plan.onnx), "macs": macs.to_dict(), "skipped": plan.skipped,
             "artifacts": {b: {"path": str(a.path) if a.path else None, "size_mb": a.size_mb}
                           for b, a in plan.artifacts.items()},
             "memory": memory, "accuracy": known_accuracy(plan, cfg.reports_dir)}
    return rows, entry


def _row(plan: ModelPlan, backend: str, s: CellStats, stats: dict[str, CellStats], macs: int,
         memory: dict[str, Any] | None) -> dict[str, Any]:
    gflops = 2 * macs * s.throughput / 1e9
    row = {"model": plan.model, "backend": backend, **asdict(s), "gflops": gflops,
           "pct_peak": None,  # set once the run's best peak sample is known
           "size_mb": plan.artifacts[backend].size_mb,
           "mem_mb": (memory or {}).get("peak_mb", {}).get(str(s.batch))}
    for ref in REFERENCES:
        if ref in stats:
            row[f"vs_{ref}"] = asdict(paired_ratio(s.throughput_rounds, stats[ref].throughput_rounds))
            row[f"latency_vs_{ref}"] = stats[ref].p50_ms / s.p50_ms
    return row


# ---------------------------------------------------------------- reports

def _ratio_text(r: dict[str, float] | None) -> str:
    return "-" if r is None else Ratio(**r).text()


def _num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


TABLE_HEADERS = ("Model", "Backend", "Batch", "p50 ms", "p90 ms", "p99 ms", "img/s", "spread",
                 "x PyTorch", "x ORT FP32", "GFLOP/s", "% peak", "Mem MB", "File MB")


def render_markdown(data: dict[str, Any]) -> str:
    from .report import markdown_table

    env, peak, st = data["environment"], data["peak"], data["settings"]
    rows = [(r["model"], BACKEND_LABELS.get(r["backend"], r["backend"]), r["batch"], _num(r["p50_ms"], 2),
             _num(r["p90_ms"], 2), _num(r["p99_ms"], 2), _num(r["throughput"]), f"{r['spread_pct']:.0f}%",
             _ratio_text(r.get("vs_torch")), _ratio_text(r.get("vs_ort")), _num(r["gflops"]), _num(r["pct_peak"]),
             _num(r["mem_mb"], 0), _num(r["size_mb"]))
            for r in data["results"]]
    lines = [
        "## Performance",
        "",
        f"Measured {env['date']} on {env['machine']['cpu']} ({env['machine']['logical_cpus']} logical CPUs) by "
        f"`scarlet bench`; {data['config']['repeats']} interleaved rounds of ~{data['config']['seconds']:g} s per "
        f"backend after warm-up, whole run {data['elapsed_s']:.0f} s. {load_text(data.get('machine_load'))}",
        f"Machine peak: {peak['gflops']:.1f} GFLOP/s ({peak['method']}, {peak['threads']} threads; best of "
        f"{len(peak['samples_gflops'])} samples taken before and after each model).",
        f"PyTorch eager: {st['torch']['mode']}, {st['torch']['threads']} threads, "
        f"channels_last {'on' if st['torch']['channels_last'] else 'off'}. onnxruntime (CPU): {_ort_text(st['ort'])}.",
        "",
        markdown_table(TABLE_HEADERS, rows).rstrip(),
        "",
        "img/s: median of the rounds; spread: (max - min) / median over rounds. Speed-ups: images/s paired round by "
        "round, median (min-max); at batch 1 that is the mean-latency ratio. GFLOP/s = 2 x MACs/image x img/s. "
        "Mem MB: peak RSS growth of a fresh process loading that backend and running batches up to this one "
        "(weights, arenas, activations; not library code, not GPU memory). File MB: the artifact run "
        "(PyTorch: state_dict bytes).",
        "",
        "Work per image: " + ", ".join(f"{m} {v['macs']['macs'] / 1e6:.0f}M MACs" for m, v in data["models"].items()) + ".",
    ]
    skipped = skipped_lines(data)
    if skipped:
        lines += ["", "Not measured:"] + skipped
    if data.get("tune"):
        t = data["tune"]
        kept = t["winner"] == t["default"]
        lines += ["", f"onnxruntime tuning ({t['model']}, batch {t['batch']}, {len(t['grid'])} settings): best "
                      f"{_ort_text(t['best'])} at {t['gain_over_default']:.2f}x the default; "
                      + ("default kept (gain within the noise margin)." if kept else "used for this run.")]
    lines += ["", "Summary (largest batch speed-ups; batch-1 p50 latency ratios):"] + summary_lines(data)
    return "\n".join(lines) + "\n"


def skipped_lines(data: dict[str, Any]) -> list[str]:
    """One line per reason (TensorRT missing is one line, not one per model and precision)."""
    by_reason: dict[str, dict[str, list[str]]] = {}
    for m, v in data["models"].items():
        for b, why in v["skipped"].items():
            by_reason.setdefault(why, {}).setdefault(m, []).append(BACKEND_LABELS.get(b, b))
    lines = []
    for why, per_model in by_reason.items():
        by_backends: dict[tuple[str, ...], list[str]] = {}
        for m, backends in per_model.items():
            by_backends.setdefault(tuple(backends), []).append(m)
        for backends, models in by_backends.items():
            lines.append(f"- {', '.join(backends)} ({', '.join(models)}): {why}.")
    return lines


README_BEGIN, README_END = "<!-- scarlet bench: begin -->", "<!-- scarlet bench: end -->"


def update_readme(path: str | os.PathLike, markdown: str) -> None:
    """Replace the README's performance section between the markers, nothing else."""
    from export.artifacts import write_bytes_atomic

    text = Path(path).read_text()
    if README_BEGIN not in text or README_END not in text or text.index(README_BEGIN) > text.index(README_END):
        raise ScarletError(f"{path} has no performance section to replace; add the two lines {README_BEGIN} and "
                           f"{README_END} where the table belongs.")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    write_bytes_atomic(path, f"{head}{README_BEGIN}\n{markdown.rstrip()}\n{README_END}{tail}".encode())


def _ort_text(o: dict[str, Any]) -> str:
    return f"{o['threads']} threads, {o['opt_level']}, {o['execution_mode']}, arena {'on' if o['memory_arena'] else 'off'}"


def summary_lines(data: dict[str, Any]) -> list[str]:
    """The numbers the project's targets are stated in, one line per model."""
    big, out = max(data["config"]["batches"]), []
    for m in data["models"]:
        cell = {(r["backend"], r["batch"]): r for r in data["results"] if r["model"] == m}
        parts = []
        for b, ref, label in (("ort", "torch", "ORT FP32 / PyTorch"), ("ort-int8", "ort", "ORT INT8 / ORT FP32")):
            r = cell.get((b, big))
            if r and r.get(f"vs_{ref}"):
                parts.append(f"{label} {r[f'vs_{ref}']['median']:.2f}x at batch {big}")
        r1 = cell.get(("ort", 1))
        if r1 and "latency_vs_torch" in r1:
            parts.append(f"batch-1 latency PyTorch / ORT FP32 {r1['latency_vs_torch']:.2f}x")
        out.append(f"- {m}: " + ("; ".join(parts) if parts else "no comparable pair measured") + ".")
    return out


def plot(data: dict[str, Any], path: str | os.PathLike) -> None:
    """Throughput vs batch per backend, one panel per model; accuracy vs latency when verify ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from export.artifacts import atomic_path

    models = list(data["models"])
    with_acc = [m for m in models if data["models"][m].get("accuracy")]
    fig, axes = plt.subplots(2 if with_acc else 1, len(models), figsize=(4.2 * len(models), 7.5 if with_acc else 3.8),
                             squeeze=False)
    colour = {b: f"C{i}" for i, b in enumerate(BACKENDS)}  # one colour per backend in every panel
    for i, m in enumerate(models):
        ax = axes[0][i]
        for b in BACKENDS:
            pts = sorted((r["batch"], r["throughput"]) for r in data["results"] if r["model"] == m and r["backend"] == b)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colour[b], label=BACKEND_LABELS[b])
        ax.set(title=m, xlabel="batch", ylabel="images/s")
        ax.set_ylim(bottom=0)  # ratios read honestly only from a zero baseline
        ax.set_xticks(data["config"]["batches"])
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
        if with_acc:
            ax2 = axes[1][i]
            acc = data["models"][m].get("accuracy", {})
            pts = [(r["p50_ms"], acc[r["backend"]], r["backend"]) for r in data["results"]
                   if r["model"] == m and r["batch"] == min(data["config"]["batches"]) and r["backend"] in acc]
            if not pts:
                ax2.text(0.5, 0.5, "no calib/verify\nresults", ha="center", va="center", transform=ax2.transAxes)
                ax2.set_axis_off()
                continue
            for x, y, b in pts:
                ax2.scatter(x, y, color=colour[b])
                ax2.annotate(BACKEND_LABELS[b], (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
            ax2.set(xlabel=f"batch-{min(data['config']['batches'])} p50 latency (ms)", ylabel="top-1 % (calib/verify)")
            ax2.set_xlim(0, 1.3 * max(x for x, _, _ in pts))  # room for the labels
            ax2.grid(alpha=0.3)
    fig.suptitle(f"scarlet bench, {data['environment']['date']}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# ---------------------------------------------------------------- CLI

def _csv(kind: type):
    def parse(text: str) -> list:
        try:
            return [kind(t.strip()) for t in text.split(",") if t.strip()]
        except ValueError:
            raise ScarletError(f"cannot parse {text!r} as a comma-separated list of {kind.__name__}.") from None

    return parse


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure every backend side by side; write the README's performance table")
    p.add_argument("--models", type=_csv(str), default=BenchConfig().models)
    p.add_argument("--backends", type=_csv(str), default=list(BACKENDS),
                   help="subset of " + ",".join(BACKENDS) + " (unavailable ones are skipped with a reason)")
    p.add_argument("--batch", type=_csv(int), default=[1, 8], help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch and onnxruntime (default: physical cores)")
    p.add_argument("--build-dir", type=Path, default=Path("build"))
    p.add_argument("--engine", type=Path, nargs="+", action="extend", default=[],
                   help="TensorRT plans named <model>.<fp32|fp16|int8>.plan (default: looked for in --build-dir)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds per measurement")
    p.add_argument("--seconds", type=float, default=1.0, help="time per backend per round")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per backend (not recorded)")
    p.add_argument("--tune", action="store_true", help="try a small onnxruntime settings grid first; use the winner")
    p.add_argument("--calibrate-missing", action="store_true",
                   help="create a missing build/<model>.int8.onnx as `make calib` does (minutes per model)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak memory per backend in a subprocess")
    p.add_argument("--channels-last", action="store_true", help="run the PyTorch baseline in channels_last")
    p.add_argument("--reports-dir", type=Path, default=Path("reports"), help="where verify-<model>.json are read from")
    p.add_argument("--json")
    p.add_argument("--markdown")
    p.add_argument("--plot")
    p.add_argument("--readme", type=Path, default=None,
                   help=f"also replace the section between {README_BEGIN} and {README_END} in this file")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = BenchConfig(models=args.models, backends=args.backends, batches=args.batch, threads=args.threads,
                      build_dir=args.build_dir, engines=args.engine, repeats=args.repeats, seconds=args.seconds,
                      warmup_s=args.warmup, memory=args.memory, tune=args.tune, calibrate=args.calibrate_missing,
                      torch_channels_last=args.channels_last,
                      reports_dir=args.reports_dir)
    from .report import write_reports

    data = {"command": " ".join(["scarlet", *sys.argv[1:]]), **run_bench(cfg)}
    md = render_markdown(data)
    write_reports(data, md, args.json, args.markdown)
    if args.plot:
        plot(data, args.plot)
    if args.readme:
        update_readme(args.readme, md)
    print(md)
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--memory-probe"]:
    print(json.dumps(_probe(json.loads(sys.argv[2]))))
