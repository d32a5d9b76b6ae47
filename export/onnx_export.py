"""PyTorch -> folded, simplified, fused ONNX with a manifest and measured parity."""
from __future__ import annotations

import io
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scarlet_deploy.export.checkpoint import LoadedModel, load_model
from scarlet_deploy.export.fold import fold
from scarlet_deploy.export.fuse import fuse_hard_activations, op_histogram
from scarlet_deploy.export.opsets import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
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
    opset: int = DEFAULT_OPSET
    batch: str | int = "dynamic"
    seed: int = 0


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


def to_onnx(model: torch.nn.Module, opset: int, batch: int | None) -> "onnx.ModelProto":  # noqa: F821
    """torch.onnx (TorchScript exporter: deterministic, and what onnxsim expects), then onnxsim."""
    import onnx
    import onnxsim

    buf = io.BytesIO()
    dummy = torch.zeros(batch or 1, 3, 224, 224)
    dyn = None if batch else {"input": {0: "N"}, "logits": {0: "N"}}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, and warns about the constant
        # Pad slices of SAME padding that onnxsim folds anyway; neither concerns the user.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), buf, dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes=dyn, do_constant_folding=True)
    simplified, ok = onnxsim.simplify(onnx.load_from_string(buf.getvalue()))
    if not ok:
        raise ScarletError("onnxsim could not validate the simplified model; report this with the model name.")
    return simplified


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

    if cfg.opset < MIN_OPSET:
        raise ScarletError(f"--opset {cfg.opset} is too old: HardSwish needs opset >= {MIN_OPSET}.")
    if cfg.opset > MAX_OPSET:
        raise ScarletError(f"--opset {cfg.opset} is newer than the exporter writes (at most {MAX_OPSET}); pass --opset {MAX_OPSET} or less.")
    batch = _batch_size(cfg.batch)
    check_output(cfg.output, [("--checkpoint", cfg.checkpoint)], companions=[manifest_path(cfg.output)])
    t0 = time.perf_counter()
    loaded = loaded or load_model(cfg.model, cfg.let, cfg.checkpoint, cfg.seed)
    folded, fates = fold(loaded.model)
    model = to_onnx(folded, cfg.opset, batch)
    model, fused = fuse_hard_activations(model)
    onnx.checker.check_model(model, full_check=True)
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
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
        "opset": cfg.opset,
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
