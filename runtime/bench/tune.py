from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from scarlet_deploy.runtime.bench.plan import BenchConfig, bench_input, onnx_image_size
from scarlet_deploy.runtime.measure import CellStats, measure_interleaved, wall_timer
from scarlet_deploy.runtime.runners.ort import OrtOptions

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
    from scarlet_deploy.runtime.runners.ort import OrtRunner

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
