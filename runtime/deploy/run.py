"""`scarlet deploy`: from a checkpoint to the fastest artifact that is still the model on this machine.

Steps: probe which candidates this machine runs; export the FP32 ONNX; split the images into
calibration, selection and verification sets (disjoint); build each candidate's artifact through
the library (reused when its inputs and settings are unchanged); verify each against PyTorch on
the verification images; time them interleaved in one run at the objective; choose; write the
report; write the package in a temporary folder, check it, and rename it into place.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.deploy import build, candidates, decide, gates, golden
from scarlet_deploy.runtime.deploy.candidates import Candidate

OBJECTIVES = ("throughput", "latency")


@dataclass
class DeployConfig:
    model: str
    output: Path
    checkpoint: Path | None = None
    let: bool = False
    images: Path | None = None  # default: the shared ImageNet sample
    objective: str = "throughput"
    batch: int = 8  # the throughput objective's batch; latency is batch 1
    gates: gates.Gates = field(default_factory=gates.Gates)
    backends: list[str] | None = None  # None: every candidate
    work_dir: Path = Path("build/deploy")  # reusable artifacts
    report: Path | None = None  # PREFIX: PREFIX.json, PREFIX.md, PREFIX.png (written pass or fail)
    golden: int = 32
    num_calib: int = 128
    num_select: int = 100
    min_verify: int = 100  # fewer verification images give intervals too wide to gate on
    max_verify: int = 1000  # sampled across classes: a full ImageNet val folder would take hours per candidate
    seed: int = 0
    threads: int | None = None
    repeats: int = 5
    seconds: float = 0.5  # per backend and round: 8 backends x 5 rounds keep a rerun within a minute

    def __post_init__(self) -> None:
        from scarlet_deploy.export.registry import get_spec

        get_spec(self.model)
        self.output, self.work_dir = Path(self.output), Path(self.work_dir)
        if self.objective not in OBJECTIVES:
            raise ScarletError(f"--objective {self.objective!r}: choose throughput (img/s at --batch) or latency (batch 1).")
        for name in ("batch", "golden", "num_calib", "num_select", "min_verify", "max_verify", "repeats"):
            if getattr(self, name) < 1:
                raise ScarletError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)}).")
        if self.max_verify < max(self.min_verify, self.golden):
            raise ScarletError(f"--max-verify {self.max_verify} is below --min-verify {self.min_verify} or --golden "
                               f"{self.golden}; raise it.")
        if not self.seconds > 0:
            raise ScarletError("--seconds must be positive.")
        candidates.select(self.backends)  # an unknown name is refused before any work


@dataclass
class Row:
    candidate: Candidate
    status: str = "pending"  # unavailable | error | failed | passed
    why: str = ""
    artifact: Path | None = None
    reused: bool | None = None
    verification: gates.Verification | None = None
    speed: dict[str, Any] | None = None
    decision: str = ""

    def as_dict(self) -> dict[str, Any]:
        c = self.candidate
        return {"backend": c.name, "precision": c.precision, "runtime": c.runtime, "summary": c.summary,
                "status": self.status, "why": self.why, "artifact": str(self.artifact) if self.artifact else None,
                "reused": self.reused, "verification": self.verification.as_dict() if self.verification else None,
                "speed": self.speed, "decision": self.decision}


@dataclass
class DeployResult:
    chosen: str | None
    rows: list[Row]
    data: dict[str, Any]
    package: Path | None
    seconds: float


def _say(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies under it."""
    a, b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return a == b or b in a.parents


def is_package(path: Path) -> bool:
    from scarlet_deploy.runtime.deploy.check import DEPLOY_JSON, SUMS

    return (path / SUMS).is_file() and (path / DEPLOY_JSON).is_file()


def check_paths(cfg: DeployConfig, images: Path) -> None:
    """Refuse, before any work, an output that would overwrite or swallow an input."""
    out = cfg.output
    inputs = [("--images", images), ("--checkpoint", cfg.checkpoint), ("--work-dir", cfg.work_dir)]
    for flag, p in inputs:
        if p is None:
            continue
        if _inside(out, p) and flag != "--work-dir":
            raise ScarletError(f"-o {out} lies inside {flag} {p}: the package must not be written into an input. "
                               "Pass an output folder elsewhere (e.g. -o deploy/MODEL).")
        if _inside(p, out):
            raise ScarletError(f"{flag} {p} lies inside -o {out}, which deploy replaces when it finishes: pass an "
                               "output folder that holds none of the inputs.")
    if out.exists() and not (out.is_dir() and is_package(out)):
        raise ScarletError(f"-o {out} exists and is not a package written by `scarlet deploy`; deploy replaces only its "
                           "own packages. Remove it or pass another output folder.")
    parent = Path(os.path.realpath(out)).parent
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ScarletError(f"-o {out} cannot be created: {probe} is not a writable folder. Pass an output folder you can write.")


