"""`scarlet verify`: did deployment change the model? PyTorch vs every backend on real images.

One pass over the data: each batch is preprocessed once (reference pipeline, plus the
OpenCV deploy pipeline for the first FP32 ONNX), PyTorch runs on the reference tensors, and
every backend's logits are compared with PyTorch's on the same images:

- model parity: the backend on the reference tensors (what export/quantisation changed);
- pipeline parity: the first FP32 ONNX on deploy tensors (what OpenCV preprocessing changed).

Model parity gates the exit code per precision; pipeline parity is reported, not gated.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ScarletError

from .predict import softmax, top_k

PRECISIONS = ("fp32", "fp16", "int8")
MAX_LISTED_MD = 20  # disagreements per backend in the markdown (the JSON has all of them)


@dataclass(frozen=True)
class Thresholds:
    fp32_max_rel_error: float = 1e-3  # max |backend - pytorch| / max |pytorch logits|
    fp32_min_agreement: float = 1.0
    fp16_min_agreement: float = 0.99
    int8_min_agreement: float = 0.95

    def check(self, precision: str, agreement: float, rel_error: float) -> tuple[bool, str]:
        if precision == "fp32":
            rule = f"agree >= {self.fp32_min_agreement:.2%}, rel err <= {self.fp32_max_rel_error:g}"
            return agreement >= self.fp32_min_agreement and rel_error <= self.fp32_max_rel_error, rule
        floor = self.fp16_min_agreement if precision == "fp16" else self.int8_min_agreement
        return agreement >= floor, f"agree >= {floor:.2%}"


@dataclass
class Backend:
    """One thing to compare with PyTorch: an ONNX model for onnxruntime, or a TensorRT plan."""

    name: str
    kind: str  # ort | trt
    path: Path
    precision: str  # fp32 | fp16 | int8
    manifest: dict[str, Any] | None


@dataclass
class VerifyConfig:
    model: str
    onnx: list[Path] = field(default_factory=list)
    engines: list[Path] = field(default_factory=list)
    auto_onnx: Path | None = None  # use every <dir>/<model>*.onnx whose manifest names this model
    let: bool = False
    checkpoint: str | None = None
    seed: int = 0
    val_dir: Path | None = None
    limit: int | None = None
    batch: int = 64
    workers: int | None = None  # decode processes; None: every core
    threads: int | None = None  # inference threads; None: physical cores
    pipeline_parity: bool = True
    thresholds: Thresholds = field(default_factory=Thresholds)
    progress: bool = True


# ----------------------------------------------------------------------------- backends

def _origin(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The FP32 export manifest an artifact descends from (INT8 -> source ONNX, FP16 -> source, plan -> ONNX)."""
    from export.artifacts import read_manifest

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
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.op_type.startswith("QLinear") for n in g.node):
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in g.initializer):
        return "fp16"
    return "fp32"


def describe_backend(path: str | os.PathLike, kind: str = "ort") -> Backend:
    from export.artifacts import read_manifest

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
    if sha and sha != checkpoint_sha256:
        raise ScarletError(f"{b.path} was exported from other weights ({sha[:16]}) than PyTorch loads here "
                           f"({checkpoint_sha256[:16]}); re-export it with the same --checkpoint (make export CKPT=...).")


def discover_onnx(build_dir: Path, model: str, let: bool) -> tuple[list[Path], list[Path]]:
    """build_dir/<model>*.onnx whose manifest names this model (and LET variant): FP32, FP16, INT8 for
    onnxruntime, and apart from them the Q/DQ models made for TensorRT. Those are judged as engines
    (--engine): onnxruntime's CPU INT8xINT8 kernels saturate where TensorRT's do not, so their
    numbers here would describe onnxruntime, not the deployment."""
    from export.artifacts import read_manifest

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
            from export.onnx_export import ExportConfig, export_model

            out = Path(cfg.auto_onnx) / f"{cfg.model}{'-let' if cfg.let else ''}.onnx"
            notes.append(f"no ONNX for {cfg.model}{' +LET' if cfg.let else ''} in {cfg.auto_onnx}: exported {out} first")
            print(notes[-1])
            export_model(ExportConfig(cfg.model, out, cfg.let, cfg.checkpoint, seed=cfg.seed), loaded)
            auto = [out]
        paths += [p for p in auto if p not in paths]
    if not paths and not cfg.engines:
        raise ScarletError("nothing to verify: pass --onnx M.onnx (repeatable), --auto-onnx BUILD_DIR or --engine M.plan.")
    backends = [describe_backend(p, "ort") for p in paths] + [describe_backend(p, "trt") for p in cfg.engines]
    for b in backends:
        check_weights(b, loaded.name, loaded.let, loaded.checkpoint_sha256)
    backends.sort(key=lambda b: (b.kind != "ort", PRECISIONS.index(b.precision)))
    return backends, notes


