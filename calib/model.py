"""`make calib`: every target for one registry model, from build/<model>.onnx (exported when missing)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from scarlet_deploy.calib import pipeline
from scarlet_deploy.runtime.core.errors import ScarletError

OUTPUT_SUFFIX = {"ort": ".int8.onnx", "trt": ".int8-trt.onnx", "ov": ".int8-ov.onnx"}
TIMED_TARGETS = ("ort", "ov")  # CPU targets: their speed check means something here
# What `make calib` uses where `scarlet calibrate` leaves the budget to the user; bench and
# gpu-check create missing INT8 models with the same settings.
MODEL_DEFAULTS = {"num_images": 128, "max_top1_drop": 0.3, "min_agreement": 97.0, "bench_rounds": 10}


def model_config(**overrides) -> pipeline.CalibConfig:
    """The CalibConfig of `make calib` (paths are filled in per target by calibrate_model)."""
    return pipeline.CalibConfig(onnx=Path(), images=Path(), output=Path(), **{**MODEL_DEFAULTS, **overrides})


def default_targets() -> tuple[list[str], str | None]:
    """What `make calib` builds: every target, but `ov` only where OpenVINO (which judges it) is
    installed; the second item says why it was left out."""
    from scarlet_deploy.runtime.runners.openvino import openvino_missing

    missing = openvino_missing()
    if missing:
        return ["ort", "trt"], f"target ov skipped: {missing}"
    return ["ort", "trt", "ov"], None


def calibrate_model(model: str, out_dir: Path, val_dir: Path | None, targets: list[str], report: str | None,
                    checkpoint: str | None, base: pipeline.CalibConfig) -> list[pipeline.CalibResult]:
    from scarlet_deploy.calib.qdq import get_target
    from scarlet_deploy.runtime.data.images import default_val_dir

    for t in targets:  # a target this host cannot judge fails before minutes of work
        get_target(t)
    images = val_dir or default_val_dir()
    if images is None:
        raise ScarletError("no images to calibrate with: the shared ImageNet sample is not beside this checkout; "
                           "pass --val-dir DIR (make calib VAL_DIR=DIR) or set $SCARLET_VAL_DIR.")
    from scarlet_deploy.export.onnx_export import ensure_onnx  # lazy: torch

    onnx = ensure_onnx(model, out_dir, checkpoint)
    bench = pipeline.prepare(onnx, images, base.num_images, base.seed, None, base.num_eval, model,
                             base.sensitivity_images, base.threads, base.num_select)
    results = []
    for t in targets:
        cfg = dataclasses.replace(base, onnx=onnx, images=images, target=t,
                                  output=Path(out_dir) / f"{model}{OUTPUT_SUFFIX[t]}",
                                  cache=Path(out_dir) / f"{model}.{t}.{base.method}.calib.json", refresh_stale_cache=True,
                                  # CPU timing means nothing for the TensorRT model
                                  bench_rounds=base.bench_rounds if t in TIMED_TARGETS else 0)
        results.append(pipeline.calibrate_target(bench, cfg))
    if report:
        pipeline.write_report(report, bench, results)
    return results
