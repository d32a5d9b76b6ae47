"""`scarlet verify`: did deployment change the model? PyTorch vs every backend on real images.

One pass over the data: each batch is preprocessed once (reference pipeline, plus the
OpenCV deploy pipeline for the first FP32 ONNX), PyTorch runs on the reference tensors, and
every backend's logits are compared with PyTorch's on the same images:

- model parity: the backend on the reference tensors (what export/quantisation changed);
- pipeline parity: the first FP32 ONNX on deploy tensors (what OpenCV preprocessing changed).

Model parity gates the exit code per precision; pipeline parity is reported, not gated.

The pass streams: each batch becomes per-image rows (compare.py), written chunk by chunk to
a resume journal (journal.py), and PyTorch's logits go to the reference cache
(reference_cache.py) so that the next check of the same weights on the same images skips
PyTorch. The report is reduced from the rows at the end.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import resource
import signal
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.runners.registry import open_runner
from scarlet_deploy.runtime.verify.compare import accuracy, backend_rows, compare, filler_rows, reference_rows
from scarlet_deploy.runtime.verify.config import VerifyConfig
from scarlet_deploy.runtime.verify.discover import calibration_overlap, resolve_backends
from scarlet_deploy.runtime.verify.journal import Journal
from scarlet_deploy.runtime.verify.reference_cache import (
    CachedReference,
    ReferenceCache,
    ReferenceKey,
    image_list_sha256,
    sources_sha256,
)

FULL_VALIDATION = 50_000  # ImageNet-1k validation images: what the projections are for


@dataclass
class VerifyReport:
    model: dict[str, Any]
    dataset: dict[str, Any]
    reference: dict[str, Any]  # PyTorch accuracy, where its logits came from
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


def torch_device(device: str, gpu_id: int) -> str:
    """'cpu' or 'cuda:<gpu_id>', refusing CUDA where PyTorch has none before anything is loaded."""
    if device == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ScarletError(f"--device cuda: PyTorch {torch.__version__} ({build}) sees no CUDA GPU here. Run on a "
                           "machine with an NVIDIA GPU and a CUDA build of PyTorch, or pass --device cpu (the "
                           "onnxruntime backends run on the CPU either way).")
    if not 0 <= gpu_id < torch.cuda.device_count():
        raise ScarletError(f"--gpu-id {gpu_id}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                           f"numbered from 0; pick one of them.")
    return f"cuda:{gpu_id}"


def reference_key(loaded, seed: int, preprocess, ds) -> ReferenceKey:
    import torch

    from scarlet_deploy.runtime.data import preprocess as preprocess_module

    if loaded.pretrained:
        weights = f"sha256:{loaded.checkpoint_sha256}"
    else:
        weights = f"{loaded.checkpoint_sha256}:seed={seed}"  # "seeded:" + the tensors' own hash
    # The code that turns weights and images into logits: our modules the model is built from, and the preprocessing.
    sources = {inspect.getsourcefile(type(m)) for m in loaded.model.modules()
               if type(m).__module__.startswith("scarlet_deploy.")}
    return ReferenceKey(
        model=loaded.name, let=loaded.let, weights=weights,
        preprocess={**asdict(preprocess), "pipeline": "reference"},
        code=sources_sha256([*sources, preprocess_module.__file__]), torch=torch.__version__,
        images=len(ds.items), image_list_sha256=image_list_sha256(it.path for it in ds.items))


def _artifact_identity(b) -> dict[str, Any]:
    st = os.stat(b.path)
    return {"name": b.name, "kind": b.kind, "precision": b.precision, "path": str(Path(b.path).resolve()),
            "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a job scheduler, `kill`) stops the run the way Ctrl-C does: cleanly, resumable."""
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def verify(cfg: VerifyConfig, loaded=None) -> VerifyReport:
    """Run the pass and return the report; `loaded` (export.checkpoint.LoadedModel) skips loading."""
    with contextlib.ExitStack() as run_scope:  # what this run holds (the journal's lock) is let go however it ends
        return _verify(cfg, loaded, run_scope)


