"""`scarlet calibrate`: float ONNX + images -> Q/DQ INT8 ONNX, manifest, cache, report."""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scarlet_deploy.calib import cache as cache_mod
from scarlet_deploy.calib import evaluate, images, qdq, search
from scarlet_deploy.calib import ranges as ranges_mod
from scarlet_deploy.calib import stats as stats_mod
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.onnx_io import check_classifier


@dataclass(frozen=True)
class CalibConfig:
    onnx: Path
    images: Path
    output: Path
    num_images: int = 512
    method: str = "auto"  # or one of ranges.METHODS
    target: str = "ort"
    eval_dir: Path | None = None
    num_eval: int | None = None
    max_top1_drop: float | None = None
    min_agreement: float | None = None
    cache: Path | None = None
    seed: int = 0
    model: str | None = None
    report: str | None = None  # PREFIX: PREFIX.json + PREFIX.md
    compare_methods: bool = True
    sensitivity_images: int = 32
    bench_rounds: int = 0
    threads: int | None = None
    refresh_stale_cache: bool = False  # make calib: a cache from an older export is recomputed, not refused


@dataclass
class Bench:
    """What every target and method share for one float model and one image split."""

    model: str
    onnx: Path
    onnx_sha256: str
    split: images.ImageSplit
    x_calib: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray | None
    ref_eval: np.ndarray
    ref_probe: np.ndarray
    fp32: evaluate.Accuracy
    threads: int | None = None
    _stats: dict | None = None

    def stats(self) -> dict[str, stats_mod.TensorStats]:
        if self._stats is None:
            self._stats = stats_mod.collect(self.onnx, self.x_calib, threads=self.threads)
        return self._stats


@dataclass
class CalibResult:
    output: Path
    target: str
    method: str
    ranges_from: str  # "calibration" or the cache path
    int8: evaluate.Accuracy | None
    search: search.SearchResult | None
    sensitivity: list[search.Sensitivity] = field(default_factory=list)
    methods: dict[str, Any] = field(default_factory=dict)
    throughput: dict[str, float] | None = None
    trt_table: Path | None = None
    manifest: dict[str, Any] = field(default_factory=dict)


def model_name(onnx_path: Path, explicit: str | None) -> str:
    from scarlet_deploy.export.registry import get_spec
    from scarlet_deploy.runtime.core.artifacts import read_manifest

    man = read_manifest(onnx_path) or {}
    name = explicit or man.get("model")
    if not name:
        raise ScarletError(f"{onnx_path} has no manifest naming its model, so its preprocessing is unknown; "
                           f"pass --model (one of the registry names) or export it with `scarlet export`.")
    if explicit and man.get("model") and man["model"] != explicit:
        raise ScarletError(f"--model {explicit} contradicts {onnx_path}'s manifest (model {man['model']}); drop --model.")
    get_spec(name)
    return name


def prepare(onnx_path: Path, images_dir: Path, num_images: int, seed: int = 0, eval_dir: Path | None = None,
            num_eval: int | None = None, model: str | None = None, sensitivity_images: int = 32,
            threads: int | None = None) -> Bench:
    from scarlet_deploy.export.registry import get_spec
    from scarlet_deploy.runtime.core.artifacts import sha256_file

    if not Path(onnx_path).is_file():
        raise ScarletError(f"ONNX model {onnx_path} does not exist; create it with `scarlet export` (or `make export`).")
    name = model_name(Path(onnx_path), model)
    pre = get_spec(name).preprocess
    check_classifier(onnx_path, pre.crop, get_spec(name).num_classes, name)
    split = images.split_images(images_dir, num_images, seed, eval_dir, num_eval)
    split, x_calib, x_eval = images.load_split(split, pre)
    y = np.array(split.eval_labels, dtype=np.int64)
    y_eval = y if len(y) and np.all(y >= 0) else None
    ref_eval = evaluate.logits(onnx_path, x_eval, threads=threads) if len(x_eval) else np.zeros((0, 1000), np.float32)
    probe = x_calib[:sensitivity_images]
    ref_probe = evaluate.logits(onnx_path, probe, threads=threads)
    fp32 = evaluate.accuracy(ref_eval, y_eval)
    return Bench(name, Path(onnx_path), sha256_file(onnx_path), split, x_calib, x_eval, y_eval,
                 ref_eval, ref_probe, fp32, threads)