def calibration_overlap(backends: list[Backend], root: Path) -> list[str]:
    """Say so when an INT8 model was calibrated on images from the folder its accuracy is measured on."""
    notes = []
    for b in backends:
        cal = (b.manifest or {}).get("calibration_images") or {}
        if cal.get("dir") and Path(cal["dir"]).resolve() == Path(root).resolve():
            notes.append(f"{b.name} was calibrated on {cal.get('count', '?')} images of this same folder: "
                         "its accuracy here overlaps its calibration set (use a disjoint --val-dir for a clean number)")
    return notes


def _runner(b: Backend, threads: int | None):
    if b.kind == "trt":
        from .tensorrt import TrtRunner  # only with --engine: needs a GPU and TensorRT

        return TrtRunner(b.path, name=b.name)
    from .backends import OrtRunner
    from .ort import OrtOptions

    return OrtRunner(b.path, b.name, OrtOptions(threads=threads))


# ----------------------------------------------------------------------------- metrics

class Accuracy:
    """Top-1/top-5 on the labelled images."""

    def __init__(self) -> None:
        self.images = self.top1 = self.top5 = 0

    def update(self, logits: np.ndarray, labels: list[int | None]) -> None:
        if any(v is None for v in labels):
            return
        y = np.asarray(labels)
        self.images += len(y)
        self.top1 += int((logits.argmax(1) == y).sum())
        self.top5 += int((top_k(logits) == y[:, None]).any(1).sum())

    def as_dict(self) -> dict[str, Any]:
        n = self.images
        return {"images": n, "top1": self.top1 / n if n else None, "top5": self.top5 / n if n else None}


class Comparison:
    """A backend's logits against PyTorch's on the same images."""

    def __init__(self) -> None:
        self.accuracy = Accuracy()
        self.images = self.agree = 0
        self.top5_overlap = 0.0
        self.max_abs = self.sum_abs = self.ref_scale = 0.0
        self.values = 0
        self.worst_cos, self.worst_cos_file = 1.0, None
        self.disagreements: list[dict[str, Any]] = []
        self.seconds = 0.0

    def update(self, ref: np.ndarray, out: np.ndarray, items: list, since: float | None = None) -> None:
        """Add a batch; `since`: perf_counter() before the backend ran, to account its inference time."""
        from . import classes
        if since is not None:
            self.seconds += time.perf_counter() - since
        self.accuracy.update(out, [it.label for it in items])
        self.images += len(out)
        r1, o1 = ref.argmax(1), out.argmax(1)
        self.agree += int((r1 == o1).sum())
        self.top5_overlap += float((top_k(ref)[:, :, None] == top_k(out)[:, None, :]).any(2).sum() / 5)
        diff = np.abs(out.astype(np.float64) - ref)
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum())
        self.values += diff.size
        self.ref_scale = max(self.ref_scale, float(np.abs(ref).max()))
        cos = (ref * out).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1), 1e-30)
        i = int(cos.argmin())
        if cos[i] < self.worst_cos:
            self.worst_cos, self.worst_cos_file = float(cos[i]), str(items[i].path)
        pr, po = softmax(ref), softmax(out)
        for i in np.flatnonzero(r1 != o1):
            label = items[i].label
            self.disagreements.append({
                "file": str(items[i].path),
                "label": label, "label_name": classes.name(label) if label is not None else None,
                "pytorch": int(r1[i]), "pytorch_name": classes.name(int(r1[i])), "pytorch_prob": float(pr[i, r1[i]]),
                "backend": int(o1[i]), "backend_name": classes.name(int(o1[i])), "backend_prob": float(po[i, o1[i]]),
            })

    def as_dict(self) -> dict[str, Any]:
        n = self.images
        return {
            **{k: v for k, v in self.accuracy.as_dict().items() if k != "images"},
            "labelled_images": self.accuracy.images,
            "images": n,
            "top1_agreement": self.agree / n if n else None,
            "top5_overlap": self.top5_overlap / n if n else None,
            "max_abs_error": self.max_abs,
            "mean_abs_error": self.sum_abs / self.values if self.values else None,
            "logit_scale": self.ref_scale,
            "max_rel_error": self.max_abs / self.ref_scale if self.ref_scale else None,
            "worst_cosine": self.worst_cos,
            "worst_cosine_file": self.worst_cos_file,
            "inference_seconds": round(self.seconds, 3),
            "disagreements": self.disagreements,
        }


