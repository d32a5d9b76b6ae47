from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scarlet_deploy.export.registry import get_spec
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.onnx_io import check_classifier, graph_precision
from scarlet_deploy.runtime.runners.openvino import OV_BACKENDS, ov_unavailable
from scarlet_deploy.runtime.runners.registry import ONNX_RUNTIMES
from scarlet_deploy.runtime.verify.config import VerifyConfig


@dataclass
class Backend:
    """One thing to compare with PyTorch: an ONNX model on a CPU runtime, or a TensorRT plan."""

    name: str
    kind: str  # one of ONNX_RUNTIMES (an INT8 ONNX on ort or ov is bench's ort-int8 or ov-int8), or trt
    path: Path
    precision: str  # fp32 | fp16 | int8, bf16 for an FP32 ONNX on ov-bf16, int8-bf16 on ov-int8-bf16
    manifest: dict[str, Any] | None

    @property
    def backend(self) -> str:
        """The name bench uses for this runtime and artifact: ort, ort-int8, ov, ov-int8, ov-bf16, trt-fp16, ..."""
        if self.kind == "trt":
            return f"trt-{self.precision}"
        return self.kind if self.precision in ("fp32", "bf16", "int8-bf16") else f"{self.kind}-{self.precision}"


def _origin(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The FP32 export manifest an artifact descends from (INT8 -> source ONNX, FP16 -> source, plan -> ONNX)."""
    from scarlet_deploy.runtime.core.artifacts import read_manifest

    m = manifest or {}
    for _ in range(4):
        if "checkpoint_sha256" in m:
            return m
        if isinstance(m.get("source_manifest"), dict):
            m = m["source_manifest"]
            continue
        src = m.get("source_onnx") or m.get("source") or (m.get("request") or {}).get("onnx")
        if not src or not Path(src).is_file():
            break
        m = read_manifest(src) or {}
    return {}


def detect_precision(path: Path, manifest: dict[str, Any] | None) -> str:
    """From the manifest where it says, else from the graph: Q/DQ ops -> int8, float16 tensors -> fp16."""
    m = manifest or {}
    if m.get("precision") in PRECISIONS:
        return m["precision"]
    if m.get("kind") == "onnx-fp16":
        return "fp16"
    if path.suffix != ".onnx":
        return "fp32"
    return graph_precision(path)


def describe_backend(path: str | os.PathLike, kind: str = "ort") -> Backend:
    from scarlet_deploy.runtime.core.artifacts import read_manifest

    path = Path(path)
    if not path.is_file():
        hint = "make export (or scarlet export)" if kind == "ort" else "make engine (or scarlet engine)"
        raise ScarletError(f"{path} does not exist; create it with {hint}.")
    manifest = read_manifest(path)
    return Backend(path.name, kind, path, detect_precision(path, manifest), manifest)


def check_weights(b: Backend, model: str, let: bool, checkpoint_sha256: str) -> None:
    """Refuse a backend built from another model or other weights: its disagreement would mean nothing."""
    origin = _origin(b.manifest)
    name = (b.manifest or {}).get("model") or origin.get("model")
    if name and name != model:
        raise ScarletError(f"{b.path} was made from {name}, not {model}; pass --model {name} or the right file.")
    if origin and bool(origin.get("let", False)) != let:
        raise ScarletError(f"{b.path} was exported {'with' if origin.get('let') else 'without'} --let; "
                           f"{'add' if origin.get('let') else 'drop'} --let or pass the matching file.")
    sha = origin.get("checkpoint_sha256")
    if sha and sha != checkpoint_sha256 and str(sha).startswith("seeded") and checkpoint_sha256.startswith("seeded"):
        raise ScarletError(f"{b.path} was exported from other seeded weights than PyTorch seeds here (their BN statistics "
                           "come from the images at hand: the shared sample or synthetic ones, and the seed); re-export "
                           "it on this machine (make export), or pass the checkpoint both should use.")
    if sha and sha != checkpoint_sha256:
        raise ScarletError(f"{b.path} was exported from other weights ({sha[:16]}) than PyTorch loads here "
                           f"({checkpoint_sha256[:16]}); re-export it with the same --checkpoint (make export CKPT=...).")


def discover_onnx(build_dir: Path, model: str, let: bool) -> tuple[list[Path], list[Path]]:
    """build_dir/<model>*.onnx whose manifest names this model (and LET variant): FP32, FP16, INT8 for
    onnxruntime, and apart from them the Q/DQ models made for TensorRT. Those are judged as engines
    (--engine): onnxruntime's CPU INT8xINT8 kernels saturate where TensorRT's do not, so their
    numbers here would describe onnxruntime, not the deployment."""
    from scarlet_deploy.runtime.core.artifacts import read_manifest

    found, for_tensorrt = [], []
    for p in sorted(Path(build_dir).glob(f"{model}*.onnx")):
        m = read_manifest(p)
        origin = _origin(m)
        if m and (m.get("model") or origin.get("model")) == model and bool(origin.get("let", False)) == let:
            (for_tensorrt if m.get("target") == "trt" else found).append(p)
    return found, for_tensorrt


def resolve_backends(cfg: VerifyConfig, loaded) -> tuple[list[Backend], list[str]]:
    """Backends in report order (FP32 first), exporting the model first when --auto-onnx finds none."""
    notes = []
    paths = list(cfg.onnx)
    if cfg.auto_onnx is not None:
        auto, for_tensorrt = discover_onnx(cfg.auto_onnx, cfg.model, cfg.let)
        if for_tensorrt:
            notes.append(f"not run on onnxruntime (made for TensorRT; verify its engine with --engine, or name it with --onnx): "
                         f"{', '.join(p.name for p in for_tensorrt)}")
        if not auto:
            from scarlet_deploy.export.onnx_export import ExportConfig, export_model

            out = Path(cfg.auto_onnx) / f"{cfg.model}{'-let' if cfg.let else ''}.onnx"
            notes.append(f"no ONNX for {cfg.model}{' +LET' if cfg.let else ''} in {cfg.auto_onnx}: exported {out} first")
            print(notes[-1])
            export_model(ExportConfig(cfg.model, out, cfg.let, cfg.checkpoint, seed=cfg.seed), loaded)
            auto = [out]
        paths += [p for p in auto if p not in paths]
    if not paths and not cfg.engines and not cfg.reference_only:
        raise ScarletError("nothing to verify: pass --onnx M.onnx (repeatable), --auto-onnx BUILD_DIR or --engine M.plan.")
    runtimes, runtime_notes = available_runtimes(cfg.backends)
    spec = get_spec(cfg.model)
    for p in paths if runtimes else ():  # before describe_backend reads the graph: a non-ONNX file or another
        check_classifier(p, spec.preprocess.crop, spec.num_classes, cfg.model)  # model's shape is one sentence
    files = [describe_backend(p, "ort") for p in paths]
    for b in files:
        check_weights(b, loaded.name, loaded.let, loaded.checkpoint_sha256)
    backends = [b for r in runtimes for b in on_runtime(files, r, runtime_notes)]
    engines = [describe_backend(p, "trt") for p in cfg.engines]
    for b in engines:
        check_weights(b, loaded.name, loaded.let, loaded.checkpoint_sha256)
    order = ("fp32", "bf16", "fp16", "int8", "int8-bf16")
    backends.sort(key=lambda b: (runtimes.index(b.kind), order.index(b.precision)))
    engines.sort(key=lambda b: order.index(b.precision))
    if not backends and not engines and (paths or not cfg.reference_only):  # a PASS with nothing compared would be a lie
        raise ScarletError(f"nothing to verify here: {'; '.join(runtime_notes)}. Add ort to --backends or install what is missing.")
    return backends + engines, notes + runtime_notes


def available_runtimes(requested: list[str]) -> tuple[list[str], list[str]]:
    """The requested runtimes that can run here, and a note for each that cannot (skipped, not an error)."""
    bad = [r for r in requested if r not in ONNX_RUNTIMES]
    if bad:
        raise ScarletError(f"unknown --backends {', '.join(bad)}; choose from {', '.join(ONNX_RUNTIMES)} (an INT8 ONNX "
                           "on ort or ov is verified as ort-int8 or ov-int8; TensorRT plans come with --engine).")
    runtimes, notes = [], []
    for r in dict.fromkeys(requested):
        why = ov_unavailable(r) if r in OV_BACKENDS else None
        if why:
            notes.append(f"backend {r} skipped: {why}")
        else:
            runtimes.append(r)
    return runtimes, notes


def on_runtime(files: list[Backend], runtime: str, notes: list[str]) -> list[Backend]:
    """Each ONNX as a backend of `runtime`; ov-bf16 takes only FP32 files (it lowers their float ops to bf16),
    and a Q/DQ model calibrated for OpenVINO (`--target ov`) runs on ov alone: its float convolutions
    between Q/DQ pairs are OpenVINO's fusion pattern, which onnxruntime would run in float.
    ov-int8-bf16 takes only that OpenVINO-calibrated model (its float parts in bf16)."""
    out = []
    for f in files:
        for_ov = (f.manifest or {}).get("target") == "ov"
        if for_ov and runtime not in ("ov", "ov-int8-bf16"):
            notes.append(f"{f.name} not run on {runtime}: it was calibrated for OpenVINO (--target ov); "
                         "it runs as ov-int8 and ov-int8-bf16")
            continue
        if runtime == "ov-bf16" and f.precision != "fp32":
            notes.append(f"{f.name} not run on ov-bf16: it is {f.precision}, and ov-bf16 lowers the float ops of an FP32 ONNX")
            continue
        if runtime == "ov-int8-bf16" and not for_ov:
            notes.append(f"{f.name} not run on ov-int8-bf16: it takes the INT8 model calibrated for OpenVINO "
                         "(`make calib CALIB_ARGS=\"--targets ov\"`)")
            continue
        precision = {"ov-bf16": "bf16", "ov-int8-bf16": "int8-bf16"}.get(runtime, f.precision)
        name = f.name if runtime == "ort" else f"{f.name} on {runtime}"
        out.append(Backend(name, runtime, f.path, precision, f.manifest))
    return out


def calibration_overlap(backends: list[Backend], root: Path) -> list[str]:
    """Say so when an INT8 model was calibrated on images from the folder its accuracy is measured on."""
    notes = []
    for b in {b.path: b for b in backends}.values():  # one note per file, however many runtimes run it
        cal = (b.manifest or {}).get("calibration_images") or {}
        if cal.get("dir") and Path(cal["dir"]).resolve() == Path(root).resolve():
            notes.append(f"{b.path.name} was calibrated on {cal.get('count', '?')} images of this same folder: "
                         "its accuracy here overlaps its calibration set (use a disjoint --val-dir for a clean number)")
    return notes


PRECISIONS = ("fp32", "fp16", "int8")