AUTO = "auto"


@dataclass(frozen=True)
class RangeChoice:
    ranges: dict[str, tuple[float, float]]
    source: str  # "calibration" or the cache path
    method: str  # the method the ranges came from (what `auto` chose)
    how: str  # why this method
    methods: dict[str, Any]  # every method fully quantised, when they were compared


def choose_method(methods: dict[str, dict], fp32_top1: float | None, max_top1_drop: float | None,
                  min_agreement: float | None) -> tuple[str, str]:
    """`--method auto`: the method whose fully quantised model meets the budget with the lowest
    logits error, so that as few layers as possible stay float (Lite0: minmax meets the default
    budget with every layer INT8, percentile needs two float layers and runs 1.28x FP32); when
    none meets it, the lowest logits error, from which the mixed-precision search starts."""
    acc = {m: evaluate.Accuracy(**a) for m, a in methods.items()}
    ok = [m for m, a in acc.items() if search.within_budget(a, fp32_top1, max_top1_drop, min_agreement)]
    best = min(ok or list(acc), key=lambda m: acc[m].logits_rmse if acc[m].logits_rmse is not None else float("inf"))
    return best, ("auto: fully INT8 within the budget, lowest logits error" if ok
                  else "auto: none within the budget fully INT8; lowest logits error")


def _ranges(bench: Bench, target: qdq.Target, cfg: CalibConfig) -> RangeChoice:
    prov = cache_mod.Provenance(bench.model, bench.onnx_sha256, cfg.method, target.name, cfg.seed,
                                tuple(images.relative_names(bench.split.calib)))
    if cfg.cache is not None and Path(cfg.cache).exists():
        try:
            r = cache_mod.load(cfg.cache, prov, stats_mod.activation_names(bench.onnx))
            if cfg.method != AUTO:
                return RangeChoice(r, str(cfg.cache), cfg.method, "given", {})
            return RangeChoice(r, str(cfg.cache), cache_mod.resolved_method(cfg.cache) or AUTO, "auto (from the cache)", {})
        except ScarletError as e:
            if not cfg.refresh_stale_cache:
                raise
            print(f"note: {e} Recalibrating and replacing it.")
    method, how, methods, candidates = cfg.method, "given", {}, {}
    if method == AUTO:
        if len(bench.x_eval):
            candidates = method_ranges(bench, target, {})
            methods = compare_methods(bench, target, candidates)
            method, how = choose_method(methods, bench.fp32.top1, cfg.max_top1_drop, cfg.min_agreement)
        else:
            method, how = "percentile", "auto: no evaluation images to compare methods on; percentile"
    r = candidates.get(method) or ranges_mod.compute_ranges(bench.stats(), method, target.symmetric)
    cache_mod.check_ranges(r, None, f"the activation statistics of {bench.onnx} on the calibration images",
                           "the float model computes NaN or Inf; re-export it from a good checkpoint")
    if cfg.cache is not None:
        cache_mod.save(cfg.cache, prov, r, method if cfg.method == AUTO else None)
    return RangeChoice(r, "calibration", method, how, methods)


def _evaluate(bench: Bench, path: Path, target: qdq.Target) -> evaluate.Accuracy:
    out = evaluate.logits(path, bench.x_eval, threads=bench.threads, fake_quant=target.fake_quant_eval)
    return evaluate.accuracy(out, bench.y_eval, bench.ref_eval)


