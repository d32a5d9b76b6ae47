"""PyTorch -> folded, simplified, fused ONNX with a manifest and measured parity."""
from __future__ import annotations

import io
import os
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scarlet_deploy.export.canonical import canonicalize
from scarlet_deploy.export.checkpoint import LoadedModel, load_model
from scarlet_deploy.export.fold import fold
from scarlet_deploy.export.fuse import fuse_hard_activations, op_histogram
from scarlet_deploy.export.opsets import DEFAULT_EXPORTER, resolve_opset
from scarlet_deploy.export.registry import get_spec
from scarlet_deploy.export.weights import sample_images
from scarlet_deploy.runtime.core.artifacts import atomic_path, manifest_path, sha256_file, tool_versions, write_manifest
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.paths import check_output

PARITY_IMAGES = 8
# Folding reorders float32 arithmetic; anything above this is a bug, not rounding.
MAX_EXPORT_REL_ERROR = 1e-4


@dataclass
class ExportConfig:
    model: str
    output: Path
    let: bool = False
    checkpoint: str | None = None
    opset: int | None = None  # None: the exporter's default (export/opsets.py)
    batch: str | int = "dynamic"
    seed: int = 0
    exporter: str = DEFAULT_EXPORTER


@dataclass
class Parity:
    images: int
    source: str
    max_abs_error: float
    max_rel_error: float  # max |onnx - torch| / max |torch|
    top1_agreement: float
    logit_scale: float
    finite: bool = True  # every PyTorch and ONNX logit is a finite number


@dataclass
class ExportReport:
    output: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def parity(self) -> dict[str, Any]:
        return self.manifest["parity"]


def _batch_size(batch: str | int) -> int | None:
    if batch == "dynamic":
        return None
    try:
        n = int(batch)
    except ValueError:
        n = 0
    if n < 1:
        raise ScarletError(f"--batch must be 'dynamic' or a positive integer, not {batch!r}.")
    return n


def to_onnx(model: torch.nn.Module, opset: int, batch: int | None,
            exporter: str = DEFAULT_EXPORTER) -> "onnx.ModelProto":  # noqa: F821
    """torch.onnx with either exporter, then onnxsim: the graph before our own passes."""
    import onnxsim

    raw = _dynamo(model, opset, batch) if exporter == "dynamo" else _torchscript(model, opset, batch)
    simplified, ok = onnxsim.simplify(raw)
    if not ok:
        raise ScarletError("onnxsim could not validate the simplified model; report this with the model name.")
    got = next((o.version for o in simplified.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ScarletError(f"the {exporter} exporter wrote opset {got} when asked for {opset}; nothing was written. "
                           f"Pass the default --opset, and report this with the torch version.")
    return simplified


def _torchscript(model: torch.nn.Module, opset: int, batch: int | None) -> "onnx.ModelProto":  # noqa: F821
    """The TorchScript exporter: deprecated since torch 2.9; kept as the reference the dynamo path is checked against."""
    import onnx

    buf = io.BytesIO()
    dummy = torch.zeros(batch or 1, 3, 224, 224)
    dyn = None if batch else {"input": {0: "N"}, "logits": {0: "N"}}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, and warns about the constant
        # Pad slices of SAME padding that onnxsim folds anyway; neither concerns the user.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), buf, dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes=dyn, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def _dynamo(model: torch.nn.Module, opset: int, batch: int | None) -> "onnx.ModelProto":  # noqa: F821
    """torch.export + onnxscript's torchlib, then onnxscript's optimizer (optimize=True).

    Both the optimizer and onnxsim run, decided by measurement (torch 2.13, onnxscript 0.7.2, onnxsim 0.8.1,
    all six model variants): without the optimizer, onnxsim leaves 106 CastLike nodes in SCARLET-A and every
    h-swish as Add, Clip, Div, Mul with the constants behind CastLike, so nothing fuses; onnxsim after the
    optimizer changes no node and no initializer (only value_info, which we recompute) and costs 0.2-0.3 s of
    a 5-15 s export. It stays so that "simplified" is the same onnxsim pass for both exporters, and catches
    what a later torch's optimizer might leave behind."""
    import logging

    # 2, not 1: torch.export specialises a dimension whose example size is 0 or 1 to that constant.
    dummy = torch.zeros(batch or 2, 3, 224, 224)
    dyn = None if batch else ({0: torch.export.Dim("N", min=1)},)
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)  # "torchvision is not installed" and the like: about ops these models do not use
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (dummy,), dynamo=True, optimize=True, verbose=False, opset_version=opset,
                                        input_names=["input"], output_names=["logits"], dynamic_shapes=dyn)
    except Exception as e:  # torch.export's errors are many classes, all meaning "this model does not trace"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ScarletError(f"the dynamo exporter could not export this model ({type(e).__name__}: {first}); nothing "
                           "was written. Pass --exporter torchscript, and report this with the model and torch "
                           "version.") from e
    finally:
        log.setLevel(level)
    return program.model_proto


