"""`make gpu-check`: TensorRT fp32/fp16/int8 plans for every model, verified against PyTorch and timed.

    python -m scarlet_deploy.runtime.gpu_check --build-dir build [--val-dir DIR] --report reports/gpu-check

Exports (and calibrates) the ONNX it needs when missing, builds each plan (timing cache
shared across builds), compares logits with PyTorch on real images (top-1 agreement,
relative logit error, top-1 accuracy where folder names are wnids), times batch 1 and
the profile's opt batch with CUDA events, and writes one JSON + markdown report.
Without TensorRT 11 or a GPU it stops at once with the reason (exit 2).
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scarlet_deploy.calib.model import calibrate_model, model_config
from scarlet_deploy.export.trt_build import int8_onnx_path
from scarlet_deploy.runtime.core.errors import ScarletError

MODELS = ("scarlet_a", "scarlet_b", "scarlet_c", "efficientnet_lite0")
PRECISIONS = ("fp32", "fp16", "int8")
PROFILE = (1, 8, 32)
BUDGET_S = 9 * 60  # the whole check must fit in 10 minutes; rows past this are reported as skipped
# What "verified" means per precision (top-1 agreement with PyTorch, max relative logit error).
# INT8 has no logit bound: quantization noise is judged by agreement alone.
GATES = {"fp32": (0.99, 1e-3), "fp16": (0.97, 5e-2), "int8": (0.85, None)}


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
    status: str  # ok | FAILED | skipped: why
    plan: str | None = None
    build_s: float | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    top1: float | None = None
    timings: dict[str, dict[str, float]] = field(default_factory=dict)


def _ensure_onnx(model: str, build: Path) -> Path:
    from scarlet_deploy.export.onnx_export import ExportConfig, export_model

    path = build / f"{model}.onnx"
    if not path.is_file():
        print(f"exporting {path}", file=sys.stderr)
        export_model(ExportConfig(model, path))
    return path


def _ensure_int8(model: str, build: Path, val_dir: Path | None, reports: Path) -> tuple[Path | None, str]:
    """The TensorRT Q/DQ ONNX, calibrated as `make calib` does when missing."""
    path = int8_onnx_path(build / f"{model}.onnx")
    if path.is_file():
        return path, ""
    try:
        calibrate_model(model, build, val_dir, ["trt"], str(reports / f"calib-{model}"), None, model_config())
    except ScarletError as e:
        return None, f"skipped: no {path.name} (calibration failed: {str(e).rstrip('.')}; run `make calib MODEL={model}`)"
    return path, ""


def _reference_model(model: str, onnx_path: Path):
    """The PyTorch model with the weights the ONNX was exported from (per its manifest)."""
    from scarlet_deploy.export.checkpoint import load_model
    from scarlet_deploy.runtime.core.artifacts import read_manifest

    m = read_manifest(onnx_path) or {}
    source = m.get("weights_source")
    checkpoint = source if m.get("pretrained") and source and Path(source).is_file() else None
    loaded = load_model(model, bool(m.get("let", False)), checkpoint)
    if m.get("checkpoint_sha256") and m["checkpoint_sha256"] != loaded.checkpoint_sha256:
        raise ScarletError(f"{onnx_path} was exported from other weights ({m['checkpoint_sha256']}) than PyTorch "
                           f"loads here ({loaded.checkpoint_sha256}); re-export it (make export) before gpu-check.")
    return loaded.model


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


def _stats(ms: list[float], batch: int) -> dict[str, float]:
    a = np.asarray(ms)
    return {"batch": batch, "median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "images_per_s": float(batch * 1000 / np.median(a))}


def _check_one(cfg: CheckConfig, model: str, precision: str, onnx_path: Path, int8: Path | None,
               x: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> Row:
    from scarlet_deploy.export.fp16 import logit_agreement
    from scarlet_deploy.export.trt_build import BatchProfile, EngineConfig, build_engine
    from scarlet_deploy.runtime.runners.trt import TrtRunner

    plan = cfg.build_dir / f"{model}.{precision}.plan"
    r = build_engine(EngineConfig(onnx_path, precision, plan, int8_onnx=int8, batch=BatchProfile(*PROFILE),
                                  timing_cache=cfg.build_dir / "timing.cache"))
    row = Row(model, precision, "ok", str(plan), None if r.reused else round(r.seconds, 1))
    with TrtRunner(plan) as runner:
        logits = runner.infer(x)
        row.parity = logit_agreement(reference, logits)
        if labels is not None:
            row.top1 = float((logits.argmax(1) == labels).mean())
        for batch in (1, PROFILE[1]):
            ms = runner.time(batch, iters=cfg.iters, warmup=cfg.warmup, include_copies=False, cuda_graph=True)
            row.timings[f"b{batch}"] = _stats(ms, batch)
        ms = runner.time(PROFILE[1], iters=cfg.iters, warmup=cfg.warmup, include_copies=True, cuda_graph=True)
        row.timings[f"b{PROFILE[1]}+copies"] = _stats(ms, PROFILE[1])
    agree, max_rel = GATES[precision]
    if row.parity["top1_agreement"] < agree or (max_rel is not None and row.parity["rel_err_max"] > max_rel):
        row.status = "FAILED"
    return row


def run_check(cfg: CheckConfig) -> dict[str, Any]:
    """Every (model, precision) row; stops at once (ScarletError) without TensorRT 11 or a GPU."""
    from scarlet_deploy.runtime.runners.trt import require_gpu

    here = require_gpu()  # before anything is imported, exported, built or written

    from tqdm import tqdm

    from scarlet_deploy.export.registry import get_spec
    from scarlet_deploy.runtime.core.report import environment
    from scarlet_deploy.runtime.data.preprocess import load_batch
    from scarlet_deploy.runtime.runners.pytorch import TorchRunner

    t0 = time.perf_counter()
    cfg.build_dir.mkdir(parents=True, exist_ok=True)
    files, labels = _images(cfg.val_dir, cfg.images)
    rows: list[Row] = []
    bar = tqdm(total=len(cfg.models) * len(cfg.precisions), desc="gpu-check", unit="plan")
    for model in cfg.models:
        onnx_path = _ensure_onnx(model, cfg.build_dir)
        x = load_batch(files, get_spec(model).preprocess, "reference")
        # The reference on the GPU too (TF32 off: still an FP32 reference), as `scarlet verify --device cuda` runs it.
        with TorchRunner(_reference_model(model, onnx_path), device="cuda:0") as torch_runner:
            reference = np.concatenate([torch_runner.infer(x[i:i + 32]) for i in range(0, len(x), 32)])
        for precision in cfg.precisions:
            bar.set_postfix_str(f"{model} {precision}")
            if time.perf_counter() - t0 > cfg.budget_s:
                rows.append(Row(model, precision, f"skipped: over the {cfg.budget_s:.0f} s budget"))
            else:
                int8, why = (_ensure_int8(model, cfg.build_dir, cfg.val_dir, cfg.report.parent)
                             if precision == "int8" else (None, ""))
                try:
                    rows.append(Row(model, precision, why) if why else
                                _check_one(cfg, model, precision, onnx_path, int8, x, reference, labels))
                except ScarletError as e:  # one bad plan must not hide the others
                    rows.append(Row(model, precision, f"FAILED: {e}"))
            bar.update()
    bar.close()
    return {
        "environment": environment(),
        "tensorrt": here.tensorrt,
        "gpu": {"name": here.gpu_name, "compute_capability": here.compute_capability},
        "images": len(files), "labelled": labels is not None, "profile": list(PROFILE),
        "iters": cfg.iters, "warmup": cfg.warmup, "gates": GATES,
        "reference": "PyTorch (CUDA, float32, TF32 off) on the reference preprocessing; plans use the same inputs",
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": [r.__dict__ for r in rows],
    }


def markdown(data: dict[str, Any]) -> str:
    from scarlet_deploy.runtime.core.report import markdown_table

    b = PROFILE[1]
    rows = [[r["model"], r["precision"], r["status"], r["build_s"], r["parity"].get("top1_agreement"),
             r["parity"].get("rel_err_max"), r["top1"],
             *(r["timings"].get(k, {}).get("median_ms") for k in ("b1", f"b{b}", f"b{b}+copies")),
             r["timings"].get(f"b{b}", {}).get("images_per_s")] for r in data["rows"]]
    head = (f"# TensorRT GPU check\n\nTensorRT {data['tensorrt']} on {data['gpu']['name']} "
            f"(compute capability {data['gpu']['compute_capability']}), {data['environment']['date']}. "
            f"{data['images']} real images; parity against {data['reference']}. Latency: median of {data['iters']} "
            f"CUDA-graph runs timed with CUDA events (device time; `+copies` includes pinned host<->device copies). "
            f"Took {data['seconds']} s.\n\n")
    return head + markdown_table(
        ["model", "precision", "status", "build s", "top-1 agree", "max rel err", "top-1 acc",
         "b1 ms", f"b{b} ms", f"b{b}+copies ms", f"b{b} img/s"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scarlet_deploy.runtime.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--build-dir", type=Path, default=Path("build"))
    p.add_argument("--val-dir", type=Path)
    p.add_argument("--report", type=Path, default=Path("reports/gpu-check"), help="writes REPORT.json and REPORT.md")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--iters", type=int, default=200)
    args = p.parse_args(argv)
    cfg = CheckConfig(args.build_dir, args.report, args.val_dir, tuple(args.models), tuple(args.precisions),
                      args.images, args.iters)
    try:
        data = run_check(cfg)
    except ScarletError as e:
        print(textwrap.fill(f"error: {e}", width=100), file=sys.stderr)
        return 2
    from scarlet_deploy.runtime.core.report import write_reports

    md = markdown(data)
    write_reports(data, md, f"{cfg.report}.json", f"{cfg.report}.md")
    print(md)
    failed = [r for r in data["rows"] if r["status"].startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