def _split(cfg: DeployConfig, images: Path):
    from scarlet_deploy.calib import images as calib_images

    need = cfg.num_calib + cfg.num_select + max(cfg.min_verify, cfg.golden)
    have = _count(images)
    if have < need:
        raise ScarletError(f"{images} holds {have} images; deploy needs at least {need}: {cfg.num_calib} to "
                           f"calibrate, {cfg.num_select} to select with and {max(cfg.min_verify, cfg.golden)} to verify "
                           "on, three disjoint sets. Pass --images with more images, or lower --num-calib/--num-select.")
    split = calib_images.split_images(images, cfg.num_calib, cfg.seed, None, cfg.max_verify, cfg.num_select)
    split = calib_images.readable(split)
    if len(split.eval) < max(cfg.min_verify, cfg.golden):
        raise ScarletError(f"only {len(split.eval)} verification images of {images} are readable; deploy needs "
                           f"{max(cfg.min_verify, cfg.golden)}. Pass --images with more readable images.")
    return split


def _count(images: Path) -> int:
    from scarlet_deploy.calib.images import _images

    return len(_images(images))


def _resolve_images(cfg: DeployConfig) -> Path:
    from scarlet_deploy.runtime.data.images import default_val_dir

    images = cfg.images or default_val_dir()
    if images is None:
        raise ScarletError("no images: the shared ImageNet sample is not beside this checkout; pass --images DIR "
                           "(ImageNet-style <wnid>/*.JPEG folders; labels make top-1 gates possible) or set $SCARLET_VAL_DIR.")
    if not Path(images).is_dir():
        raise ScarletError(f"--images {images} is not a folder; pass a folder of <wnid>/*.JPEG images.")
    return Path(images)


def deploy(cfg: DeployConfig) -> DeployResult:
    """Everything `scarlet deploy` does; raises ScarletError for bad input, returns chosen=None when nothing passes."""
    from tqdm import tqdm

    from scarlet_deploy.export.checkpoint import load_model
    from scarlet_deploy.export.registry import get_spec
    from scarlet_deploy.runtime.data.preprocess import decode_rgb, reference_pixels
    from scarlet_deploy.runtime.runners.registry import open_runner

    t0 = time.perf_counter()
    images = _resolve_images(cfg)
    check_paths(cfg, images)
    rows = [Row(c) for c in candidates.select(cfg.backends)]
    for r in rows:
        why = candidates.unavailable(r.candidate)
        if why:
            r.status, r.why = "unavailable", f"not available here: {why}"
    split = _split(cfg, images)  # before minutes of export: too few images is one sentence now

    _say(f"deploy {cfg.model}: loading the model ({'checkpoint ' + str(cfg.checkpoint) if cfg.checkpoint else 'default weights'})")
    loaded = load_model(cfg.model, cfg.let, str(cfg.checkpoint) if cfg.checkpoint else None, cfg.seed)
    trained = loaded.pretrained
    pre = get_spec(cfg.model).preprocess
    work = cfg.work_dir / build.stem(cfg.model, cfg.let)
    work.mkdir(parents=True, exist_ok=True)
    fp32, reused = build.export_fp32(loaded, work)
    _say(f"FP32 ONNX {fp32} ({'reused' if reused else 'exported'})")

    labels = np.array(split.eval_labels, np.int64)
    labels = labels if len(labels) and (labels >= 0).all() else None
    x = np.empty((len(split.eval), 3, pre.crop, pre.crop), np.float32)
    pixels = []  # decoded pixels of the golden images only: a thousand decoded photos would be ~0.5 GB
    for i, f in enumerate(tqdm(split.eval, desc="reading verification images", unit="img", leave=False)):
        rgb = decode_rgb(f)
        x[i] = reference_pixels(rgb, pre)
        if i < cfg.golden:
            pixels.append(rgb)
    torch_runner = open_runner("torch", module=loaded.model, threads=cfg.threads).load()  # reference, then timed
    ref = golden.batches(torch_runner, x, cfg.batch)

    _build_all(cfg, rows, loaded, fp32, images, trained)
    runners = _verify_all(cfg, rows, x, ref, labels, trained)
    try:
        torch_speed = _time_all(cfg, rows, runners, torch_runner)
        contenders = [decide.Contender(r.candidate.name, r.candidate.precision, i, r.status == "passed",
                                       r.speed["rounds"] if r.speed else [])
                      for i, r in enumerate(rows) if r.status in ("passed", "failed")]
        decision = decide.choose(contenders)
        for r in rows:
            # a failed candidate's verdict is the gate it failed, with its figures
            r.decision = f"failed: {r.why}" if r.status == "failed" else decision.why.get(r.candidate.name, r.why)
        chosen = next((r for r in rows if r.candidate.name == decision.chosen), None)
        deploy_logits = None
        if chosen is not None:
            deploy_logits = golden.batches(runners[chosen.candidate.name], x[:cfg.golden], cfg.batch)
    finally:
        for r in [*runners.values(), torch_runner]:
            r.close()

    from scarlet_deploy.runtime.deploy import report as report_mod

    data = report_mod.data(cfg, rows, decision, images, split, loaded, fp32, torch_speed, trained, t0)
    if cfg.report:
        report_mod.write(cfg.report, data)
    if chosen is None:
        return DeployResult(None, rows, data, None, time.perf_counter() - t0)

    thresholds = {"backend": chosen.candidate.name, "precision": chosen.candidate.precision, "batch": cfg.batch,
                  "drift_max_rel": golden.DRIFT_BOUND[chosen.candidate.precision],
                  "min_agreement": _golden_gate(cfg, ref[:cfg.golden], deploy_logits)}
    from scarlet_deploy.runtime.deploy import package

    pkg = package.write(cfg, chosen, data, pixels, split, labels, pre, ref[:cfg.golden], deploy_logits,
                        thresholds, fp32)
    data["seconds"] = round(time.perf_counter() - t0, 1)
    return DeployResult(chosen.candidate.name, rows, data, pkg, time.perf_counter() - t0)