def build_onnx(folded: torch.nn.Module, opset: int, batch: int | None,
               exporter: str = DEFAULT_EXPORTER) -> tuple["onnx.ModelProto", Counter]:  # noqa: F821
    """A folded network as the ONNX we ship, from either exporter: exported and simplified, h-activations fused,
    canonical, checked, shapes inferred (strict). Returns it and the fused-op counts."""
    import onnx

    model, fused = fuse_hard_activations(to_onnx(folded, opset, batch, exporter))
    model, _ = canonicalize(model)
    onnx.checker.check_model(model, full_check=True)
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True), fused


def measure_parity(reference: torch.nn.Module, onnx_bytes: bytes, x: np.ndarray, source: str) -> Parity:
    import onnxruntime as ort

    with torch.inference_mode():
        ref = reference(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x})[0]
    err = np.abs(out - ref)
    scale = float(np.abs(ref).max())
    return Parity(len(x), source, float(err.max()), float(err.max() / max(scale, 1e-30)),
                  float((out.argmax(1) == ref.argmax(1)).mean()), scale,
                  bool(np.isfinite(ref).all() and np.isfinite(out).all()))


def export_model(cfg: ExportConfig, loaded: LoadedModel | None = None) -> ExportReport:
    """Write cfg.output (+ manifest) or nothing at all."""
    import onnx

    opset = resolve_opset(cfg.exporter, cfg.opset)
    batch = _batch_size(cfg.batch)
    check_output(cfg.output, [("--checkpoint", cfg.checkpoint)], companions=[manifest_path(cfg.output)])
    t0 = time.perf_counter()
    loaded = loaded or load_model(cfg.model, cfg.let, cfg.checkpoint, cfg.seed)
    folded, fates = fold(loaded.model)
    model, fused = build_onnx(folded, opset, batch, cfg.exporter)
    data = model.SerializeToString(deterministic=True)

    # seed 1: synthetic parity images differ from the ones seeded weights were fitted on
    x, source = sample_images(batch or PARITY_IMAGES, get_spec(loaded.name).preprocess, seed=1)
    parity = measure_parity(loaded.model, data, x, source)
    # Written as "not within": NaN fails every comparison, so `nan > tol` would let a NaN model through.
    if not parity.finite:
        raise ScarletError(f"{loaded.describe()} gives NaN or infinite logits on {source}: its weights are not usable "
                           "(training diverged or the checkpoint is damaged); nothing was written. Export a good checkpoint.")
    if not (parity.max_rel_error <= MAX_EXPORT_REL_ERROR and parity.top1_agreement >= 1.0):
        raise ScarletError(f"the exported graph does not reproduce PyTorch (relative logit error {parity.max_rel_error:.2e}, "
                           f"top-1 agreement {parity.top1_agreement:.3f}); nothing was written. Please report this.")
    out = Path(cfg.output)
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    manifest = {
        "artifact": "onnx",
        "precision": "fp32",
        "model": loaded.name,
        "let": loaded.let,
        "pretrained": loaded.pretrained,
        "checkpoint_sha256": loaded.checkpoint_sha256,
        "weights_source": loaded.source,
        "onnx_sha256": sha256_file(out),
        "exporter": cfg.exporter,
        "opset": opset,
        "batch": cfg.batch,
        "input": {"name": "input", "shape": [batch or "N", 3, 224, 224], "dtype": "float32"},
        "output": {"name": "logits", "shape": [batch or "N", 1000], "dtype": "float32"},
        "preprocess": asdict(get_spec(loaded.name).preprocess),
        "versions": tool_versions(),
        "ops": op_histogram(model),
        "fused": dict(fused),
        "lets": [f.as_dict() for f in fates],
        "parity": asdict(parity),
        "export_seconds": round(time.perf_counter() - t0, 2),
    }
    write_manifest(out, manifest)
    return ExportReport(out, manifest)


def ensure_onnx(model: str, out_dir: str | os.PathLike, checkpoint: str | None = None,
                loaded: LoadedModel | None = None) -> Path:
    """out_dir/<model>.onnx, exported when missing (a fresh clone): what bench, make calib and gpu-check
    start from. `loaded` saves loading the model a second time."""
    path = Path(out_dir) / f"{model}.onnx"
    if not path.exists():
        export_model(ExportConfig(model=model, checkpoint=checkpoint, output=path), loaded)
    return path