def _verify(cfg: VerifyConfig, loaded, run_scope: contextlib.ExitStack) -> VerifyReport:
    import torch
    from tqdm import tqdm

    from scarlet_deploy.export.checkpoint import load_model
    from scarlet_deploy.export.registry import get_spec
    from scarlet_deploy.runtime.core.host import physical_cores
    from scarlet_deploy.runtime.core.report import environment
    from scarlet_deploy.runtime.data.dataset import Dataset, default_dataset, open_dataset, stream_batches
    from scarlet_deploy.runtime.runners.pytorch import TorchRunner

    if cfg.chunk_images < 1:
        raise ScarletError(f"--chunk-images must be at least 1 (got {cfg.chunk_images}).")
    device = torch_device(cfg.device, cfg.gpu_id)
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
    if cfg.pipeline_parity and backends and not deploy_on:
        notes.append("pipeline parity skipped: no FP32 ONNX backend")
    prefixes = [f"b{i}" for i in range(len(backends))]

    key = reference_key(loaded, cfg.seed, spec.preprocess, ds)
    cache = ReferenceCache(cfg.cache_dir / "reference") if cfg.cache_dir is not None and cfg.reference_cache else None
    cached: CachedReference | None = None
    if cache:
        cached, why = cache.lookup(key)
        notes += [why] if why else []
    identity = {"reference_key": key.digest(), "reference": "cache" if cached else device, "batch": cfg.batch,
                "backends": [_artifact_identity(b) for b in backends], "pipelines": list(pipelines)}
    zeros = np.zeros((1, spec.num_classes), np.float32)
    template = {**reference_rows(zeros), **{k: v for p in prefixes for k, v in backend_rows(p, zeros, zeros).items()}}
    if deploy_on:
        template.update(backend_rows("pipe", zeros, zeros))
    clocks = ["t.wait", "t.ref", *[f"t.{p}" for p in prefixes], *(["t.pipe"] if deploy_on else []), "t.wall"]

    journal = Journal(cfg.cache_dir / "verify-resume" if cfg.cache_dir is not None else None, identity, cfg.resume,
                      columns=[*template, "pos", "ok", "why", *clocks])
    run_scope.callback(journal.close)
    notes += journal.notes
    writer = None
    if cache and not cached:
        try:
            writer = cache.writer(key, keep_rows=bool(journal.chunks))
        except BlockingIOError as e:
            notes.append(f"{e}: this run's reference is not cached")
        if writer and journal.chunks and not writer.kept_rows:
            notes.append("the interrupted run's partial reference cache is gone: this run's reference is not cached")
            writer.discard()
            writer = None

    files = [str(it.path) for it in ds.items]
    index = {f: i for i, f in enumerate(files)}
    done = journal.done_positions()
    todo = [i for i in range(len(ds.items)) if i not in done]

    def batches() -> Iterator[tuple[list[int], list[dict[str, str]], dict[str, np.ndarray] | None]]:
        """(positions of readable images, unreadable ones, their tensors) in dataset order."""
        if cached and not backends:  # PyTorch alone, and its logits are cached: no image needs decoding
            for i in range(0, len(todo), cfg.batch):
                part = todo[i:i + cfg.batch]
                yield ([p for p in part if p not in cached.skipped],
                       [{"path": files[p], "why": cached.skipped[p]} for p in part if p in cached.skipped], None)
            return
        sub = Dataset(ds.root, ds.layout, ds.label_source, [ds.items[i] for i in todo], ds.ignored)
        for b in stream_batches(sub, spec.preprocess, pipelines, cfg.batch, workers):
            pos = [index[str(it.path)] for it in b.items]
            skipped = list(b.skipped)
            if cached and any(p in cached.skipped for p in pos):
                # Readable now, unreadable to the run that filled the cache (another pipeline failed then): no row.
                keep = np.array([p not in cached.skipped for p in pos])
                skipped += [{"path": files[p], "why": f"no cached reference row: {cached.skipped[p]}"}
                            for p in pos if p in cached.skipped]
                pos = [p for p, k in zip(pos, keep) if k]
                yield pos, skipped, {k: (v[keep] if v is not None else None) for k, v in b.tensors.items()}
            else:
                yield pos, skipped, b.tensors

    torch_runner = None if cached else TorchRunner(loaded.model, threads=threads, device=device).load()
    workers = (os.cpu_count() or 1) if cfg.workers is None else cfg.workers
    buffer: list[dict[str, np.ndarray]] = []
    seconds: dict[str, float] = defaultdict(float)

    def flush() -> None:
        if not buffer:
            return
        rows = {k: np.concatenate([r[k] for r in buffer]) for k in buffer[0]}
        seconds["t.wall"] = time.perf_counter() - t_chunk
        if writer:
            writer.sync()  # the rows the journal is about to claim are on disk first
        journal.append(rows, {k: seconds[k] for k in clocks})
        buffer.clear()
        seconds.clear()

    with contextlib.ExitStack() as stack:
        if writer:  # a run that stops early keeps its partial rows for --resume; a complete one commits them below
            stack.push(lambda kind, exc, tb: writer.close() if kind else None)
        if cached:
            stack.callback(cached.close)
        if torch_runner:
            stack.callback(torch_runner.close)
        runners = [stack.enter_context(open_runner(b.kind, b.path, name=b.name, threads=threads)) for b in backends]  # loaded: a GPU/file problem stops us here
        stack.enter_context(_sigterm_as_interrupt())
        bar = stack.enter_context(tqdm(total=len(ds.items), initial=len(done), unit="img",
                                       desc=f"verify {cfg.model}", disable=not cfg.progress, dynamic_ncols=True))
        t_chunk = t_wait = time.perf_counter()
        buffered = 0
        try:
            for pos, skipped, tensors in batches():
                seconds["t.wait"] += time.perf_counter() - t_wait
                if pos:
                    x = tensors["reference"] if tensors else None
                    t0 = time.perf_counter()
                    ref = cached.logits(pos) if cached else torch_runner.infer(x)
                    seconds["t.ref"] += time.perf_counter() - t0
                    if not np.isfinite(ref).all():
                        bad = files[pos[int(np.flatnonzero(~np.isfinite(ref).all(1))[0])]]
                        raise ScarletError(f"PyTorch gave NaN/Inf logits (first on {bad}): the weights are broken; "
                                           "check --checkpoint (or re-save it) before verifying anything against them.")
                    if writer:
                        writer.write(pos, ref)
                    rows = {"pos": np.asarray(pos, np.int64), "ok": np.ones(len(pos), bool),
                            "why": np.full(len(pos), ""), **reference_rows(ref)}
                    for prefix, b, runner in zip(prefixes, backends, runners):
                        t0 = time.perf_counter()
                        # throughput mode: a 64-image batch is bulk work, no one waits on one image
                        rows.update(backend_rows(prefix, ref, runner.infer_bulk(x)))
                        seconds[f"t.{prefix}"] += time.perf_counter() - t0
                        if b is deploy_on:
                            t0 = time.perf_counter()
                            rows.update(backend_rows("pipe", ref, runner.infer_bulk(tensors["deploy"])))
                            seconds["t.pipe"] += time.perf_counter() - t0
                    buffer.append(rows)
                if skipped:
                    buffer.append({**filler_rows(template, len(skipped)),
                                   "pos": np.asarray([index[s["path"]] for s in skipped], np.int64),
                                   "ok": np.zeros(len(skipped), bool), "why": np.asarray([s["why"] for s in skipped])})
                buffered += len(pos) + len(skipped)
                bar.update(len(pos) + len(skipped))
                if buffered >= cfg.chunk_images:
                    flush()
                    buffered, t_chunk = 0, time.perf_counter()
                t_wait = time.perf_counter()
            flush()
        except KeyboardInterrupt:
            if journal.folder is not None:
                print(f"\ninterrupted after {len(journal.done_positions())} of {len(ds.items)} images; the same "
                      f"command with --resume continues from there (journal: {journal.folder})", file=sys.stderr)
            raise

    cols = journal.columns()
    if len(cols.get("pos", ())) != len(ds.items) or not np.array_equal(cols["pos"], np.arange(len(ds.items))):
        raise ScarletError(f"the run covered {len(cols.get('pos', ()))} of {len(ds.items)} images; rerun without --resume.")
    ok = cols["ok"]
    skipped = [{"path": files[i], "why": str(cols["why"][i])} for i in np.flatnonzero(~ok)]
    decoded = int(ok.sum())
    if not decoded:  # nothing to resume or cache: no partial reference, no journal left behind
        if writer:
            writer.discard()
        journal.discard()
        raise ScarletError(f"none of the {len(ds.items)} images could be read ({skipped[0]['why'] if skipped else ''}); "
                           "check the folder.")
    good = {k: v[ok] for k, v in cols.items() if np.ndim(v) and k not in ("pos", "ok", "why")}
    labels = np.array([ds.items[i].label if ds.items[i].label is not None else -1 for i in np.flatnonzero(ok)])
    good_files = [files[i] for i in np.flatnonzero(ok)]

    rows = []
    for prefix, b in zip(prefixes, backends):
        d = compare(good, prefix, labels, good_files, float(cols.get(f"t.{prefix}", 0.0)), spec.num_classes)
        ok_rule, rule = cfg.thresholds.check(b.precision, d["top1_agreement"], d["max_rel_error"] or 0.0)
        if d["nonfinite_images"]:
            ok_rule, rule = False, f"{rule}; NaN/Inf logits on {d['nonfinite_images']} images"
        sec = d["inference_seconds"]
        rows.append({"name": b.name, "kind": b.kind, "backend": b.backend, "path": str(b.path), "precision": b.precision,
                     "preprocessing": "reference", "passed": ok_rule, "rule": rule, **d,
                     "images_per_s": d["images"] / sec if sec else None, "manifest": b.manifest})
    pipe = None
    if deploy_on:
        d = compare(good, "pipe", labels, good_files, float(cols.get("t.pipe", 0.0)), spec.num_classes)
        model_row = rows[backends.index(deploy_on)]
        delta = (d["top1"] - model_row["top1"]) if d["top1"] is not None else None
        pipe = {"name": deploy_on.name, "preprocessing": "deploy (OpenCV) vs reference (PIL)", "gated": False, **d,
                "top1_change_from_preprocessing": delta,
                "top5_change_from_preprocessing": (d["top5"] - model_row["top5"]) if delta is not None else None}

    env = environment()
    ref_seconds = float(cols.get("t.ref", 0.0))
    if cached:
        ref_info = {"source": "cache", "cache": str(cached.folder), "computed": cached.meta.get("created"),
                    "device": cached.meta.get("device"), "machine": cached.meta.get("machine"),
                    "torch": cached.meta.get("torch"), "images_per_s": cached.meta.get("images_per_s"),
                    "read_seconds": round(ref_seconds, 3)}
    else:
        ref_info = {"source": f"computed on {device}", "cache": None, "device": device,
                    "images_per_s": decoded / ref_seconds if ref_seconds else None}
        if writer:
            try:
                entry = writer.commit({i: str(cols["why"][i]) for i in np.flatnonzero(~ok)},
                                      {"device": device, "machine": env["machine"]["cpu"], "torch": torch.__version__,
                                       "images_per_s": ref_info["images_per_s"]})
                ref_info["cache"] = str(entry.folder)
                entry.close()
                notes.append(f"PyTorch reference logits cached in {entry.folder}: the next verify of these weights "
                             "on these images skips PyTorch (--no-reference-cache: do not)")
            except (OSError, ValueError) as e:
                writer.discard()
                notes.append(f"the reference logits could not be cached ({e})")
    journal.finish()

    wall = float(cols.get("t.wall", 0.0))
    n = len(ds.items)
    rate = ref_info["images_per_s"]
    with_cache = (wall - (0.0 if cached else ref_seconds)) / n * FULL_VALIDATION
    without_cache = with_cache + FULL_VALIDATION / rate if rate else None
    return VerifyReport(
        model={"name": loaded.name, "let": loaded.let, "pretrained": loaded.pretrained,
               "checkpoint_sha256": loaded.checkpoint_sha256, "weights": loaded.source},
        dataset={**ds.summary(), "images_in_folder": len(full.items), "limit": cfg.limit,
                 "decoded": decoded, "skipped": len(skipped)},
        reference={"name": "pytorch", **accuracy(good, "ref", labels), **ref_info,
                   "inference_seconds": round(ref_seconds, 3) if not cached else 0.0},
        backends=rows, pipeline=pipe, skipped=skipped,
        run={"seconds": round(wall, 3), "images_per_s": n / wall if wall else None,
             "waiting_for_images_seconds": round(float(cols.get("t.wait", 0.0)), 3), "batch": cfg.batch,
             "workers": workers, "threads": threads, "pipelines": list(pipelines),
             "resumed_images": journal.resumed_images, "peak_rss_mib": round(_peak_rss_mib(), 1),
             "projected_seconds_for_50000_images": {"with_cached_reference": round(with_cache, 1),
                                                   "computing_the_reference": round(without_cache, 1) if without_cache else None}},
        thresholds=asdict(cfg.thresholds), notes=notes, environment=env,
    )
