"""`scarlet verify`: did deployment change the model? PyTorch vs every backend on real images.

One pass over the data: each batch is preprocessed once (reference pipeline, plus the
OpenCV deploy pipeline for the first FP32 ONNX), PyTorch runs on the reference tensors, and
every backend's logits are compared with PyTorch's on the same images:

- model parity: the backend on the reference tensors (what export/quantisation changed);
- pipeline parity: the first FP32 ONNX on deploy tensors (what OpenCV preprocessing changed).

Model parity gates the exit code per precision; pipeline parity is reported, not gated.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.runners.registry import open_runner
from scarlet_deploy.runtime.verify.compare import Accuracy, Comparison
from scarlet_deploy.runtime.verify.config import VerifyConfig
from scarlet_deploy.runtime.verify.discover import calibration_overlap, resolve_backends

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

    from scarlet_deploy.export.checkpoint import load_model
    from scarlet_deploy.export.registry import get_spec
    from scarlet_deploy.runtime.core.host import physical_cores
    from scarlet_deploy.runtime.core.report import environment
    from scarlet_deploy.runtime.data.dataset import default_dataset, open_dataset, stream_batches
    from scarlet_deploy.runtime.runners.pytorch import TorchRunner

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
        runners = [stack.enter_context(open_runner(b.kind, b.path, name=b.name, threads=threads)) for b in backends]  # loaded: a GPU/file problem stops us here
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
        ok, rule = cfg.thresholds.check(b.precision, d["top1_agreement"], d["max_rel_error"] or 0.0, d["nonfinite_logits"])
        rows.append({"name": b.name, "kind": b.kind, "backend": b.backend, "path": str(b.path), "precision": b.precision,
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