def _golden_gate(cfg: DeployConfig, ref: np.ndarray, out: np.ndarray) -> float:
    """The golden images' agreement gate: the deploy gate, lowered to what the chosen artifact scored on
    them at deploy time (on 32 images one flip is 3 points; the verification set judged the model)."""
    here = 100.0 * float((out.argmax(1) == ref.argmax(1)).mean())
    return min(cfg.gates.min_agreement, here)


def _build_all(cfg: DeployConfig, rows: list[Row], loaded, fp32: Path, images: Path, trained: bool) -> None:
    """Each available candidate's artifact; a failure is that candidate's verdict, not the deploy's."""
    need_int8 = {r.candidate.artifact.removeprefix("int8-") for r in rows
                 if r.status == "pending" and r.candidate.artifact.startswith("int8-")}
    if any(r.status == "pending" and r.candidate.artifact == "plan-int8" for r in rows):
        need_int8.add("trt")  # TensorRT builds its INT8 plan from the trt-target Q/DQ ONNX
    settings = {t: build.Int8Settings(t, cfg.num_calib, cfg.num_select, cfg.seed, str(Path(images).resolve()), trained,
                                      cfg.gates.max_top1_drop if trained else None,
                                      cfg.gates.min_agreement if trained else None,
                                      prune_search=t != "ov") for t in need_int8}
    built_int8 = {t: build.int8_current(fp32, s) for t, s in settings.items()}
    bench = None
    for r in rows:
        if r.status != "pending":
            continue
        c = r.candidate
        try:
            if c.artifact == "fp32":
                r.artifact, r.reused = fp32, True
            elif c.artifact == "fp16":
                r.artifact, r.reused = build.fp16(fp32, fp32.parent)
            elif c.artifact.startswith("int8-") or c.artifact == "plan-int8":
                t = "trt" if c.artifact == "plan-int8" else c.artifact.removeprefix("int8-")
                if built_int8[t] is None:
                    if bench is None:
                        from scarlet_deploy.calib import pipeline

                        _say("preparing calibration (images and FP32 references)")
                        bench = pipeline.prepare(fp32, images, cfg.num_calib, cfg.seed, None, cfg.max_verify, cfg.model,
                                                 threads=cfg.threads, num_select=cfg.num_select)
                    _say(f"calibrating INT8 for {c.name} ({'accuracy-budget search' if trained else 'seeded weights: no accuracy-budget search'})")
                    built_int8[t] = build.int8(bench, fp32, settings[t])
                    r.reused = False
                else:
                    r.reused = True
                r.artifact = built_int8[t]
                if c.artifact == "plan-int8":
                    r.artifact, r.reused = build.trt_plan(fp32, "int8", cfg.batch, built_int8[t])
            elif c.artifact == "plan-fp16":
                r.artifact, r.reused = build.trt_plan(fp32, "fp16", cfg.batch)
            else:
                raise ScarletError(f"no builder for {c.artifact}")
        except ScarletError as e:
            r.status, r.why = "error", f"could not be built: {e}"


