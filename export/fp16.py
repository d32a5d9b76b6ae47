"""FP16 ONNX for TensorRT 11: precision lives in the graph's tensor types.

TensorRT 11 has no FP16 builder flag; a strongly typed network runs in the types the
ONNX declares. We convert with onnxconverter-common's maintained float16 converter
(NVIDIA's ModelOpt AutoCast would pull onnxruntime-gpu and cupy into a CPU install),
keeping the model's I/O float32 and the numerically sensitive reductions in float32.
The result is an ordinary ONNX, so onnxruntime on a CPU can check it against FP32.
"""
from __future__ import annotations

import collections
import importlib.metadata
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from scarlet_deploy.export.registry import MODELS
from scarlet_deploy.runtime.core.artifacts import atomic_path, manifest_path, read_manifest, sha256_file, write_manifest
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.onnx_io import check_classifier
from scarlet_deploy.runtime.core.paths import check_output
from scarlet_deploy.runtime.data.preprocess import Preprocess

# Reductions accumulate many terms: an FP16 sum of 7x7x1280 activations loses digits, and
# Softmax's exp overflows FP16 beyond ~11. They are cheap, so they stay float32.
KEEP_FP32_OPS: tuple[str, ...] = ("GlobalAveragePool", "ReduceMean", "ReduceSum", "Softmax", "LogSoftmax")
FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto enum values, kept here so summaries need no onnx import
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Fp16Config:
    onnx: Path
    output: Path | None = None  # None: M.fp16.onnx beside M.onnx
    keep_fp32_ops: tuple[str, ...] = KEEP_FP32_OPS
    parity_images: int = 16  # real images compared FP16 vs FP32 on onnxruntime CPU; 0 skips
    force: bool = False  # convert even when an up-to-date FP16 ONNX exists


@dataclass
class Fp16Report:
    output: Path
    reused: bool
    seconds: float
    types: dict[str, int]
    kept_fp32: dict[str, int]
    clamped_values: int
    parity: dict[str, Any] | None = field(default=None)


def fp16_path(onnx_path: str | Path) -> Path:
    """`build/m.onnx` -> `build/m.fp16.onnx`."""
    p = Path(onnx_path)
    return p.with_name(p.name[: -len(".onnx")] + ".fp16.onnx") if p.name.endswith(".onnx") else p.with_name(p.name + ".fp16.onnx")


def type_summary(model) -> dict[str, int]:
    """Counts what decides a strongly typed build: float16/float32 tensors, Q/DQ nodes, and the I/O types.

    Counted over initializers, graph I/O and every value with an inferred type, so a
    converter that silently left the graph FP32 shows `float16 == 0`.
    """
    g = model.graph
    types: list[int] = [t.data_type for t in g.initializer]
    types += [v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)]
    for n in g.node:  # Constant nodes carry weights too in some exports
        types += [a.t.data_type for a in n.attribute if a.name == "value" and a.HasField("t")]
    counts = collections.Counter(types)
    ops = collections.Counter(n.op_type for n in g.node)
    return {
        "float16": counts.get(FLOAT16, 0),
        "float32": counts.get(FLOAT, 0),
        "qdq_nodes": sum(ops.get(o, 0) for o in QDQ_OPS),
        "io_float32": int(all(v.type.tensor_type.elem_type == FLOAT for v in (*g.input, *g.output))),
    }


