"""`scarlet gpu-check` (`make gpu-check`): TensorRT fp32/fp16/int8 plans per model, verified against PyTorch and timed.

    scarlet gpu-check --build-dir build [--models scarlet_a] [--precisions fp16 int8] [--budget 540] --report reports/gpu-check

It starts with `scarlet doctor`'s findings and stops within seconds (exit 2), naming
everything that is missing, when TensorRT 11, cuda-python or a GPU is not there: a lent GPU
machine has no network, so what is installed is what there is. Otherwise it exports (and
calibrates) the ONNX it needs when missing, builds each plan (timing cache shared across
builds), compares logits with PyTorch on real images (top-1 agreement, relative logit error,
top-1 accuracy where folder names are wnids) and times batch 1 and the profile's opt batch
with CUDA events.

The report (JSON + markdown) is rewritten after every row, so a run stopped at a machine's
time limit keeps every row it finished. The time budget is checked inside the work too: a
calibration runs in a child process stopped at the deadline, TensorRT cancels a build that
runs past it, and rows it leaves no time for are reported as skipped. `--models` and
`--precisions` split a long check into runs that fit.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scarlet_deploy.export.fp16 import logit_agreement
from scarlet_deploy.export.trt_build import BatchProfile, EngineConfig, build_engine, check_int8_onnx, int8_onnx_path
from scarlet_deploy.runtime import doctor
from scarlet_deploy.runtime.core.artifacts import read_manifest
from scarlet_deploy.runtime.core.errors import OutOfTime, ScarletError
from scarlet_deploy.runtime.core.report import environment, markdown_table, write_reports
from scarlet_deploy.runtime.runners.trt import CaptureError, TrtRunner, require_gpu

MODELS = ("scarlet_a", "scarlet_b", "scarlet_c", "efficientnet_lite0")
PRECISIONS = ("fp32", "fp16", "int8")
PROFILE = (1, 8, 32)
# A lent GPU machine stops a command after 600 s; what is left after the budget is for the
# last row's writing and the process's exit.
BUDGET_S = 9 * 60
# A calibration told to stop gets this long to clean up before it is killed.
STOP_GRACE_S = 15
# What "verified" means per precision (top-1 agreement with PyTorch, max relative logit error).
# INT8 has no logit bound: quantization noise is judged by agreement alone.
GATES = {"fp32": (0.99, 1e-3), "fp16": (0.97, 5e-2), "int8": (0.85, None)}


@dataclass
class Deadline:
    """A time budget started at creation; `clock` is injectable so the budget logic is testable."""

    budget_s: float
    clock: Callable[[], float] = time.monotonic
    start: float = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.clock()

    @property
    def at(self) -> float:
        return self.start + self.budget_s

    def left(self) -> float:
        return self.at - self.clock()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise OutOfTime(f"over the {self.budget_s:.0f} s budget before {what}")


@dataclass
class CheckConfig:
    build_dir: Path
    report: Path  # prefix: writes REPORT.json and REPORT.md
    val_dir: Path | None = None
    models: tuple[str, ...] = MODELS
    precisions: tuple[str, ...] = PRECISIONS
    images: int = 200
    iters: int = 200
    warmup: int = 20
    budget_s: float = BUDGET_S


@dataclass
class Row:
    model: str
    precision: str
    status: str  # ok | FAILED... | skipped: why
    plan: str | None = None
    build_s: float | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    top1: float | None = None
    timings: dict[str, dict[str, float]] = field(default_factory=dict)


class ReportWriter:
    """The JSON + markdown report, rewritten (atomically) after every row."""

    def __init__(self, prefix: Path, header: dict[str, Any], cells: int):
        self.prefix = Path(prefix)
        self.data = header | {"rows": [], "cells": cells, "complete": False}

    def add(self, row: Row) -> None:
        self.data["rows"].append(asdict(row))
        self.write()

    def finish(self, **extra: Any) -> dict[str, Any]:
        self.data |= extra | {"complete": True}
        self.write()
        return self.data

    def write(self) -> None:
        write_reports(self.data, markdown(self.data), f"{self.prefix}.json", f"{self.prefix}.md")


def run_rows(cells: Iterable[tuple[str, str]], work: Callable[[str, str], Row], deadline: Deadline,
             writer: ReportWriter, bar=None) -> list[Row]:
    """Each (model, precision) cell's row, written to the report as soon as it is known.

    A cell that finds the budget spent, or runs out of it, is skipped with the reason; any
    other ScarletError fails that cell only, so one bad plan does not hide the others.
    """
    rows = []
    for model, precision in cells:
        if bar is not None:
            bar.set_postfix_str(f"{model} {precision}")
        try:
            deadline.check(f"{model} {precision}")
            row = work(model, precision)
        except OutOfTime as e:
            row = Row(model, precision, f"skipped: {str(e).rstrip('.')}")
        except ScarletError as e:
            row = Row(model, precision, f"FAILED: {str(e).rstrip('.')}")
        writer.add(row)
        rows.append(row)
        if bar is not None:
            bar.update()
    return rows


def _stats(ms: list[float], batch: int) -> dict[str, float]:
    a = np.asarray(ms)
    return {"batch": batch, "median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "images_per_s": float(batch * 1000 / np.median(a))}


def _images(val_dir: Path | None, n: int) -> tuple[list[Path], np.ndarray | None]:
    """`n` images spread over the folder, and labels when the folders are ImageNet wnids."""
    from scarlet_deploy.runtime.data.classes import wnid_to_index
    from scarlet_deploy.runtime.data.images import default_val_dir, list_images

    root = val_dir or default_val_dir()
    if root is None:
        raise ScarletError("no validation images: pass --val-dir DIR (or set SCARLET_VAL_DIR).")
    files = list_images(root)
    if not files:
        raise ScarletError(f"{root} holds no images.")
    files = files[:: max(len(files) // n, 1)][:n]
    index = wnid_to_index()
    labels = [index.get(p.parent.name) for p in files]
    return files, (np.array(labels) if all(v is not None for v in labels) else None)


def calibrate_within(model: str, cfg: CheckConfig, deadline: Deadline) -> None:
    """`scarlet calibrate-model --targets trt` (the settings of `make calib`) in a child process,
    stopped at the deadline: a calibration cannot be interrupted from inside this process, and
    a child told to stop (SIGINT) leaves nothing half-written."""
    cmd = [sys.executable, "-m", "scarlet_deploy.runtime.cli", "calibrate-model", "--model", model,
           "--out-dir", str(cfg.build_dir), "--targets", "trt", "--report", str(cfg.report.parent / f"calib-{model}")]
    cmd += ["--val-dir", str(cfg.val_dir)] if cfg.val_dir else []
    deadline.check(f"calibrating {model}")
    child = subprocess.Popen(cmd)
    try:
        rc = child.wait(timeout=max(deadline.left(), 0))
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise OutOfTime(f"over the {deadline.budget_s:.0f} s budget while calibrating {model} (stopped; run "
                        f"`make calib MODEL={model}` first, then gpu-check again)") from None
    if rc != 0:
        raise ScarletError(f"calibrating {model} failed (`{' '.join(cmd[2:])}` exited {rc}); see its message above")


class Checker:
    """The work of one gpu-check run: per-model inputs made once, then one row per precision."""

    def __init__(self, cfg: CheckConfig, deadline: Deadline, files: list[Path], labels: np.ndarray | None):
        self.cfg, self.deadline, self.files, self.labels = cfg, deadline, files, labels
        self._inputs: dict[str, tuple[Path, np.ndarray, np.ndarray]] = {}

    def inputs(self, model: str) -> tuple[Path, np.ndarray, np.ndarray]:
        """(FP32 ONNX, preprocessed images, PyTorch logits) for `model`, exported when missing."""
        if model not in self._inputs:
            from scarlet_deploy.export.onnx_export import ensure_onnx
            from scarlet_deploy.export.registry import get_spec
            from scarlet_deploy.runtime.data.preprocess import load_batch
            from scarlet_deploy.runtime.runners.pytorch import TorchRunner

            path = self.cfg.build_dir / f"{model}.onnx"
            if not path.is_file():
                self.deadline.check(f"exporting {path}")
                print(f"exporting {path}", file=sys.stderr)
                ensure_onnx(model, self.cfg.build_dir)
            x = load_batch(self.files, get_spec(model).preprocess, "reference")
            # The reference on the GPU too (TF32 off: still an FP32 reference), as `scarlet verify --device cuda` runs it.
            with TorchRunner(_reference_model(model, path), device="cuda:0") as torch_runner:
                ref = np.concatenate([torch_runner.infer(x[i:i + 32]) for i in range(0, len(x), 32)])
            self._inputs[model] = (path, x, ref)
        return self._inputs[model]

    def int8_onnx(self, model: str, onnx_path: Path) -> Path:
        """The TensorRT Q/DQ ONNX of `onnx_path`: calibrated when missing, refused when stale."""
        path = int8_onnx_path(onnx_path)
        if not path.is_file():
            calibrate_within(model, self.cfg, self.deadline)
        check_int8_onnx(path, onnx_path)
        return path

    def __call__(self, model: str, precision: str) -> Row:
        cfg, deadline = self.cfg, self.deadline
        onnx_path, x, reference = self.inputs(model)
        int8 = self.int8_onnx(model, onnx_path) if precision == "int8" else None
        plan = cfg.build_dir / f"{model}.{precision}.plan"
        deadline.check(f"building {plan}")
        r = build_engine(EngineConfig(onnx_path, precision, plan, int8_onnx=int8, batch=BatchProfile(*PROFILE),
                                      timing_cache=cfg.build_dir / "timing.cache"), deadline=deadline.at)
        row = Row(model, precision, "ok", str(plan), None if r.reused else round(r.seconds, 1))
        with TrtRunner(plan) as runner:
            logits = runner.infer(x)
            if not np.isfinite(logits).all():
                raise ScarletError(f"{plan} gives non-finite logits on real images")
            row.parity = logit_agreement(reference, logits)
            if self.labels is not None:
                row.top1 = float((logits.argmax(1) == self.labels).mean())
            b = PROFILE[1]
            for key, batch, copies in (("b1", 1, False), (f"b{b}", b, False), (f"b{b}+copies", b, True)):
                deadline.check(f"timing {plan} {key}")
                try:
                    ms, graph = runner.time(batch, cfg.iters, cfg.warmup, include_copies=copies, cuda_graph=True), True
                except CaptureError:  # TensorRT enqueues work a graph cannot hold: time plain launches
                    ms, graph = runner.time(batch, cfg.iters, cfg.warmup, include_copies=copies), False
                row.timings[key] = _stats(ms, batch) | {"cuda_graph": graph}
        agree, max_rel = GATES[precision]
        if row.parity["top1_agreement"] < agree or (max_rel is not None and row.parity["rel_err_max"] > max_rel):
            row.status = "FAILED"
        return row


def _reference_model(model: str, onnx_path: Path):
    """The PyTorch model with the weights the ONNX was exported from (per its manifest)."""
    from scarlet_deploy.export.checkpoint import load_model

    m = read_manifest(onnx_path) or {}
    source = m.get("weights_source")
    checkpoint = source if m.get("pretrained") and source and Path(source).is_file() else None
    loaded = load_model(model, bool(m.get("let", False)), checkpoint)
    if m.get("checkpoint_sha256") and m["checkpoint_sha256"] != loaded.checkpoint_sha256:
        raise ScarletError(f"{onnx_path} was exported from other weights ({m['checkpoint_sha256']}) than PyTorch "
                           f"loads here ({loaded.checkpoint_sha256}); re-export it (make export) before gpu-check.")
    return loaded.model


def preflight(build_dir: Path) -> dict[str, Any]:
    """doctor's findings, or a ScarletError naming everything TensorRT plans still need here."""
    found = doctor.probe(build_dir)
    if found["missing_for_tensorrt"]:
        raise ScarletError("gpu-check cannot run TensorRT plans here: " + "; ".join(
            found["missing_for_tensorrt"]) + ". Found: " + "; ".join(
            f"{k}: {v}" for k, v in doctor.rows(found) if k in ("torch", "gpu", "driver")) + ".")
    return found