def calibrate_target(bench: Bench, cfg: CalibConfig) -> CalibResult:
    """Ranges (cache or statistics), the mixed-precision search, the final Q/DQ model and its manifest."""
    from scarlet_deploy.runtime.core.artifacts import atomic_path, sha256_file, tool_versions, write_manifest

    target = qdq.get_target(cfg.target)
    budget = cfg.max_top1_drop is not None or cfg.min_agreement is not None
    if budget and not len(bench.x_eval):
        raise ScarletError("an accuracy budget needs evaluation images, but every image went to calibration; "
                           "lower --num-images or pass --eval-dir with other images.")
    if budget and cfg.max_top1_drop is not None and bench.y_eval is None:
        raise ScarletError("--max-top1-drop needs labelled evaluation images (<wnid>/ folders, or flat ILSVRC2012_val_*.JPEG "
                           "with LOC_val_solution.csv); use --min-agreement instead.")
    choice = _ranges(bench, target, cfg)
    rng, source = choice.ranges, choice.source

    sens: list[search.Sensitivity] = []
    with tempfile.TemporaryDirectory(prefix="scarlet-calib-") as d:
        trial = Path(d) / "trial.onnx"

        groups = qdq.layers(bench.onnx, target)

        def with_activations(names: list[str]) -> list[str]:
            return [n for name in names for n in groups[name]]

        def build_and_eval(exclude: list[str]) -> evaluate.Accuracy:
            qdq.quantize(bench.onnx, rng, target, trial, nodes_to_exclude=with_activations(exclude))
            return _evaluate(bench, trial, target) if len(bench.x_eval) else evaluate.Accuracy(0, None, None)

        def ranked() -> list[str]:
            sens.extend(search.sensitivities(bench.onnx, rng, target, bench.x_calib[:len(bench.ref_probe)],
                                             bench.ref_probe, threads=bench.threads))
            return [s.node for s in sens]

        found = search.mixed_precision(ranked, build_and_eval, bench.fp32.top1, cfg.max_top1_drop, cfg.min_agreement,
                                       costs=search.layer_costs(bench.onnx, groups))
        final = found.kept.accuracy if len(bench.x_eval) and found.kept else None
        with atomic_path(cfg.output) as tmp:
            qdq.quantize(bench.onnx, rng, target, tmp, nodes_to_exclude=with_activations(found.nodes_to_exclude))

    res = CalibResult(Path(cfg.output), target.name, choice.method, source, final, found if budget else None, sens,
                      choice.methods)
    if target.name == "trt":
        res.trt_table = trt_table_path(cfg.output)
        cache_mod.write_trt_table(res.trt_table, rng, choice.method)
    if not res.methods and cfg.compare_methods and source == "calibration" and len(bench.x_eval):
        res.methods = compare_methods(bench, target, method_ranges(bench, target, {choice.method: rng}))
    if cfg.bench_rounds:
        res.throughput = evaluate.side_by_side_throughput({"fp32": bench.onnx, "int8": cfg.output},
                                                          rounds=cfg.bench_rounds, threads=bench.threads)
    res.manifest = {
        "model": bench.model,
        "precision": "int8",
        "target": target.name,
        "format": "onnx-qdq",
        "source_onnx": str(bench.onnx),
        "source_onnx_sha256": bench.onnx_sha256,
        "sha256": sha256_file(cfg.output),
        "method": choice.method,
        "method_choice": choice.how,
        "ranges_from": source,
        "quantization": {"activations": target.activation_type, "weights": f"{target.weight_type} per-channel",
                         "symmetric_activations": target.symmetric, "reduce_range": target.reduce_range,
                         "gemm_input_bits": target.gemm_input_bits,
                         "accuracy_measured_with": "fake-quant (Q/DQ in float)" if target.fake_quant_eval
                         else "onnxruntime CPU integer kernels"},
        "calibration_images": {"count": len(bench.split.calib), "seed": cfg.seed, "dir": str(cfg.images)},
        "evaluation_images": {"count": len(bench.split.eval), "disjoint_from_calibration": True},
        "nodes_kept_float": found.nodes_to_exclude,
        "budget": {"max_top1_drop": cfg.max_top1_drop, "min_agreement": cfg.min_agreement,
                   "met": found.met if budget else None},
        "accuracy": {"fp32": bench.fp32.as_dict(), "int8": final.as_dict() if final else None},
        "trt_calibration_table": str(res.trt_table) if res.trt_table else None,
        "versions": tool_versions(),
    }
    write_manifest(cfg.output, res.manifest)
    return res


