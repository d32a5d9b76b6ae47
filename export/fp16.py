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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scarlet_deploy.export.registry import MODELS
from scarlet_deploy.runtime.core.artifacts import atomic_path, manifest_path, read_manifest, sha256_file, write_manifest
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.onnx_io import check_classifier, read_io
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
    clamped: dict[str, Any]
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


# FP16's real limits. A float32 constant beyond them is clamped by the converter: finite
# values past +-65504 to +-65504 (not to infinity), nonzero values below 2**-24 in magnitude up
# to 2**-24 (not flushed to zero: a Q/DQ scale of 0 is invalid). onnxconverter-common's own
# defaults (1e4, 1e-7) would clamp values FP16 holds exactly.
FP16_MAX_FINITE = float(np.finfo(np.float16).max)  # 65504
FP16_MIN_POSITIVE = float(np.finfo(np.float16).smallest_subnormal)  # 2**-24
FP16_MIN_NORMAL = float(np.finfo(np.float16).smallest_normal)  # 2**-14


def _float_constants(model) -> dict[str, Any]:
    """Name -> TensorProto of every initializer and Constant-node value."""
    out = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            out.update((n.output[0], a.t) for a in n.attribute if a.name == "value" and a.HasField("t"))
    return out


def clamp_counts(before, after) -> dict[str, Any]:
    """What the conversion did to the float32 constants it made float16: how many it clamped
    to FP16's largest finite value or raised to its smallest positive one, and how many now
    hold fewer significant bits (subnormal)."""
    from onnx import numpy_helper

    converted = _float_constants(after)
    above = below = subnormal = 0
    for name, t in _float_constants(before).items():
        if t.data_type != FLOAT or name not in converted or converted[name].data_type != FLOAT16:
            continue
        a = np.abs(numpy_helper.to_array(t))
        a = a[np.isfinite(a)]
        above += int((a > FP16_MAX_FINITE).sum())
        below += int(((a > 0) & (a < FP16_MIN_POSITIVE)).sum())
        subnormal += int(((a >= FP16_MIN_POSITIVE) & (a < FP16_MIN_NORMAL)).sum())
    return {"max_finite": FP16_MAX_FINITE, "min_positive": FP16_MIN_POSITIVE,
            "clamped_to_max": above, "raised_to_min_positive": below, "subnormal": subnormal}


def _convert(model, keep_fp32_ops: Iterable[str]):
    from onnxconverter_common import float16

    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops))
    with warnings.catch_warnings():
        # The converter warns once per tensor it clamps; clamp_counts counts the values instead.
        warnings.simplefilter("ignore")
        out = float16.convert_float_to_float16(model, min_positive_val=FP16_MIN_POSITIVE, max_finite_val=FP16_MAX_FINITE,
                                               keep_io_types=True, op_block_list=block)
    return out


def _settings(kind: str, keep: tuple[str, ...]) -> dict[str, Any]:
    """Everything besides the source that decides the output: a change means converting again."""
    return {"kind": kind, "keep_fp32_ops": list(keep), "max_finite": FP16_MAX_FINITE, "min_positive": FP16_MIN_POSITIVE}