def _verify_all(cfg: DeployConfig, rows: list[Row], x: np.ndarray, ref: np.ndarray, labels, trained: bool) -> dict[str, Any]:
    from tqdm import tqdm

    from scarlet_deploy.runtime.runners.registry import open_runner

    runners: dict[str, Any] = {}
    todo = [r for r in rows if r.status == "pending"]
    for r in tqdm(todo, desc="verifying candidates against PyTorch", unit="candidate", leave=False):
        try:
            runner = open_runner(r.candidate.name, r.artifact, threads=cfg.threads).load()
            out = golden.batches(runner, x, cfg.batch)
        except ScarletError as e:
            r.status, r.why = "error", f"could not run: {e}"
            continue
        r.verification = gates.verify(ref, out, labels, r.candidate.precision, cfg.gates, trained)
        r.status = "passed" if r.verification.passed else "failed"
        r.why = "; ".join(r.verification.failed)
        if r.verification.nonfinite:
            runner.close()  # nothing to time: it computes garbage
        else:
            runners[r.candidate.name] = runner
    return runners


def _time_all(cfg: DeployConfig, rows: list[Row], runners: dict[str, Any], torch_runner) -> dict[str, Any]:
    """Every runnable candidate and PyTorch eager, interleaved in one run at the objective."""
    from tqdm import tqdm

    from scarlet_deploy.runtime.measure import measure_interleaved, throughput_timer, wall_timer

    batch = cfg.batch if cfg.objective == "throughput" else 1
    xb = np.random.default_rng(cfg.seed).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    # throughput: each runtime's throughput mode (OpenVINO's streams and request queue, onnxruntime's
    # sessions per stream), as the package is served; latency: one request at a time
    timer = throughput_timer if cfg.objective == "throughput" else wall_timer
    calls = {name: timer(r, xb) for name, r in runners.items()}
    calls["torch"] = wall_timer(torch_runner, xb)
    with tqdm(total=cfg.repeats * len(calls), desc=f"timing {len(calls)} backends ({cfg.objective}, batch {batch})",
              unit="round", leave=False) as bar:
        times = measure_interleaved(calls, cfg.repeats, cfg.seconds, progress=bar)
    for r in rows:
        if r.candidate.name in times:
            r.speed = _speed(times[r.candidate.name], batch, cfg.objective)
            r.speed["streams"] = runners[r.candidate.name].streams(batch) if cfg.objective == "throughput" else 1
    torch_speed = _speed(times["torch"], batch, cfg.objective)
    for r in rows:
        if r.speed:
            r.speed["vs_pytorch"] = _paired(r.speed["rounds"], torch_speed["rounds"])
    rows_by = {r.candidate.name: r for r in rows}
    if "ort" in rows_by and rows_by["ort"].speed:
        for r in rows:
            if r.speed:
                r.speed["vs_ort_fp32"] = _paired(r.speed["rounds"], rows_by["ort"].speed["rounds"])
    return torch_speed


def _paired(a: list[float], b: list[float]) -> dict[str, float]:
    r = np.asarray(a) / np.asarray(b)
    return {"median": float(np.median(r)), "low": float(r.min()), "high": float(r.max())}


def _speed(rounds: list[list[float]], batch: int, objective: str) -> dict[str, Any]:
    from scarlet_deploy.runtime.measure import CellStats

    s = CellStats.from_rounds(rounds, batch)
    # higher is better for the decision: images/s per round, or 1/median latency per round
    per_round = s.throughput_rounds if objective == "throughput" else [1.0 / float(np.median(r)) for r in rounds]
    # in throughput mode the per-call figures are per-batch averages, not latencies: p50/p99 only for latency
    lat = objective == "latency"
    return {"batch": batch, "img_s": s.throughput, "p50_ms": s.p50_ms if lat else None,
            "p90_ms": s.p90_ms if lat else None, "p99_ms": s.p99_ms if lat else None,
            "spread_pct": s.spread_pct, "calls": s.calls, "rounds": per_round}