# ----------------------------------------------------------------------------- the pass

@dataclass
class VerifyReport:
    model: dict[str, Any]
    dataset: dict[str, Any]
    reference: dict[str, Any]  # PyTorch accuracy
    backends: list[dict[str, Any]]
    pipeline: dict[str, Any] | None
    skipped: list[dict[str, str]]
    run: dict[str, Any]
    thresholds: dict[str, float]
    notes: list[str]
    environment: dict[str, Any]

    @property
    def passed(self) -> bool:
        return all(b["passed"] for b in self.backends)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, **asdict(self)}


def verify(cfg: VerifyConfig, loaded=None) -> VerifyReport:
    """Run the pass and return the report; `loaded` (export.checkpoint.LoadedModel) skips loading."""
    import torch
    from tqdm import tqdm

    from export.checkpoint import load_model
    from export.registry import get_spec

    from .backends import TorchRunner
    from .dataset import default_dataset, open_dataset, stream_batches
    from .ort import physical_cores
    from .report import environment

    threads = cfg.threads or physical_cores()
    torch.set_num_threads(threads)
    loaded = loaded or load_model(cfg.model, cfg.let, cfg.checkpoint, cfg.seed)
    backends, notes = resolve_backends(cfg, loaded)
    full = open_dataset(cfg.val_dir) if cfg.val_dir else default_dataset()
    ds = full.subset(cfg.limit)
    spec = get_spec(cfg.model)

    notes += calibration_overlap(backends, full.root)

    # Pipeline parity on the first FP32 ONNX only: decoding every image twice costs, one backend shows the effect.
    deploy_on = next((b for b in backends if b.kind == "ort" and b.precision == "fp32"), None) if cfg.pipeline_parity else None
    pipelines = ("reference", "deploy") if deploy_on else ("reference",)
    if cfg.pipeline_parity and not deploy_on:
        notes.append("pipeline parity skipped: no FP32 ONNX backend")

    reference = Accuracy()
    torch_runner = TorchRunner(loaded.model, threads=threads).load()
    stats = [Comparison() for _ in backends]
    pipeline = Comparison()
    skipped: list[dict[str, str]] = []
    torch_seconds = wait_seconds = 0.0
    decoded = 0
    workers = (os.cpu_count() or 1) if cfg.workers is None else cfg.workers
    with contextlib.ExitStack() as stack:
        runners = [stack.enter_context(_runner(b, threads)) for b in backends]  # loaded: a GPU/file problem stops us here
        t_start = time.perf_counter()
        bar = stack.enter_context(tqdm(total=len(ds.items), unit="img", desc=f"verify {cfg.model}",
                                       disable=not cfg.progress, dynamic_ncols=True))
        t_wait = time.perf_counter()
        for batch in stream_batches(ds, spec.preprocess, pipelines, cfg.batch, workers):
            wait_seconds += time.perf_counter() - t_wait
            skipped += batch.skipped
            if batch.items:
                x = batch.tensors["reference"]
                t0 = time.perf_counter()
                ref = torch_runner.infer(x)
                torch_seconds += time.perf_counter() - t0
                reference.update(ref, [it.label for it in batch.items])
                decoded += len(batch.items)
                for b, runner, st in zip(backends, runners, stats):
                    t0 = time.perf_counter()
                    st.update(ref, runner.infer(x), batch.items, since=t0)
                    if b is deploy_on:
                        t0 = time.perf_counter()
                        pipeline.update(ref, runner.infer(batch.tensors["deploy"]), batch.items, since=t0)
            bar.update(len(batch.items) + len(batch.skipped))
            t_wait = time.perf_counter()
    seconds = time.perf_counter() - t_start
    if not decoded:
        raise ScarletError(f"none of the {len(ds.items)} images could be read ({skipped[0]['why'] if skipped else ''}); "
                           "check the folder.")

    rows = []
    for b, st in zip(backends, stats):
        d = st.as_dict()
        ok, rule = cfg.thresholds.check(b.precision, d["top1_agreement"], d["max_rel_error"] or 0.0)
        rows.append({"name": b.name, "kind": b.kind, "path": str(b.path), "precision": b.precision,
                     "preprocessing": "reference", "passed": ok, "rule": rule, **d,
                     "images_per_s": d["images"] / st.seconds if st.seconds else None, "manifest": b.manifest})
    pipe = None
    if deploy_on:
        d = pipeline.as_dict()
        model_row = rows[backends.index(deploy_on)]
        delta = (d["top1"] - model_row["top1"]) if d["top1"] is not None else None
        pipe = {"name": deploy_on.name, "preprocessing": "deploy (OpenCV) vs reference (PIL)", "gated": False, **d,
                "top1_change_from_preprocessing": delta,
                "top5_change_from_preprocessing": (d["top5"] - model_row["top5"]) if delta is not None else None}
    return VerifyReport(
        model={"name": loaded.name, "let": loaded.let, "pretrained": loaded.pretrained,
               "checkpoint_sha256": loaded.checkpoint_sha256, "weights": loaded.source},
        dataset={**ds.summary(), "images_in_folder": len(full.items), "limit": cfg.limit,
                 "decoded": decoded, "skipped": len(skipped)},
        reference={"name": "pytorch", **reference.as_dict(), "inference_seconds": round(torch_seconds, 3),
                   "images_per_s": decoded / torch_seconds if torch_seconds else None},
        backends=rows, pipeline=pipe, skipped=skipped,
        run={"seconds": round(seconds, 3), "images_per_s": (decoded + len(skipped)) / seconds,
             "waiting_for_images_seconds": round(wait_seconds, 3), "batch": cfg.batch, "workers": workers,
             "threads": threads, "pipelines": list(pipelines)},
        thresholds=asdict(cfg.thresholds), notes=notes, environment=environment(),
    )