def _up_to_date(output: Path, source_sha: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    try:
        m = read_manifest(output) if output.exists() else None
    except ScarletError:  # the FP16 file was replaced or its manifest damaged: convert again
        return None
    if (m and m.get("source_sha256") == source_sha and m.get("settings") == settings
            and m.get("sha256") == sha256_file(output)):
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


def ort_parity(fp32_onnx: str | Path, fp16_onnx: str | Path, x: np.ndarray, threads: int | None = None,
               fake_quant: bool = False) -> dict[str, Any]:
    """FP16 vs FP32 logits on onnxruntime CPU for one preprocessed batch.

    fake_quant: graph optimisations off, so Q/DQ pairs run as float quantise-dequantise (the
    arithmetic TensorRT's explicit quantization emulates). Needed for FP16 Q/DQ models too:
    onnxruntime 1.32's optimised CPU graph gives wrong logits for them (measured on Lite0).
    """
    from scarlet_deploy.runtime.runners.ort import OrtOptions, OrtRunner

    opts = OrtOptions(threads=threads, opt_level="disable" if fake_quant else "all")
    with OrtRunner(fp32_onnx, options=opts) as a, OrtRunner(fp16_onnx, options=opts) as b:
        ref, got = a.infer(x), b.infer(x)
    if not np.isfinite(got).all():
        raise ScarletError(f"{fp16_onnx} gives non-finite logits on real images (FP16 overflow); keep the "
                           "overflowing layers in float32 or use the float32 model.")
    return logit_agreement(ref, got)


def _parity_on_images(cfg: Fp16Config, source: Path, output: Path, model: str | None,
                      fake_quant: bool) -> dict[str, Any] | None:
    from scarlet_deploy.export.registry import MODELS
    from scarlet_deploy.runtime.data.images import fixed_images
    from scarlet_deploy.runtime.data.preprocess import Preprocess, load_batch

    paths = fixed_images(cfg.parity_images) if cfg.parity_images > 0 else []
    if not paths:
        return None
    preprocess = MODELS[model].preprocess if model in MODELS else Preprocess()
    return (ort_parity(source, output, load_batch(paths, preprocess), fake_quant=fake_quant)
            | {"pipeline": "reference", "fake_quant": fake_quant})


def _convert_file(cfg: Fp16Config, kind: str, prepare: Callable[[Any, Path], Any],
                  extra: Callable[[dict | None], dict[str, Any]]) -> Fp16Report:
    """Convert cfg.onnx (after `prepare(model, path)`), check it, compare it on real images, and
    write it with its manifest; reused when the source and settings are unchanged."""
    import onnx

    src = Path(cfg.onnx)
    if not src.is_file():
        raise ScarletError(f"ONNX model {src} does not exist; create it with `scarlet export` (or `make export`).")
    output = Path(cfg.output) if cfg.output else fp16_path(src)
    check_output(output, [("--onnx", src)], companions=[manifest_path(output)])
    source_manifest = read_manifest(src)
    spec = MODELS.get((source_manifest or {}).get("model"))
    if cfg.parity_images > 0:  # the images are preprocessed for the model: its input must take them
        check_classifier(src, spec.preprocess.crop if spec else Preprocess().crop, spec.num_classes if spec else 1000,
                         spec.name if spec else None)
    else:  # any float ONNX converts; a file that is not ONNX is one sentence, not a traceback
        read_io(src)
    keep = tuple(cfg.keep_fp32_ops)
    settings = _settings(kind, keep)
    source_sha = sha256_file(src)
    t0 = time.perf_counter()
    if not cfg.force and (m := _up_to_date(output, source_sha, settings)):
        return Fp16Report(output, True, time.perf_counter() - t0, m["types"], m["kept_fp32"], m["clamped"], m.get("parity"))

    model = prepare(onnx.load(str(src)), src)
    model16 = _convert(model, keep)
    types = check_fp16_model(model16)
    if types["qdq_nodes"]:
        check_qdq_scales(model16)
    clamped = clamp_counts(model, model16)
    kept = dict(collections.Counter(n.op_type for n in model16.graph.node if n.op_type in keep))
    name = (source_manifest or {}).get("model")
    with atomic_path(output) as tmp:
        onnx.save(model16, str(tmp))
        # before the rename: a failure leaves nothing behind
        parity = _parity_on_images(cfg, src, tmp, name, fake_quant=types["qdq_nodes"] > 0)
        sha = sha256_file(tmp)
    seconds = time.perf_counter() - t0
    write_manifest(output, {
        "kind": kind,
        "model": name,
        "source": str(src),
        "source_sha256": source_sha,
        "source_manifest": source_manifest,
        "sha256": sha,
        "converter": f"onnxconverter-common {importlib.metadata.version('onnxconverter-common')} convert_float_to_float16",
        "settings": settings,
        "keep_io_types": True,
        "keep_fp32_ops": list(keep),
        "kept_fp32": kept,
        "clamped": clamped,
        "types": types,
        "parity": parity,
        "seconds": round(seconds, 3),
    } | extra(source_manifest))
    return Fp16Report(output, False, seconds, types, kept, clamped, parity)


def convert_to_fp16(cfg: Fp16Config) -> Fp16Report:
    """Write M.fp16.onnx + manifest from the exported float32 M.onnx."""

    def prepare(model, src: Path):
        t = type_summary(model)
        if t["qdq_nodes"] or t["float16"]:
            raise ScarletError(f"{src} is not a float32 model (it has Q/DQ or float16 tensors); convert the exported "
                               "FP32 ONNX (a Q/DQ ONNX for TensorRT goes through convert_qdq_to_fp16).")
        return model

    return _convert_file(cfg, "onnx-fp16", prepare, lambda sm: {"precision": "fp16"})


# Opset 19 is the first whose QuantizeLinear/DequantizeLinear take float16 inputs and scales.
QDQ_FP16_OPSET = 19


def check_qdq_scales(model) -> int:
    """Number of Q/DQ scales; a ScarletError unless every one is positive and finite."""
    from onnx import numpy_helper

    consts = _float_constants(model)
    scales = {n.input[1] for n in model.graph.node if n.op_type in QDQ_OPS}
    for name in scales:
        if name in consts:
            a = numpy_helper.to_array(consts[name]).astype(np.float64)
            if not (np.isfinite(a) & (a > 0)).all():
                raise ScarletError(f"Q/DQ scale {name} is not positive and finite after the FP16 conversion "
                                   f"(min {a.min():.3g}, max {a.max():.3g}); report it with the Q/DQ ONNX attached.")
    return len(scales)


def convert_qdq_to_fp16(cfg: Fp16Config) -> Fp16Report:
    """Write M.int8-trt.fp16.onnx + manifest: the TensorRT Q/DQ ONNX with everything outside its
    quantized layers in FP16 (I/O and reductions float32), as NVIDIA ModelOpt writes it by default.

    Under TensorRT 11's strong typing a float32 Q/DQ ONNX runs every non-quantized layer (and
    the quantized layers' outputs) in FP32. Q/DQ scales become float16 too, so the opset is
    raised to 19; each scale stays positive and finite (see FP16_MIN_POSITIVE). onnxruntime
    compares it with the float32 Q/DQ model as fake-quant on real images.
    """

    def prepare(model, src: Path):
        from onnx import version_converter

        t = type_summary(model)
        if not t["qdq_nodes"] or t["float16"]:
            raise ScarletError(f"{src} is not a float32 Q/DQ model; pass the Q/DQ ONNX from `scarlet calibrate --target trt`.")
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        return version_converter.convert_version(model, QDQ_FP16_OPSET) if opset < QDQ_FP16_OPSET else model

    def extra(source_manifest: dict | None) -> dict[str, Any]:
        sm = source_manifest or {}
        # carried over so the INT8 checks (target, staleness against the FP32 ONNX) read the same here
        return {"precision": "int8", "high_precision": "fp16", "target": sm.get("target"),
                "source_onnx": sm.get("source_onnx"), "source_onnx_sha256": sm.get("source_onnx_sha256")}

    return _convert_file(cfg, "onnx-qdq-fp16", prepare, extra)


def report_dict(r: Fp16Report) -> dict[str, Any]:
    return asdict(r) | {"output": str(r.output)}
