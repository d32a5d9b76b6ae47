"""`scarlet bench`: every backend measured side by side, in one run, into docs/performance.md's table.

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
- Work: MACs per image from the ONNX graph (runtime.flops); achieved GOP/s = 2 * MACs *
  images/s, as a share of this machine's measured peak on the same kernels (runtime.peak):
  the FP32 GEMM peak for float backends, the INT8 GEMM peak for INT8 ones.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from scarlet_deploy.runtime.bench.memory import measure_memory
from scarlet_deploy.runtime.bench.plan import INT8_TARGETS, REFERENCES, BenchConfig, ModelPlan, bench_input, plan_model
from scarlet_deploy.runtime.bench.tune import tune_grid, tune_ort
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.host import CpuTimes, check_batch_memory, machine_load
from scarlet_deploy.runtime.core.report import environment
from scarlet_deploy.runtime.measure import CellStats, measure_interleaved, paired_ratio
from scarlet_deploy.runtime.peak import KINDS as PEAK_KINDS
from scarlet_deploy.runtime.peak import measure_peak, peak_kind, share_of_peak
from scarlet_deploy.runtime.runners.openvino import OV_BACKENDS, OvOptions
from scarlet_deploy.runtime.runners.ort import OrtOptions
from scarlet_deploy.runtime.runners.pytorch import torch_module
from scarlet_deploy.runtime.runners.registry import open_runner

# ---------------------------------------------------------------- runners

def load_baseline(model: str):
    """The PyTorch model as a user has it: the project's checkpoint loader (export.checkpoint.LoadedModel)."""
    from scarlet_deploy.export.checkpoint import load_model

    return load_model(model)


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
    from scarlet_deploy.runtime.core.artifacts import sha256_file

    out: dict[str, float] = {}
    calib = _read_json(reports_dir / f"calib-{plan.model}.json")
    if calib and calib.get("source_onnx_sha256") == sha256_file(plan.onnx):
        if (calib.get("fp32") or {}).get("top1") is not None:
            out["ort"] = float(calib["fp32"]["top1"])
        for backend, target in INT8_TARGETS.items():
            int8 = plan.artifacts.get(backend)
            for t in calib.get("targets", []):
                if t.get("target") == target and int8 and Path(t.get("output", "")).name == int8.path.name \
                        and (t.get("int8") or {}).get("top1") is not None:
                    out[backend] = float(t["int8"]["top1"])
    verify = _read_json(reports_dir / f"verify-{plan.model}.json")
    if verify:  # top-1 there is a fraction; rows are matched to what is benchmarked by backend and file name
        ref = verify.get("reference") or {}
        if ref.get("top1") is not None and "torch" in plan.artifacts:
            out["torch"] = 100 * float(ref["top1"])
        names = {(b, a.path.name) for b, a in plan.artifacts.items() if a.path is not None}
        for row in verify.get("backends") or []:
            file = Path(row.get("path") or "").name
            # Reports from before OpenVINO name no backend: their rows are onnxruntime's.
            b = row.get("backend") or next((b for b, f in names if f == file and b.startswith("ort")), None)
            if (b, file) in names and row.get("top1") is not None:
                out[b] = 100 * float(row["top1"])
    return out


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    from tqdm import tqdm

    from scarlet_deploy.export.registry import get_spec

    check_batch_memory(max(cfg.batches), max(get_spec(m).preprocess.crop for m in cfg.models))
    t_start, cpu_start = time.perf_counter(), CpuTimes.now()
    # Sampled before and after every model, best kept: one sample taken while the machine is busy
    # would understate the peak and overstate every "% peak".
    peaks = {k: [measure_peak(k, cfg.peak_seconds, threads=cfg.threads)] for k in PEAK_KINDS}
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
            for k in PEAK_KINDS:
                peaks[k].append(measure_peak(k, cfg.peak_seconds, threads=cfg.threads))
    best = {k: max(samples, key=lambda p: p.gops) for k, samples in peaks.items()}
    for r in rows:
        kind = peak_kind(r["backend"])
        r["peak_kind"] = kind
        r["pct_peak"] = share_of_peak(r["gops"], best.get(kind)) if kind else None
    elapsed = time.perf_counter() - t_start
    return {
        "environment": environment(),
        "config": {"models": cfg.models, "backends": cfg.backends, "batches": cfg.batches, "threads": cfg.threads,
                   "repeats": cfg.repeats, "seconds": cfg.seconds, "warmup_s": cfg.warmup_s, "input": "seeded N(0,1) float32"},
        "settings": {"torch": {"mode": "eval + torch.inference_mode", "threads": cfg.threads,
                               "channels_last": cfg.torch_channels_last},
                     "ort": {**asdict(cfg.ort), "provider": "CPUExecutionProvider"},
                     "openvino": {b: asdict(OvOptions.for_backend(b, cfg.threads)) for b in cfg.backends if b in OV_BACKENDS}},
        "peak": {k: {**p.to_dict(), "samples_gops": [s.gops for s in peaks[k]]} for k, p in best.items()},
        "peak_invalid": sorted({f"{r['model']} {r['backend']}" for r in rows
                                if r["peak_kind"] and r["pct_peak"] is None}),
        "tune": tune,
        "models": models,
        "results": rows,
        "elapsed_s": elapsed,
        "machine_load": machine_load(cpu_start, CpuTimes.now(), elapsed, os.cpu_count() or 1),
    }


def bench_model(plan: ModelPlan, module, cfg: BenchConfig, bar) -> tuple[list[dict], dict]:
    """Every backend of one model at every batch size: the rows, and the model's report entry."""
    from scarlet_deploy.runtime.flops import count_macs

    macs = count_macs(plan.onnx)
    if module is not None:
        plan.artifacts["torch"].size_mb = sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 2 ** 20
    memory = {b: measure_memory(plan.model, b, a, cfg, plan.image_size) for b, a in plan.artifacts.items()
              if cfg.memory and not b.startswith("trt-")}
    runners, rows = {}, []
    try:
        for b, a in plan.artifacts.items():
            try:  # a plan built for another GPU or TensorRT version is reported, not fatal
                runners[b] = open_runner(b, a.path, threads=cfg.threads, ort=cfg.ort, module=module).load()
            except ScarletError as e:
                plan.skipped[b] = str(e).rstrip(".")
                bar.update(len(cfg.batches) * cfg.repeats)
        for batch in cfg.batches:
            bar.set_description(f"{plan.model} b={batch}")
            x = bench_input(batch, cfg.seed, plan.image_size)
            calls = {}
            for b, r in runners.items():
                call = partial(r.timed, x)
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
    gops = 2 * macs * s.throughput / 1e9
    row = {"model": plan.model, "backend": backend, **asdict(s), "gops": gops,
           "pct_peak": None,  # set once the run's best peak sample is known
           "size_mb": plan.artifacts[backend].size_mb,
           "mem_mb": (memory or {}).get("peak_mb", {}).get(str(s.batch))}
    for ref in REFERENCES:
        if ref in stats:
            row[f"vs_{ref}"] = asdict(paired_ratio(s.throughput_rounds, stats[ref].throughput_rounds))
            row[f"latency_vs_{ref}"] = stats[ref].p50_ms / s.p50_ms
    return row