def run_check(cfg: CheckConfig) -> dict[str, Any]:
    """Every (model, precision) row, each written to the report as it finishes."""
    from tqdm import tqdm

    deadline = Deadline(cfg.budget_s)
    found = preflight(cfg.build_dir)  # within seconds, before anything is exported, built or written
    here = require_gpu()
    files, labels = _images(cfg.val_dir, cfg.images)
    cfg.build_dir.mkdir(parents=True, exist_ok=True)
    cells = [(m, p) for m in cfg.models for p in cfg.precisions]
    writer = ReportWriter(cfg.report, {
        "environment": environment(), "doctor": found,
        "tensorrt": here.tensorrt, "gpu": {"name": here.gpu_name, "compute_capability": here.compute_capability},
        "images": len(files), "labelled": labels is not None, "profile": list(PROFILE),
        "iters": cfg.iters, "warmup": cfg.warmup, "gates": GATES, "budget_s": cfg.budget_s,
        "reference": "PyTorch (CUDA, float32, TF32 off) on the reference preprocessing; plans use the same inputs",
    }, len(cells))
    writer.write()
    with tqdm(total=len(cells), desc="gpu-check", unit="plan") as bar:
        run_rows(cells, Checker(cfg, deadline, files, labels), deadline, writer, bar)
    return writer.finish(seconds=round(deadline.clock() - deadline.start, 1))