# ----------------------------------------------------------------------------- reports

def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _sci(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def render_markdown(r: VerifyReport) -> str:
    from .report import markdown_table

    ds, run, m = r.dataset, r.run, r.model
    weights = "pretrained" if m["pretrained"] else "SEEDED, NOT PRETRAINED (accuracy is meaningless; parity still holds)"
    lines = [
        f"# verify {m['name']}{' +LET' if m['let'] else ''}: {'PASS' if r.passed else 'FAIL'}",
        "",
        f"- weights: {weights}; {m['weights']}",
        f"- images: {ds['decoded']} decoded of {ds['images']} ({ds['layout']} at {ds['root']}; "
        f"{ds['images_in_folder']} in the folder{', --limit ' + str(ds['limit']) if ds['limit'] else ''}); "
        f"classes present: {ds['classes_present'] if ds['classes_present'] is not None else 'n/a'}; "
        f"labels: {ds['label_source']}; unreadable: {ds['skipped']}",
        f"- throughput: {run['images_per_s']:.1f} images/s for decode + PyTorch + {len(r.backends)} backend(s)"
        f"{' + deploy-pipeline pass' if r.pipeline else ''} (batch {run['batch']}, {run['workers']} decode workers, "
        f"{run['threads']} inference threads; {run['seconds']:.1f} s, {run['waiting_for_images_seconds']:.1f} s waiting for images)",
        f"- {r.environment['date']}, {r.environment['machine']['cpu']}",
        *[f"- note: {n}" for n in r.notes],
        "",
        "## Model parity (same reference-preprocessed tensors into every backend)",
        "",
    ]
    headers = ["backend", "precision", "images", "top-1", "top-5", "top-1 agree", "top-5 overlap",
               "max abs err", "max rel err", "mean abs err", "worst cos", "img/s", "threshold", "result"]
    rows = [["PyTorch (reference)", "fp32", r.reference["images"] or ds["decoded"], _pct(r.reference["top1"]),
             _pct(r.reference["top5"]), "-", "-", "-", "-", "-", "-", f"{r.reference['images_per_s']:.1f}", "-", "-"]]
    for b in r.backends:
        rows.append([b["name"], b["precision"], b["images"], _pct(b["top1"]), _pct(b["top5"]), _pct(b["top1_agreement"]),
                     _pct(b["top5_overlap"]), _sci(b["max_abs_error"]), _sci(b["max_rel_error"]), _sci(b["mean_abs_error"]),
                     f"{b['worst_cosine']:.6f}", f"{b['images_per_s']:.1f}", b["rule"], "PASS" if b["passed"] else "**FAIL**"])
    lines.append(markdown_table(headers, rows))
    p = r.pipeline
    if p:
        lines += ["## Pipeline parity (PyTorch on PIL reference preprocessing vs ONNX on OpenCV deploy preprocessing)", "",
                  markdown_table(["backend", "top-1", "top-5", "top-1 change", "top-5 change", "top-1 agree",
                                  "top-5 overlap", "max abs err", "worst cos"],
                                 [[p["name"], _pct(p["top1"]), _pct(p["top5"]),
                                   "n/a" if p["top1_change_from_preprocessing"] is None else f"{100 * p['top1_change_from_preprocessing']:+.2f} pt",
                                   "n/a" if p["top5_change_from_preprocessing"] is None else f"{100 * p['top5_change_from_preprocessing']:+.2f} pt",
                                   _pct(p["top1_agreement"]), _pct(p["top5_overlap"]), _sci(p["max_abs_error"]),
                                   f"{p['worst_cosine']:.6f}"]]),
                  "Reported, not gated: the preprocessing choice, not the model, causes these differences.", ""]
    for b in [*r.backends, *([p] if p else [])]:
        dis = b["disagreements"]
        if not dis:
            continue
        title = b["name"] + (" with deploy preprocessing" if b is p else "")
        lines += [f"## Top-1 differs from PyTorch: {title} ({len(dis)} images"
                  f"{', first ' + str(MAX_LISTED_MD) + ' shown; all in the JSON' if len(dis) > MAX_LISTED_MD else ''})", "",
                  markdown_table(["file", "label", "PyTorch", "p", "backend", "p"],
                                 [[Path(d["file"]).name, d["label_name"] or "n/a", d["pytorch_name"], f"{d['pytorch_prob']:.3f}",
                                   d["backend_name"], f"{d['backend_prob']:.3f}"] for d in dis[:MAX_LISTED_MD]])]
    if r.skipped:
        lines += [f"## Unreadable images ({len(r.skipped)}, skipped)", ""] + [f"- {s['path']}: {s['why']}" for s in r.skipped] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def register(sub: argparse._SubParsersAction) -> None:
    from export.registry import MODELS

    t = Thresholds()
    p = sub.add_parser("verify", help="parity of every backend with PyTorch on real images (exit 1 on failure)",
                       description="Compare PyTorch with ONNX (onnxruntime) and TensorRT backends on a validation "
                                   "folder: accuracy, top-1 agreement, logit errors. Exit status 1 when a backend fails.")
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--let", action="store_true", help="the SCARLET network with LET layers")
    p.add_argument("--checkpoint", help="PyTorch checkpoint; default: shipped (Lite0) or seeded weights, as export uses")
    p.add_argument("--seed", type=int, default=0, help="seed of the seeded weights (as given to export)")
    p.add_argument("--onnx", action="append", type=Path, default=[], help="ONNX model to check (repeatable)")
    p.add_argument("--auto-onnx", type=Path, metavar="DIR",
                   help="also every DIR/<model>*.onnx whose manifest names this model (FP32, FP16, INT8); "
                        "exports DIR/<model>.onnx first when there is none")
    p.add_argument("--engine", action="append", type=Path, default=[], help="TensorRT plan (repeatable; GPU only)")
    p.add_argument("--val-dir", type=Path, help="DIR/<wnid>/*.JPEG, an ImageNet root with val/, or flat "
                   "ILSVRC2012_val_*.JPEG (+ LOC_val_solution.csv); default: the shared sample, else sample photos")
    p.add_argument("--limit", type=int, help="only N images, spread over the folder")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, help="decode processes (default: every core; 0 = decode inline)")
    p.add_argument("--threads", type=int, help="inference threads (default: physical cores)")
    p.add_argument("--no-pipeline-parity", dest="pipeline_parity", action="store_false",
                   help="skip the OpenCV deploy-preprocessing pass on the first FP32 ONNX")
    p.add_argument("--fp32-max-rel-error", type=float, default=t.fp32_max_rel_error)
    p.add_argument("--fp32-min-agreement", type=float, default=t.fp32_min_agreement)
    p.add_argument("--fp16-min-agreement", type=float, default=t.fp16_min_agreement)
    p.add_argument("--int8-min-agreement", type=float, default=t.int8_min_agreement)
    p.add_argument("--json", help="write the full report (every number, manifests, versions) here")
    p.add_argument("--markdown", help="write the markdown report here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .report import write_reports

    cfg = VerifyConfig(
        model=args.model, onnx=args.onnx, engines=args.engine, auto_onnx=args.auto_onnx, let=args.let,
        checkpoint=args.checkpoint, seed=args.seed, val_dir=args.val_dir, limit=args.limit, batch=args.batch,
        workers=args.workers, threads=args.threads, pipeline_parity=args.pipeline_parity,
        thresholds=Thresholds(args.fp32_max_rel_error, args.fp32_min_agreement, args.fp16_min_agreement,
                              args.int8_min_agreement),
        progress=not args.quiet)
    report = verify(cfg)
    md = render_markdown(report)
    write_reports(report.as_dict(), md, args.json, args.markdown)
    print(md)
    for path in (args.json, args.markdown):
        if path:
            print(f"wrote {path}")
    return 0 if report.passed else 1
