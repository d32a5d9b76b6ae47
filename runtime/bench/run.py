"""`scarlet bench`: every backend measured side by side, in one run, into docs/performance.md's table.

How a number is made (also written into every report):
- Per model and batch size, all backends are loaded, warmed up (excluded), then measured in
  `repeats` interleaved rounds (A B C, B C A, ...), each backend for about `seconds` per
  round, so a machine that drifts (other users, turbo, thermal) affects every backend alike.
- Two modes per backend and batch, measured in the same interleaved rounds: latency mode
  (`infer`, one batch at a time; percentiles pool every call of every round) and throughput
  mode (`infer_many`, as many batches in flight as the runner has streams; images / wall time
  per round). A runner with one stream has no separate throughput run: its latency-mode
  rate is its throughput. Tables show the median round and the spread (max - min) / median.
- Speed-ups are paired: round r of a backend over round r of the reference (PyTorch eager,
  ORT FP32) in the same mode, then the median and range of those ratios. At batch 1 in
  latency mode this is the mean-latency ratio.
- torch.compile rows: each batch size is compiled on its first call, before warm-up; the
  compile time is reported per backend and batch and is in no timing.
- Memory: a fresh subprocess per backend imports the library, resets its high-water mark
  (/proc/self/clear_refs), loads the model, runs each batch; peak RSS growth (VmHWM - RSS after
  import) is reported: weights + arenas + activations, not the library's code. GPU memory is not.
- Work: MACs per image from the ONNX graph (runtime.flops); achieved GOP/s = 2 * MACs *
  images/s, as a share of this machine's measured peak on the same kernels (runtime.peak):
  the peak of the backend's precision (FP32, BF16 or INT8; runtime.peak.peak_kind); a
  precision without a peak on this machine gives its rows no share, and the report says why.
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
from scarlet_deploy.runtime.measure import CellStats, measure_interleaved, paired_ratio, throughput_timer
from scarlet_deploy.runtime.peak import KINDS as PEAK_KINDS
from scarlet_deploy.runtime.peak import measure_peak, peak_kind, peak_unavailable, share_of_peak
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
            if backend.endswith("bf16"):  # calibration measured the f32-float-parts model; verify gives this one
                continue
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
    peak_missing = {k: why for k in PEAK_KINDS if (why := peak_unavailable(k))}
    peak_kinds = [k for k in PEAK_KINDS if k not in peak_missing]
    peaks = {k: [measure_peak(k, cfg.peak_seconds, threads=cfg.threads)] for k in peak_kinds}
    # Loaded once, up front: the checkpoint loader can take seconds (seeded weights re-estimate BN
    # statistics), and a missing ONNX is exported from the same LoadedModel.
    loaded = {}
    if any(b.startswith("torch") for b in cfg.backends) or any(not (cfg.build_dir / f"{m}.onnx").exists() for m in cfg.models):
        loaded = {m: load_baseline(m) for m in tqdm(cfg.models, desc="load models", unit="model")}
    plans = [plan_model(m, cfg, loaded.get(m)) for m in cfg.models]
    tune = None
    if cfg.tune:
        with tqdm(total=(len(tune_grid(cfg.threads)) + 1) * 3, desc=f"tune ort ({plans[0].model})", unit="round") as bar:
            tune = tune_ort(plans[0].onnx, max(cfg.batches), cfg, progress=bar)
        cfg.ort = OrtOptions(**tune["winner"])

    total = sum(len(p.artifacts) for p in plans) * len(cfg.batches) * cfg.repeats * len(cfg.modes)
    models: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    with tqdm(total=total, desc="bench", unit="round") as bar:
        for plan in plans:
            module = torch_module(loaded[plan.model].model, cfg.torch_channels_last) \
                if any(b.startswith("torch") for b in plan.artifacts) else None
            model_rows, models[plan.model] = bench_model(plan, module, cfg, bar)
            models[plan.model]["weights"] = getattr(loaded.get(plan.model), "source", None)  # pretrained or seeded
            rows += model_rows
            for k in peak_kinds:
                peaks[k].append(measure_peak(k, cfg.peak_seconds, threads=cfg.threads))
    peaks = {k: [p for p in samples if p is not None] for k, samples in peaks.items()}
    peak_missing.update({k: f"no {k.upper()} GEMM method is installed" for k, s in peaks.items() if not s})
    best = {k: max(samples, key=lambda p: p.gops) for k, samples in peaks.items() if samples}
    for r in rows:
        kind = peak_kind(r["backend"])
        r["peak_kind"] = kind
        r["pct_peak"] = share_of_peak(r["gops"], best.get(kind)) if kind else None
    elapsed = time.perf_counter() - t_start
    return {
        "environment": environment(),
        "config": {"models": cfg.models, "backends": cfg.backends, "batches": cfg.batches, "modes": cfg.modes,
                   "threads": cfg.threads,
                   "repeats": cfg.repeats, "seconds": cfg.seconds, "warmup_s": cfg.warmup_s, "input": "seeded N(0,1) float32"},
        "settings": {"torch": {"mode": "eval + torch.inference_mode", "threads": cfg.threads,
                               "channels_last": cfg.torch_channels_last,
                               "compile": "torch.compile(dynamic=False), Inductor, freezing=True, torch.no_grad; "
                                          "bf16: torch.autocast('cpu', bfloat16)"},
                     "ort": {**asdict(cfg.ort), "provider": "CPUExecutionProvider"},
                     "openvino": {b: asdict(OvOptions.for_backend(b, cfg.threads)) for b in cfg.backends if b in OV_BACKENDS}},
        "peak": {k: {**p.to_dict(), "samples_gops": [s.gops for s in peaks[k]]} for k, p in best.items()},
        "peak_missing": peak_missing,  # precision -> why this machine has no peak for it
        "peak_invalid": sorted({f"{r['model']} {r['backend']}" for r in rows
                                if r["peak_kind"] in best and r["pct_peak"] is None}),
        "tune": tune,
        "models": models,
        "results": rows,
        "elapsed_s": elapsed,
        "machine_load": machine_load(cpu_start, CpuTimes.now(), elapsed, os.cpu_count() or 1),
    }


def bench_model(plan: ModelPlan, module, cfg: BenchConfig, bar) -> tuple[list[dict], dict]:
    """Every backend of one model at every batch size, in each mode: the rows, and the model's report entry."""
    from scarlet_deploy.runtime.flops import count_macs

    macs = count_macs(plan.onnx)
    if module is not None:
        size = sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 2 ** 20
        for b, a in plan.artifacts.items():
            if a.path is None:
                a.size_mb = size
    # Not for TensorRT (GPU memory) nor torch.compile (a subprocess would compile every batch again: minutes)
    memory = {b: measure_memory(plan.model, b, a, cfg, plan.image_size) for b, a in plan.artifacts.items()
              if cfg.memory and not b.startswith(("trt-", "torch-compile"))}
    runners, rows, streams = {}, [], {}
    try:
        for b, a in plan.artifacts.items():
            try:  # a plan built for another GPU or TensorRT version is reported, not fatal
                runners[b] = open_runner(b, a.path, threads=cfg.threads, ort=cfg.ort, module=module).load()
            except ScarletError as e:
                plan.skipped[b] = str(e).rstrip(".")
                bar.update(len(cfg.batches) * cfg.repeats * len(cfg.modes))
        for batch in cfg.batches:
            bar.set_description(f"{plan.model} b={batch}")
            x = bench_input(batch, cfg.seed, plan.image_size)
            calls: dict[tuple[str, str], Any] = {}
            for b, r in runners.items():
                try:  # e.g. a batch outside a TensorRT plan's profile: skip that cell, say why
                    call = partial(r.timed, x)
                    call()  # also compiles what compiles per batch (OpenVINO, torch.compile): not timed
                    if "latency" in cfg.modes:
                        calls[(b, "latency")] = call
                    n = r.streams(batch) if "throughput" in cfg.modes else 1
                    streams[(b, batch)] = n
                    if n > 1 or "latency" not in cfg.modes:  # one stream: the latency run is the throughput run
                        calls[(b, "throughput")] = throughput_timer(r, x)
                        calls[(b, "throughput")]()
                except ScarletError as e:
                    plan.skipped[b] = f"batch {batch}: {str(e).rstrip('.')}"
                    calls = {k: c for k, c in calls.items() if k[0] != b}
                    bar.update(cfg.repeats * len(cfg.modes))
            bar.update(sum(cfg.repeats for b, r in runners.items() if (b, "latency") in calls and
                           (b, "throughput") not in calls and "throughput" in cfg.modes))
            rounds = measure_interleaved(calls, cfg.repeats, cfg.seconds, cfg.warmup_s, progress=bar)
            stats = {k: CellStats.from_rounds(r, batch) for k, r in rounds.items()}
            for mode in cfg.modes:
                # a one-stream runner's throughput mode is its latency mode
                in_mode = {b: stats.get((b, mode)) or stats[(b, "latency")] for b in runners
                           if (b, mode) in stats or (b, "latency") in stats}
                rows += [_row(plan, b, st, in_mode, macs.macs, memory.get(b), mode,
                              streams.get((b, batch), 1) if mode == "throughput" else 1)
                         for b, st in in_mode.items()]
    finally:
        for r in runners.values():
            r.close()
    described = {b: r.describe() for b, r in runners.items()}
    entry = {"onnx": str(plan.onnx), "macs": macs.to_dict(), "skipped": plan.skipped,
             "artifacts": {b: {"path": str(a.path) if a.path else None, "size_mb": a.size_mb}
                           for b, a in plan.artifacts.items()},
             "compile_s": {b: d["compile_s"] for b, d in described.items() if d.get("compile_s")},
             "throughput_streams": {b: {str(n): s for (bb, n), s in streams.items() if bb == b} for b in runners},
             "memory": memory, "accuracy": known_accuracy(plan, cfg.reports_dir)}
    return rows, entry


def _row(plan: ModelPlan, backend: str, s: CellStats, stats: dict[str, CellStats], macs: int,
         memory: dict[str, Any] | None, mode: str = "latency", streams: int = 1) -> dict[str, Any]:
    gops = 2 * macs * s.throughput / 1e9
    row = {"model": plan.model, "backend": backend, "mode": mode, "streams": streams, **asdict(s), "gops": gops,
           "pct_peak": None,  # set once the run's best peak sample is known
           "size_mb": plan.artifacts[backend].size_mb,
           "mem_mb": (memory or {}).get("peak_mb", {}).get(str(s.batch))}
    if mode == "throughput" and streams > 1:  # per-batch averages of a call, not latencies
        row.update(p50_ms=None, p90_ms=None, p99_ms=None, mean_ms=None)
    for ref in REFERENCES:
        if ref in stats:
            row[f"vs_{ref}"] = asdict(paired_ratio(s.throughput_rounds, stats[ref].throughput_rounds))
            if mode == "latency":
                row[f"latency_vs_{ref}"] = stats[ref].p50_ms / s.p50_ms
    return row