def markdown(data: dict[str, Any]) -> str:
    b = PROFILE[1]
    rows = [[r["model"], r["precision"], r["status"], r["build_s"], r["parity"].get("top1_agreement"),
             r["parity"].get("rel_err_max"), r["top1"],
             *(r["timings"].get(k, {}).get("median_ms") for k in ("b1", f"b{b}", f"b{b}+copies")),
             r["timings"].get(f"b{b}", {}).get("images_per_s")] for r in data["rows"]]
    plain = sorted({f"{r['model']} {r['precision']}" for r in data["rows"]
                    if any(t.get("cuda_graph") is False for t in r["timings"].values())})
    done = (f"Not capturable in a CUDA graph, timed as plain launches: {', '.join(plain)}. " if plain else "")
    done += (f"Took {data['seconds']} s." if data.get("complete") else
            f"**Partial: {len(data['rows'])} of {data.get('cells', '?')} rows so far** (the run is going on, or was stopped).")
    head = (f"# TensorRT GPU check\n\nTensorRT {data['tensorrt']} on {data['gpu']['name']} "
            f"(compute capability {data['gpu']['compute_capability']}), {data['environment']['date']}. "
            f"{data['images']} real images; parity against {data['reference']}. Latency: median of {data['iters']} "
            f"CUDA-graph runs timed with CUDA events (device time; `+copies` includes pinned host<->device copies). "
            f"{done}\n\n")
    table = markdown_table(["model", "precision", "status", "build s", "top-1 agree", "max rel err", "top-1 acc",
                            "b1 ms", f"b{b} ms", f"b{b}+copies ms", f"b{b} img/s"], rows)
    machine = f"\n## This machine (`scarlet doctor`)\n\n{doctor.markdown(data['doctor'])}" if data.get("doctor") else ""
    return head + table + machine


def register(sub) -> None:
    p = sub.add_parser("gpu-check", help="TensorRT fp32/fp16/int8 plans per model, verified against PyTorch and timed "
                                         "(needs an NVIDIA GPU; stops at once without one)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--build-dir", type=Path, default=Path("build"))
    p.add_argument("--val-dir", type=Path)
    p.add_argument("--report", type=Path, default=Path("reports/gpu-check"), help="writes REPORT.json and REPORT.md")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="models to check (default: all)")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS,
                   help="precisions to check (default: all)")
    p.add_argument("--images", type=int, default=200, help="real images for the parity check (default 200)")
    p.add_argument("--iters", type=int, default=200, help="timed runs per batch size (default 200)")
    p.add_argument("--budget", type=float, default=BUDGET_S, metavar="S",
                   help=f"seconds the whole check may take; rows past it are skipped (default {BUDGET_S})")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = CheckConfig(args.build_dir, args.report, args.val_dir, tuple(args.models), tuple(args.precisions),
                      args.images, args.iters, budget_s=args.budget)
    data = run_check(cfg)
    print(markdown(data))
    return 1 if any(r["status"].startswith("FAILED") for r in data["rows"]) else 0