def trt_table_path(output: Path) -> Path:
    out = str(output)
    return Path((out[:-5] if out.endswith(".onnx") else out) + ".calib.cache")


def method_ranges(bench: Bench, target: qdq.Target, known: dict[str, dict]) -> dict[str, dict]:
    """Every method's ranges from the same statistics (those in `known` are not recomputed)."""
    return {m: known.get(m) or ranges_mod.compute_ranges(bench.stats(), m, target.symmetric) for m in ranges_mod.METHODS}


def compare_methods(bench: Bench, target: qdq.Target, ranges_by_method: dict[str, dict]) -> dict[str, Any]:
    """Each method's ranges with every layer quantised (none kept in float), evaluated."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="scarlet-methods-") as d:
        for m, rng in ranges_by_method.items():
            path = Path(d) / f"{m}.onnx"
            qdq.quantize(bench.onnx, rng, target, path)
            out[m] = _evaluate(bench, path, target).as_dict()
    return out


def _check_cache_first(cfg: CalibConfig) -> None:
    """Refuse a stale cache before minutes of image loading and inference, not after."""
    from scarlet_deploy.runtime.core.artifacts import sha256_file

    if cfg.cache is None or not Path(cfg.cache).exists() or cfg.refresh_stale_cache or not Path(cfg.onnx).is_file():
        return
    split = images.split_images(cfg.images, cfg.num_images, cfg.seed, cfg.eval_dir, cfg.num_eval)
    cache_mod.load(cfg.cache, cache_mod.Provenance(
        model_name(Path(cfg.onnx), cfg.model), sha256_file(cfg.onnx), cfg.method, qdq.get_target(cfg.target).name,
        cfg.seed, tuple(images.relative_names(split.calib))))


def calibrate(cfg: CalibConfig) -> tuple[Bench, CalibResult]:
    _check_cache_first(cfg)
    bench = prepare(cfg.onnx, cfg.images, cfg.num_images, cfg.seed, cfg.eval_dir, cfg.num_eval, cfg.model,
                    cfg.sensitivity_images, cfg.threads)
    res = calibrate_target(bench, cfg)
    if cfg.report:
        write_report(cfg.report, bench, [res])
    return bench, res


# ---- report -------------------------------------------------------------------------------------

def report_data(bench: Bench, results: list[CalibResult]) -> dict[str, Any]:
    from scarlet_deploy.runtime.core.report import environment

    return {
        "model": bench.model,
        "source_onnx": str(bench.onnx),
        "source_onnx_sha256": bench.onnx_sha256,
        "calibration_images": images.relative_names(bench.split.calib),
        "evaluation_images": images.relative_names(bench.split.eval),
        "fp32": bench.fp32.as_dict(),
        "targets": [{
            "target": r.target, "output": str(r.output), "method": r.method, "ranges_from": r.ranges_from,
            "method_choice": r.manifest.get("method_choice"),
            "int8": r.int8.as_dict() if r.int8 else None,
            "nodes_kept_float": r.manifest.get("nodes_kept_float", []),
            "budget": r.manifest.get("budget"),
            "measured_with": r.manifest["quantization"]["accuracy_measured_with"],
            "search_steps": [{"kept_float": s.kept_float, **s.accuracy.as_dict(), "within_budget": s.within_budget,
                              "quantised_back": s.quantised_back}
                             for s in (r.search.steps if r.search else [])],
            "sensitivity": [asdict(s) for s in r.sensitivity],
            "methods": r.methods,
            "throughput_img_s": r.throughput,
            "size_bytes": {"fp32": os.path.getsize(bench.onnx), "int8": os.path.getsize(r.output)},
            "trt_calibration_table": str(r.trt_table) if r.trt_table else None,
        } for r in results],
        "environment": environment(),
    }


def report_markdown(data: dict[str, Any]) -> str:
    from scarlet_deploy.runtime.core.report import fmt, markdown_table

    acc_cols = ["images", "top1 %", "top5 %", "agreement %", "logits rel. RMSE"]

    def acc_row(label: str, a: dict | None) -> list:
        a = a or {}
        return [label, a.get("images"), a.get("top1"), a.get("top5"), a.get("agreement"), a.get("logits_rmse")]

    md = [f"# INT8 calibration: {data['model']}\n",
          f"Source `{data['source_onnx']}` (sha256 {data['source_onnx_sha256'][:12]}...). "
          f"{len(data['calibration_images'])} calibration images, {len(data['evaluation_images'])} evaluation images, "
          f"disjoint (lists in the JSON report). {data['environment']['date']}, {data['environment']['machine']['cpu']}.\n"]
    for t in data["targets"]:
        md.append(f"\n## Target `{t['target']}`: {t['output']}\n")
        md.append(f"Method **{t['method']}** ({t.get('method_choice') or 'given'}; ranges from {t['ranges_from']}); "
                  f"budget {t['budget']}; "
                  f"INT8 accuracy measured with {t['measured_with']}. "
                  f"Size {fmt(t['size_bytes']['fp32'] / 1e6)} MB FP32 -> {fmt(t['size_bytes']['int8'] / 1e6)} MB INT8.\n\n")
        md.append(markdown_table(["model"] + acc_cols, [acc_row("fp32", data["fp32"]), acc_row("int8", t["int8"])]))
        if t["throughput_img_s"]:
            tp = t["throughput_img_s"]
            md.append(f"\nThroughput, batch 8, interleaved on this CPU: FP32 {fmt(tp['fp32'])} img/s, "
                      f"INT8 {fmt(tp['int8'])} img/s ({fmt(tp['int8'] / tp['fp32'])}x).\n")
        if t["search_steps"]:
            md.append("\n### Mixed-precision search\n\n")
            md.append(markdown_table(["layers kept in float", "tried back in INT8"] + acc_cols[1:] + ["within budget"],
                                     [[s["kept_float"], s.get("quantised_back") or "", s["top1"], s["top5"],
                                       s["agreement"], s["logits_rmse"], s["within_budget"]] for s in t["search_steps"]]))
            sens = {s["node"]: s for s in t["sensitivity"]}
            md.append("\nKept in float, most sensitive first (the shortest passing prefix of the ranking, then its "
                      "costliest layers tried back in INT8; numbers: output error with only that layer quantised):\n\n")
            md.append(markdown_table(["layer", "op", "logits rel. RMSE", "agreement %"],
                                     [[n, sens[n]["op_type"], sens[n]["logits_rmse"], sens[n]["agreement"]]
                                      for n in t["nodes_kept_float"]]) if t["nodes_kept_float"] else "none\n")
        if t["sensitivity"]:
            md.append("\n### Per-layer sensitivity (each layer quantised alone)\n\n")
            md.append(markdown_table(["layer", "op", "logits rel. RMSE", "agreement %"],
                                     [[s["node"], s["op_type"], s["logits_rmse"], s["agreement"]] for s in t["sensitivity"]]))
        if t["methods"]:
            md.append("\n### Methods compared (same statistics, every layer quantised)\n\n")
            md.append(markdown_table(["method"] + acc_cols, [acc_row(m, a) for m, a in t["methods"].items()]))
    return "".join(md)


def write_report(prefix: str, bench: Bench, results: list[CalibResult]) -> dict[str, Any]:
    from scarlet_deploy.runtime.core.report import write_reports

    data = report_data(bench, results)
    write_reports(data, report_markdown(data), f"{prefix}.json", f"{prefix}.md")
    return data
