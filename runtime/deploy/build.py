"""Artifacts for the deploy candidates, built through the library and reused when nothing changed.

Reuse is decided on content, never on a file's mere presence: the FP32 ONNX must come from the
same weights (checkpoint sha256, or the seeded weights' tensor fingerprint) and LET choice, an
INT8 model from the same FP32 ONNX (sha256), images and settings, and every file must still be
the file its manifest describes. Anything else is rebuilt.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from scarlet_deploy.runtime.core.artifacts import read_manifest, sha256_file, write_json_atomic
from scarlet_deploy.runtime.core.errors import ScarletError

STAMP_SUFFIX = ".deploy.json"


def stem(model: str, let: bool) -> str:
    return f"{model}-let" if let else model


def _manifest_or_none(path: Path) -> dict[str, Any] | None:
    try:
        return read_manifest(path) if path.is_file() else None
    except ScarletError:  # replaced or damaged: rebuilt, not an error
        return None


def export_fp32(loaded, work: Path) -> tuple[Path, bool]:
    """work/<model>[-let].onnx from `loaded` (export.checkpoint.LoadedModel); (path, reused)."""
    from scarlet_deploy.export.onnx_export import ExportConfig, export_model
    from scarlet_deploy.export.opsets import DEFAULT_EXPORTER

    path = work / f"{stem(loaded.name, loaded.let)}.onnx"
    m = _manifest_or_none(path)
    if m and m.get("checkpoint_sha256") == loaded.checkpoint_sha256 and m.get("let") == loaded.let \
            and m.get("model") == loaded.name and m.get("batch") == "dynamic" and m.get("exporter") == DEFAULT_EXPORTER:
        return path, True
    export_model(ExportConfig(model=loaded.name, output=path, let=loaded.let), loaded)
    return path, False


def fp16(fp32: Path, work: Path) -> tuple[Path, bool]:
    from scarlet_deploy.export.fp16 import Fp16Config, convert_to_fp16, fp16_path

    # the deploy verifies the FP16 model on its own images; the converter's 16-image check would repeat it
    r = convert_to_fp16(Fp16Config(onnx=fp32, output=fp16_path(work / fp32.name), parity_images=0))
    return r.output, r.reused


@dataclasses.dataclass(frozen=True)
class Int8Settings:
    target: str
    num_calib: int
    num_select: int
    seed: int
    images: str  # the folder, resolved
    search: bool  # accuracy-budget search (trained weights only)
    max_top1_drop: float | None
    min_agreement: float | None
    # Put the search's float layers back in INT8 where the budget holds. For onnxruntime that is what makes
    # INT8 pay (Lite0: 1.97x FP32 pruned, ~1.0x with the search's float layers left) at a second per trial;
    # on OpenVINO each trial is a compile (minutes in all), so the ov target keeps the search's result.
    prune_search: bool = False


def int8_path(fp32: Path, target: str) -> Path:
    from scarlet_deploy.calib.model import OUTPUT_SUFFIX

    return fp32.with_name(fp32.name.removesuffix(".onnx") + OUTPUT_SUFFIX[target])


def int8_current(fp32: Path, s: Int8Settings) -> Path | None:
    """The INT8 model built earlier with exactly these settings from exactly this FP32 ONNX, or None."""
    path = int8_path(fp32, s.target)
    stamp = Path(str(path) + STAMP_SUFFIX)
    m = _manifest_or_none(path)
    if m is None or not stamp.is_file():
        return None
    try:
        st = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    if (st.get("settings") == dataclasses.asdict(s) and st.get("source_onnx_sha256") == sha256_file(fp32)
            and m.get("source_onnx_sha256") == sha256_file(fp32) and st.get("sha256") == sha256_file(path)):
        return path
    return None


def int8(bench, fp32: Path, s: Int8Settings) -> Path:
    """Calibrate `s.target` on the prepared `bench` (calib.pipeline.Bench) and stamp the result."""
    from scarlet_deploy.calib import pipeline

    path = int8_path(fp32, s.target)
    budget = {"max_top1_drop": s.max_top1_drop, "min_agreement": s.min_agreement} if s.search else {}
    cfg = pipeline.CalibConfig(
        onnx=fp32, images=Path(s.images), output=path, target=s.target, num_images=s.num_calib,
        num_select=s.num_select, seed=s.seed, model=bench.model,
        # the deploy's own gates and report take the place of calibrate's baseline, error tables and speed check
        baseline=False, layer_error_images=0, bench_rounds=0, compare_methods=False, threads=bench.threads,
        prune_search=s.prune_search,
        cache=path.with_name(path.name + ".ranges.json"), refresh_stale_cache=True, **budget)
    r = pipeline.calibrate_target(bench, cfg)
    write_json_atomic(Path(str(path) + STAMP_SUFFIX), {
        "settings": dataclasses.asdict(s), "source_onnx_sha256": sha256_file(fp32), "sha256": sha256_file(path),
        "method": r.method, "nodes_kept_float": r.manifest.get("nodes_kept_float", []),
        "bias_correction": r.manifest.get("bias_correction")})
    return path


def trt_plan(fp32: Path, precision: str, batch: int, int8_onnx: Path | None = None) -> tuple[Path, bool]:
    """A TensorRT 11 plan beside the FP32 ONNX (GPU machines only): FP16 from the FP16 conversion TensorRT's
    strong typing needs, INT8 from the `trt`-target Q/DQ ONNX; reused by trt_build when current."""
    from scarlet_deploy.export.trt_build import BatchProfile, EngineConfig, build_engine

    plan = fp32.with_name(fp32.name.removesuffix(".onnx") + f".{precision}.plan")
    r = build_engine(EngineConfig(onnx=fp32, precision=precision, output=plan, int8_onnx=int8_onnx,
                                  batch=BatchProfile(1, batch, max(batch, 32)), timing_cache=fp32.parent / "timing.cache"))
    return r.plan, r.reused