def check_fp16_model(model) -> dict[str, int]:
    """onnx.checker + strict shape inference, float32 I/O, and float16 actually present."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ScarletError(f"the FP16 ONNX is invalid ({e}); report it with the source ONNX attached.") from e
    summary = type_summary(inferred)
    if not summary["io_float32"]:
        raise ScarletError("the FP16 ONNX does not keep float32 inputs/outputs; callers feed float32 NCHW.")
    if summary["float16"] == 0:
        raise ScarletError("the FP16 conversion left no float16 tensors: the graph would build as FP32.")
    return summary


def _convert(model, keep_fp32_ops: Iterable[str]):
    from onnxconverter_common import float16

    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops))
    with warnings.catch_warnings(record=True) as caught:
        # The converter warns once per weight it clamps into FP16's range; we count them instead.
        warnings.simplefilter("always")
        out = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    clamped = sum("truncated" in str(w.message) for w in caught)
    return out, clamped


def _up_to_date(output: Path, source_sha: str, keep: tuple[str, ...]) -> dict[str, Any] | None:
    try:
        m = read_manifest(output) if output.exists() else None
    except ScarletError:  # the FP16 file was replaced or its manifest damaged: convert again
        return None
    if m and m.get("source_sha256") == source_sha and tuple(m.get("keep_fp32_ops", ())) == keep:
        return m
    return None


def logit_agreement(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement and per-image relative logit error max|a-b| / max|a|."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    rel = np.abs(ref - got).max(axis=1) / np.maximum(np.abs(ref).max(axis=1), 1e-12)
    return {
        "images": int(len(ref)),
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
        "rel_err_median": float(np.median(rel)),
        "rel_err_max": float(rel.max()),
    }


def ort_parity(fp32_onnx: str | Path, fp16_onnx: str | Path, x: np.ndarray, threads: int | None = None) -> dict[str, Any]:
    """FP16 vs FP32 logits on onnxruntime CPU for one preprocessed batch."""
    from scarlet_deploy.runtime.runners.ort import OrtOptions, OrtRunner

    opts = OrtOptions(threads=threads)
    with OrtRunner(fp32_onnx, options=opts) as a, OrtRunner(fp16_onnx, options=opts) as b:
        return logit_agreement(a.infer(x), b.infer(x))


def _parity_on_images(cfg: Fp16Config, output: Path, source_manifest: dict | None) -> dict[str, Any] | None:
    from scarlet_deploy.runtime.data.images import fixed_images
    from scarlet_deploy.runtime.data.preprocess import load_batch

    paths = fixed_images(cfg.parity_images) if cfg.parity_images > 0 else []
    if not paths:
        return None
    from scarlet_deploy.export.registry import MODELS
    from scarlet_deploy.runtime.data.preprocess import Preprocess

    name = (source_manifest or {}).get("model")
    preprocess = MODELS[name].preprocess if name in MODELS else Preprocess()
    return ort_parity(cfg.onnx, output, load_batch(paths, preprocess)) | {"pipeline": "reference"}


def convert_to_fp16(cfg: Fp16Config) -> Fp16Report:
    """Write M.fp16.onnx + manifest (reused when the source and settings are unchanged)."""
    import onnx

    src = Path(cfg.onnx)
    if not src.is_file():
        raise ScarletError(f"ONNX model {src} does not exist; create it with `scarlet export` (or `make export`).")
    output = Path(cfg.output) if cfg.output else fp16_path(src)
    check_output(output, [("--onnx", src)], companions=[manifest_path(output)])
    source_manifest = read_manifest(src)
    spec = MODELS.get((source_manifest or {}).get("model"))
    # What the parity images are preprocessed for; a non-ONNX file or another shape is one sentence, not a traceback.
    check_classifier(src, spec.preprocess.crop if spec else Preprocess().crop, spec.num_classes if spec else 1000,
                     spec.name if spec else None)
    keep = tuple(cfg.keep_fp32_ops)
    source_sha = sha256_file(src)
    t0 = time.perf_counter()
    if not cfg.force and (m := _up_to_date(output, source_sha, keep)):
        return Fp16Report(output, True, time.perf_counter() - t0, m["types"], m["kept_fp32"], m["clamped_values"], m.get("parity"))

    model = onnx.load(str(src))
    source_types = type_summary(model)
    if source_types["qdq_nodes"] or source_types["float16"]:
        raise ScarletError(f"{src} is not a float32 model (it has Q/DQ or float16 tensors); convert the exported FP32 ONNX.")
    model16, clamped = _convert(model, keep)
    types = check_fp16_model(model16)
    kept = dict(collections.Counter(n.op_type for n in model16.graph.node if n.op_type in keep))
    with atomic_path(output) as tmp:
        onnx.save(model16, str(tmp))
        parity = _parity_on_images(cfg, tmp, source_manifest)  # before the rename: a failure leaves nothing behind
        sha = sha256_file(tmp)
    seconds = time.perf_counter() - t0
    write_manifest(output, {
        "kind": "onnx-fp16",
        "precision": "fp16",
        "model": (source_manifest or {}).get("model"),
        "source": str(src),
        "source_sha256": source_sha,
        "source_manifest": source_manifest,
        "sha256": sha,
        "converter": f"onnxconverter-common {importlib.metadata.version('onnxconverter-common')} convert_float_to_float16",
        "keep_io_types": True,
        "keep_fp32_ops": list(keep),
        "kept_fp32": kept,
        "clamped_values": clamped,
        "types": types,
        "parity": parity,
        "seconds": round(seconds, 3),
    })
    return Fp16Report(output, False, seconds, types, kept, clamped, parity)


def report_dict(r: Fp16Report) -> dict[str, Any]:
    return asdict(r) | {"output": str(r.output)}
