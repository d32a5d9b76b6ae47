"""`scarlet calibrate`: float ONNX + images -> Q/DQ INT8 ONNX, manifest, cache, report."""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scarlet_deploy.calib import baseline as baseline_mod
from scarlet_deploy.calib import bias as bias_mod
from scarlet_deploy.calib import cache as cache_mod
from scarlet_deploy.calib import evaluate, images, layer_error, qdq, search
from scarlet_deploy.calib import ranges as ranges_mod
from scarlet_deploy.calib import stats as stats_mod
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.onnx_io import check_classifier


@dataclass(frozen=True)
class CalibConfig:
    onnx: Path
    images: Path
    output: Path
    num_images: int = 128
    num_select: int = 100  # selection images: every decision is taken on them, none on the report set
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
    bias_correction: str = "auto"  # auto (kept where it lowers the selection KL) | off | one of bias.SCOPES
    bias_images: int = 64  # calibration images the bias correction averages over
    baseline: bool = True  # plain onnxruntime quantize_static on the same images, in the report
    layer_error_images: int = 16  # selection images for the per-layer error table (0: no table)
    # After the search, try each float layer back in INT8, costliest first: fewer float layers, one model
    # build and evaluation per layer (minutes on OpenVINO). `scarlet deploy` times the result instead.
    prune_search: bool = True


@dataclass
class Bench:
    """What every target and method share for one float model and one image split."""

    model: str
    onnx: Path
    onnx_sha256: str
    split: images.ImageSplit
    x_calib: np.ndarray
    x_eval: np.ndarray  # report images
    y_eval: np.ndarray | None
    ref_eval: np.ndarray
    ref_probe: np.ndarray
    fp32: evaluate.Accuracy  # on the report images
    x_select: np.ndarray = field(default_factory=lambda: np.zeros((0, 3, 224, 224), np.float32))
    y_select: np.ndarray | None = None
    ref_select: np.ndarray = field(default_factory=lambda: np.zeros((0, 1000), np.float32))
    fp32_select: evaluate.Accuracy | None = None
    threads: int | None = None
    _stats: dict | None = None
    _baseline: baseline_mod.Baseline | None = None

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
    selection: evaluate.Accuracy | None = None  # the kept model on the selection images
    bias: dict[str, Any] = field(default_factory=dict)  # what bias correction tried, kept and changed
    layer_errors: list[dict] = field(default_factory=list)
    baseline: dict[str, Any] | None = None


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


def require_float32(onnx_path: Path, model: str) -> None:
    """Calibration quantises an FP32 graph. A Q/DQ model (ours for another target, or anyone's) would be
    quantised twice and fail after every image was loaded and run (22-41 s), naming a temporary file;
    an FP16 one fails inside onnxruntime's calibrator. Both are refused before any work."""
    from scarlet_deploy.runtime.core.artifacts import read_manifest
    from scarlet_deploy.runtime.core.onnx_io import graph_precision

    precision = graph_precision(onnx_path)
    if precision == "fp32":
        return
    what = "already quantised (Q/DQ INT8 operators)" if precision == "int8" else "an FP16 model (float16 weights)"
    manifest = read_manifest(onnx_path) or {}
    source = manifest.get("source_onnx") or manifest.get("source")
    fix = f"pass the FP32 ONNX it was made from ({source})" if source else \
        f"pass the FP32 ONNX (`scarlet export --model {model}` makes it)"
    raise ScarletError(f"{onnx_path} is {what}; calibrate quantises an FP32 ONNX, for any --target. {fix[0].upper() + fix[1:]}.")


def _labels(labels: tuple[int, ...]) -> np.ndarray | None:
    y = np.array(labels, dtype=np.int64)
    return y if len(y) and np.all(y >= 0) else None


def prepare(onnx_path: Path, images_dir: Path, num_images: int, seed: int = 0, eval_dir: Path | None = None,
            num_eval: int | None = None, model: str | None = None, sensitivity_images: int = 32,
            threads: int | None = None, num_select: int = 0) -> Bench:
    from scarlet_deploy.export.registry import get_spec
    from scarlet_deploy.runtime.core.artifacts import sha256_file

    if not Path(onnx_path).is_file():
        raise ScarletError(f"ONNX model {onnx_path} does not exist; create it with `scarlet export` (or `make export`).")
    name = model_name(Path(onnx_path), model)
    require_float32(Path(onnx_path), name)
    pre = get_spec(name).preprocess
    check_classifier(onnx_path, pre.crop, get_spec(name).num_classes, name)
    split = images.split_images(images_dir, num_images, seed, eval_dir, num_eval, num_select)
    split = images.readable(split)
    x_calib = images.load(split.calib, pre, "calibration images")
    x_select = images.load(split.select, pre, "selection images")
    x_eval = images.load(split.eval, pre, "report images")
    split, x = images.informative(split, {"calib": x_calib, "select": x_select, "eval": x_eval}, pre)
    x_calib, x_select, x_eval = x["calib"], x["select"], x["eval"]
    y_eval, y_select = _labels(split.eval_labels), _labels(split.select_labels)

    def ref(x: np.ndarray) -> np.ndarray:
        return evaluate.logits(onnx_path, x, threads=threads) if len(x) else np.zeros((0, 1000), np.float32)

    ref_eval, ref_select = ref(x_eval), ref(x_select)
    ref_probe = ref(x_calib[:sensitivity_images])
    return Bench(name, Path(onnx_path), sha256_file(onnx_path), split, x_calib, x_eval, y_eval,
                 ref_eval, ref_probe, evaluate.accuracy(ref_eval, y_eval), x_select, y_select, ref_select,
                 evaluate.accuracy(ref_select, y_select), threads)


AUTO = "auto"


@dataclass(frozen=True)
class RangeChoice:
    ranges: dict[str, tuple[float, float]]
    source: str  # "calibration" or the cache path
    method: str  # the method the ranges came from (what `auto` chose)
    how: str  # why this method
    methods: dict[str, Any]  # every method fully quantised, when they were compared


def _error(a: evaluate.Accuracy) -> float:
    """What decisions minimise: the KL divergence to FP32 (logits error where it is unknown)."""
    v = a.kl if a.kl is not None else a.logits_rmse
    return v if v is not None else float("inf")


def choose_method(methods: dict[str, dict], fp32_top1: float | None, max_top1_drop: float | None,
                  min_agreement: float | None) -> tuple[str, str]:
    """`--method auto`: the method whose fully quantised model meets the budget with the lowest
    KL divergence to FP32 on the selection images, so that as few layers as possible stay float;
    when none meets it, the lowest divergence, from which the mixed-precision search starts."""
    acc = {m: evaluate.Accuracy(**a) for m, a in methods.items()}
    ok = [m for m, a in acc.items() if search.within_budget(a, fp32_top1, max_top1_drop, min_agreement)]
    best = min(ok or list(acc), key=lambda m: _error(acc[m]))
    return best, ("auto: fully INT8 within the budget, lowest KL divergence on the selection images" if ok
                  else "auto: none within the budget fully INT8; lowest KL divergence on the selection images")


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
        if len(bench.x_select):
            candidates = method_ranges(bench, target, {})
            methods = compare_methods(bench, target, candidates)
            method, how = choose_method(methods, bench.fp32_select.top1, cfg.max_top1_drop, cfg.min_agreement)
        else:
            method, how = "percentile", "auto: no selection images to compare methods on; percentile"
    r = candidates.get(method) or ranges_mod.compute_ranges(bench.stats(), method, target.symmetric)
    cache_mod.check_ranges(r, None, f"the activation statistics of {bench.onnx} on the calibration images",
                           "the float model computes NaN or Inf; re-export it from a good checkpoint")
    if cfg.cache is not None:
        cache_mod.save(cfg.cache, prov, r, method if cfg.method == AUTO else None)
    return RangeChoice(r, "calibration", method, how, methods)


def _evaluate(bench: Bench, path: Path, target: qdq.Target, on: str = "select") -> evaluate.Accuracy:
    """Accuracy on the selection images (what decisions read) or on the report images (what the
    report states, read once per kept model)."""
    x, y, ref = (bench.x_select, bench.y_select, bench.ref_select) if on == "select" else \
        (bench.x_eval, bench.y_eval, bench.ref_eval)
    out = evaluate.logits(path, x, threads=bench.threads, runtime=target.evaluate_with)
    return evaluate.accuracy(out, y, ref)


def calibrate_target(bench: Bench, cfg: CalibConfig) -> CalibResult:
    """Ranges (cache or statistics), the mixed-precision search, the final Q/DQ model and its manifest."""
    from scarlet_deploy.runtime.core.artifacts import atomic_path, sha256_file, tool_versions, write_manifest

    target = qdq.get_target(cfg.target)
    budget = cfg.max_top1_drop is not None or cfg.min_agreement is not None
    if budget and not len(bench.x_select):
        raise ScarletError("an accuracy budget needs selection images, but none were set aside; "
                           "pass --num-select N (with N below the images left after calibration) or --eval-dir.")
    if budget and cfg.max_top1_drop is not None and bench.y_select is None:
        raise ScarletError("--max-top1-drop needs labelled images (<wnid>/ folders, or flat ILSVRC2012_val_*.JPEG "
                           "with LOC_val_solution.csv); use --min-agreement instead.")
    if cfg.bias_correction not in ("auto", "off") + bias_mod.SCOPES:
        raise ScarletError(f"unknown --bias-correction {cfg.bias_correction!r}; choose auto, off, "
                           f"{', '.join(bias_mod.SCOPES)}.")
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
            return _evaluate(bench, trial, target) if len(bench.x_select) else evaluate.Accuracy(0, None, None)

        def ranked() -> list[str]:
            sens.extend(search.sensitivities(bench.onnx, rng, target, bench.x_calib[:len(bench.ref_probe)],
                                             bench.ref_probe, threads=bench.threads))
            return [s.node for s in sens]

        found = search.mixed_precision(ranked, build_and_eval, bench.fp32_select.top1 if bench.fp32_select else None,
                                       cfg.max_top1_drop, cfg.min_agreement,
                                       costs=search.layer_costs(bench.onnx, groups) if cfg.prune_search else None)

        def finish(exclude: list[str], tag: str, known: evaluate.Accuracy | None):
            """Quantise with `exclude` float, then bias-correct: (uncorrected, kept, selection accuracy, info)."""
            work = Path(d) / tag
            work.mkdir()
            q = work / "uncorrected.onnx"
            qdq.quantize(bench.onnx, rng, target, q, nodes_to_exclude=with_activations(exclude))
            return (q, *_bias_correction(bench, target, cfg, q, work, known))

        searched = found.kept.accuracy if found.kept and len(bench.x_select) else None
        float_layers: dict[str, Any] = {}
        full = None
        if found.nodes_to_exclude and len(bench.x_select):
            # judged against every layer INT8 with its own bias correction, which recovers much of
            # what the float layers buy, at none of their speed cost
            every = finish([], "all-int8", None)
            plain_q, kept, selected, bias_info = finish(found.nodes_to_exclude, "mixed", searched)
            float_layers = _float_layers_worth_it(bench, target, every[1], kept)
            full = every[1]
            if not float_layers["kept"]:
                found.nodes_to_exclude = []
                plain_q, kept, selected, bias_info = every
        else:
            plain_q, kept, selected, bias_info = finish(found.nodes_to_exclude, "final", searched)
        with atomic_path(cfg.output) as tmp:
            padded = _deployable(kept, Path(tmp), target)
        errors = layer_error.table(bench.onnx, plain_q, kept if kept != plain_q else None,
                                   bench.x_select[:cfg.layer_error_images], threads=bench.threads) \
            if cfg.layer_error_images and len(bench.x_select) else []
        base = _baseline(bench, cfg)
        throughput = None
        if cfg.bench_rounds:
            paths = {"fp32": bench.onnx, "int8": cfg.output}
            if found.nodes_to_exclude and full is not None:  # what the float layers cost
                paths["int8_all_layers"] = full.with_name("all-int8-deployable.onnx")
                _deployable(full, paths["int8_all_layers"], target)  # timed like the model it is compared with
            if base is not None:
                paths["plain"] = base.path
            throughput = evaluate.side_by_side_throughput(paths, rounds=cfg.bench_rounds, threads=bench.threads,
                                                          runtime="ov" if target.evaluate_with == "ov" else "ort")

    final = _evaluate(bench, cfg.output, target, on="report") if len(bench.x_eval) else None
    res = CalibResult(Path(cfg.output), target.name, choice.method, source, final, found if budget else None, sens,
                      choice.methods, throughput=throughput, selection=selected, bias=bias_info, layer_errors=errors)
    res.bias["float_layers"] = float_layers
    if target.name == "trt":
        res.trt_table = trt_table_path(cfg.output)
        cache_mod.write_trt_table(res.trt_table, rng, choice.method)
    if not res.methods and cfg.compare_methods and source == "calibration" and len(bench.x_select):
        res.methods = compare_methods(bench, target, method_ranges(bench, target, {choice.method: rng}))
    if base is not None:
        res.baseline = {"method": baseline_mod.DESCRIPTION, "report": base.report.as_dict(),
                        "selection": base.selection.as_dict() if base.selection else None}
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
                         "accuracy_measured_with": qdq.EVALUATED_WITH[target.evaluate_with]},
        "calibration_images": {"count": len(bench.split.calib), "seed": cfg.seed, "dir": str(cfg.images)},
        "selection_images": {"count": len(bench.split.select), "disjoint_from": ["calibration", "report"]},
        "evaluation_images": {"count": len(bench.split.eval), "disjoint_from_calibration": True,
                              "role": "report: read by no decision"},
        "bias_correction": {"mode": res.bias.get("mode"), "kept": res.bias.get("kept"), "images": res.bias.get("images")},
        "nodes_kept_float": found.nodes_to_exclude,
        "depthwise_padded_to_16_channels": padded,
        "budget": {"max_top1_drop": cfg.max_top1_drop, "min_agreement": cfg.min_agreement,
                   "met": found.met if budget else None},
        "accuracy": {"fp32": bench.fp32.as_dict(), "int8": final.as_dict() if final else None},
        "trt_calibration_table": str(res.trt_table) if res.trt_table else None,
        "versions": tool_versions(),
    }
    write_manifest(cfg.output, res.manifest)
    return res


def _deployable(model: Path, output: Path, target: qdq.Target) -> list[str]:
    """Write the model as it ships: for onnxruntime, depthwise layers padded to the channel count its
    fast kernel takes (calib/channel_pad.py). Decisions were taken on the unpadded models, whose
    per-channel statistics match the float model's; returns the depthwise layers padded."""
    if not target.pad_depthwise:
        output.write_bytes(model.read_bytes())
        return []
    import onnx

    from scarlet_deploy.calib.channel_pad import pad_depthwise_channels

    m = onnx.load(str(model))
    padded = pad_depthwise_channels(m)
    onnx.save(m, str(output))
    return padded


def _bias_correction(bench: Bench, target: qdq.Target, cfg: CalibConfig, model: Path, work: Path,
                     uncorrected: evaluate.Accuracy | None) -> tuple[Path, evaluate.Accuracy | None, dict[str, Any]]:
    """The model to keep: `model` or a bias-corrected copy, whichever has the lowest KL divergence
    on the selection images (`auto`), or the scope asked for. Returns it, its selection accuracy
    and what was tried."""
    if cfg.bias_correction == "off" or not len(bench.x_calib):
        return model, uncorrected, {"mode": "off"}
    scopes = bias_mod.SCOPES if cfg.bias_correction == "auto" else (cfg.bias_correction,)
    have_select = len(bench.x_select) > 0
    if uncorrected is None and have_select:
        uncorrected = _evaluate(bench, model, target)
    tried: dict[str, Any] = {"none": uncorrected.as_dict() if uncorrected else None}
    best, best_acc, shifts = model, uncorrected, {}
    x = bench.x_calib[:cfg.bias_images]
    for scope in scopes:
        out = work / f"bias-{scope}.onnx"
        shifts[scope] = bias_mod.correct(bench.onnx, model, out, x, scope=scope, threads=bench.threads)
        if not have_select:  # nothing to judge on: the one scope asked for is kept
            best, best_acc = out, None
            continue
        acc = _evaluate(bench, out, target)
        tried[scope] = acc.as_dict()
        if cfg.bias_correction != "auto" or _error(acc) < _error(best_acc):
            best, best_acc = out, acc
    kept = best.stem.removeprefix("bias-") if best != model else "none"
    return best, best_acc, {"mode": cfg.bias_correction, "kept": kept, "images": len(x), "selection": tried,
                            "layers": {k: [s.as_dict() for s in v] for k, v in shifts.items()}}


def _float_layers_worth_it(bench: Bench, target: qdq.Target, full: Path, mixed: Path) -> dict[str, Any]:
    """Layers stay float only if they lower the selection KL divergence by more than its noise
    (twice the standard error of the per-image difference): a top-1 change of one or two images,
    which the budget reads, must not decide alone."""
    def per_image(path: Path) -> np.ndarray:
        out = evaluate.logits(path, bench.x_select, threads=bench.threads, runtime=target.evaluate_with)
        return evaluate.kl_per_image(out, bench.ref_select)

    kl_full, kl_mixed = per_image(full), per_image(mixed)
    gain = kl_full - kl_mixed
    noise = 2.0 * float(np.std(gain, ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else float("inf")
    return {"kl_all_int8": float(kl_full.mean()), "kl_mixed": float(kl_mixed.mean()), "gain": float(gain.mean()),
            "noise": noise, "kept": bool(gain.mean() > noise)}


def _baseline(bench: Bench, cfg: CalibConfig) -> baseline_mod.Baseline | None:
    """Plain quantize_static on the same calibration images, built once per float model and split."""
    if not cfg.baseline or not len(bench.x_eval):
        return None
    if bench._baseline is None:
        bench._baseline = baseline_mod.build(bench.onnx, bench.x_calib, bench.x_select, bench.y_select,
                                             bench.ref_select, bench.x_eval, bench.y_eval, bench.ref_eval,
                                             threads=bench.threads)
    return bench._baseline


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
        cfg.seed, tuple(images.relative_names(split.calib))), images_before_filtering=True)


def calibrate(cfg: CalibConfig) -> tuple[Bench, CalibResult]:
    qdq.get_target(cfg.target)  # a target this host cannot judge fails before minutes of work
    _check_cache_first(cfg)
    bench = prepare(cfg.onnx, cfg.images, cfg.num_images, cfg.seed, cfg.eval_dir, cfg.num_eval, cfg.model,
                    cfg.sensitivity_images, cfg.threads, cfg.num_select)
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
        "selection_images": images.relative_names(bench.split.select),
        "evaluation_images": images.relative_names(bench.split.eval),
        "fp32": bench.fp32.as_dict(),
        "fp32_selection": bench.fp32_select.as_dict() if bench.fp32_select else None,
        "isa": qdq.int8_isa(),
        "targets": [{
            "target": r.target, "output": str(r.output), "method": r.method, "ranges_from": r.ranges_from,
            "method_choice": r.manifest.get("method_choice"),
            "int8": r.int8.as_dict() if r.int8 else None,
            "nodes_kept_float": r.manifest.get("nodes_kept_float", []),
            "depthwise_padded": r.manifest.get("depthwise_padded_to_16_channels", []),
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
            "selection": r.selection.as_dict() if r.selection else None,
            "baseline": r.baseline,
            "bias_correction": r.bias,
            "layer_errors": r.layer_errors,
        } for r in results],
        "environment": environment(),
    }


def report_markdown(data: dict[str, Any]) -> str:
    from scarlet_deploy.runtime.core.report import fmt, markdown_table

    acc_cols = ["images", "top1 %", "top5 %", "agreement %", "logits rel. RMSE", "KL to FP32"]

    def acc_row(label: str, a: dict | None) -> list:
        a = a or {}
        return [label, a.get("images"), a.get("top1"), a.get("top5"), a.get("agreement"), a.get("logits_rmse"),
                a.get("kl")]

    md = [f"# INT8 calibration: {data['model']}\n",
          f"Source `{data['source_onnx']}` (sha256 {data['source_onnx_sha256'][:12]}...). "
          f"{len(data['calibration_images'])} calibration, {len(data.get('selection_images', []))} selection and "
          f"{len(data['evaluation_images'])} report images, disjoint (lists in the JSON report): every decision "
          f"(method, bias correction, float layers) is taken on the selection images; the accuracy below is "
          f"from the report images, which no decision read. "
          f"{data['environment']['date']}, {data['environment']['machine']['cpu']}.\n"]
    for t in data["targets"]:
        md.append(f"\n## Target `{t['target']}`: {t['output']}\n")
        md.append(f"Method **{t['method']}** ({t.get('method_choice') or 'given'}; ranges from {t['ranges_from']}); "
                  f"budget {t['budget']}; "
                  f"INT8 accuracy measured with {t['measured_with']}. "
                  f"Size {fmt(t['size_bytes']['fp32'] / 1e6)} MB FP32 -> {fmt(t['size_bytes']['int8'] / 1e6)} MB INT8.")
        if t.get("depthwise_padded"):
            md.append(f" Padded to a multiple of 16 channels for onnxruntime's fast depthwise kernel, logits unchanged: "
                      f"{', '.join(f'`{n}`' for n in t['depthwise_padded'])}.")
        md.append("\n\n")
        md.append(_side_by_side(data, t))
        if t["search_steps"]:
            md.append("\n### Mixed-precision search\n\n")
            md.append(markdown_table(["layers kept in float", "tried back in INT8"] + acc_cols[1:] + ["within budget"],
                                     [[s["kept_float"], s.get("quantised_back") or "", s["top1"], s["top5"],
                                       s["agreement"], s["logits_rmse"], s.get("kl"), s["within_budget"]]
                                      for s in t["search_steps"]]))
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
        md.append(_bias_section(t))
        md.append(_layer_error_section(t))
        if t["methods"]:
            md.append("\n### Methods compared (same statistics, every layer quantised; selection images)\n\n")
            md.append(markdown_table(["method"] + acc_cols, [acc_row(m, a) for m, a in t["methods"].items()]))
    return "".join(md)


def _side_by_side(data: dict[str, Any], t: dict[str, Any]) -> str:
    """FP32, the plain quantize_static baseline and ours on the report images, with batch-8 speed."""
    from scarlet_deploy.runtime.core.report import fmt, markdown_table

    tp = t.get("throughput_img_s") or {}
    base = t.get("baseline")
    rows = [["FP32", data["fp32"], tp.get("fp32")]]
    if base:
        rows.append(["plain quantize_static (baseline)", base["report"], tp.get("plain")])
    kept = (t.get("bias_correction") or {}).get("kept", "off")
    floats = f", {len(t['nodes_kept_float'])} layers float" if t["nodes_kept_float"] else ""
    rows.append([f"scarlet INT8 ({t['method']}, bias correction: {kept}{floats})", t["int8"], tp.get("int8")])
    if tp.get("int8_all_layers"):
        rows.append(["scarlet INT8, every layer INT8 (speed only)", None, tp["int8_all_layers"]])
    speed = tp.get("fp32")
    md = [markdown_table(["model", "images", "top1 %", "agreement %", "KL to FP32", "logits rel. RMSE",
                          "img/s (batch 8)", "vs FP32"],
                         [[label, (a or {}).get("images"), (a or {}).get("top1"), (a or {}).get("agreement"),
                           (a or {}).get("kl"), (a or {}).get("logits_rmse"), v, fmt(v / speed) + "x" if v and speed else ""]
                          for label, a, v in rows])]
    if t["measured_with"] != qdq.EVALUATED_WITH["ort"] and base:
        md.append(f"\nThe baseline's accuracy is measured on onnxruntime's integer kernels, this target's with "
                  f"{t['measured_with']}, so their errors compare arithmetic as well as calibration.\n")
    if tp:
        on = "OpenVINO (every row)" if t["measured_with"] == qdq.EVALUATED_WITH["ov"] else "onnxruntime"
        md.append(f"\nSpeed: batch 8 on {on}, measured interleaved in one run on this CPU "
                  f"({data.get('isa', 'ISA unknown')}).\n")
    fl = (t.get("bias_correction") or {}).get("float_layers") or {}
    if fl:
        md.append(f"\nFloat layers from the search: selection KL {fmt(fl['kl_all_int8'])} with every layer INT8 "
                  "(bias-corrected as well), "
                  f"{fmt(fl['kl_mixed'])} with them float (gain {fmt(fl['gain'])}, noise {fmt(fl['noise'])}): "
                  f"{'kept' if fl['kept'] else 'not more than the noise, so every layer is INT8'}.\n")
    ours, plain = t.get("int8") or {}, (base or {}).get("report") or {}
    if ours.get("kl") is not None and plain.get("kl"):
        verdict = []
        ratio = ours["kl"] / plain["kl"]
        verdict.append(f"KL divergence {fmt(ratio)}x the baseline's")
        if ours.get("agreement") is not None and plain.get("agreement") is not None:
            verdict.append(f"agreement {fmt(ours['agreement'] - plain['agreement'])} points "
                           f"{'above' if ours['agreement'] >= plain['agreement'] else 'below'} it")
        if tp.get("int8") and tp.get("plain"):
            verdict.append(f"speed {fmt(tp['int8'] / tp['plain'])}x the baseline's")
        better = ratio < 1 and ours.get("agreement", 0) >= plain.get("agreement", 0)
        md.append(f"\n{'Ours is better than the plain baseline' if better else 'Ours is NOT better than the plain baseline'}"
                  f" on the report images: {', '.join(verdict)}.\n")
    return "".join(md)


def _bias_section(t: dict[str, Any]) -> str:
    from scarlet_deploy.runtime.core.report import markdown_table

    b = t.get("bias_correction") or {}
    if b.get("mode", "off") == "off":
        return "\nBias correction: off.\n"
    md = [(f"\n### Bias correction\n\nPer output channel, layer by layer in network order, on {b.get('images')} "
           f"calibration images; kept: **{b.get('kept')}** (lowest KL divergence on the selection images; "
           "`all`: every Conv/Gemm, matched after its ReLU/ReLU6; `linear`: only layers no activation follows).\n\n")]
    md.append(markdown_table(["variant", "agreement %", "KL to FP32", "logits rel. RMSE"],
                             [[k, (a or {}).get("agreement"), (a or {}).get("kl"), (a or {}).get("logits_rmse")]
                              for k, a in (b.get("selection") or {}).items()]))
    shifts = (b.get("layers") or {}).get(b.get("kept")) or []
    if shifts:
        md.append("\nWhat it changed: the layers whose output mean was furthest off (per-channel mean error, "
                  "relative to the float output's RMS, on the calibration images):\n\n")
        md.append(markdown_table(["layer", "op", "after activation", "channels", "mean error before", "after"],
                                 [[s["layer"], s["op_type"], s["activation"] or "", s["channels"], s["shift_before"],
                                   s["shift_after"]] for s in sorted(shifts, key=lambda s: -s["shift_before"])[:10]]))
    return "".join(md)


def _layer_error_section(t: dict[str, Any]) -> str:
    from scarlet_deploy.runtime.core.report import markdown_table

    rows = t.get("layer_errors") or []
    if not rows:
        return ""
    last = rows[-1]
    corrected = f" ({last['rel_rmse_corrected']:.4f} after bias correction)" \
        if last.get("rel_rmse_corrected") is not None else ""
    md = ["\n### Where the INT8 error comes from (per-layer output error vs float, selection images, fake-quant)\n\n",
          (f"Logits layer: relative RMS error {last['rel_rmse']:.4f}{corrected}. The ten layers where the error grows "
           "most over the layers feeding them (full table in the JSON report):\n\n")]
    md.append(markdown_table(["layer", "op", "rel. RMSE", "of it: mean shift", "growth", "rel. RMSE corrected",
                              "mean shift corrected"],
                             [[r["layer"], r["op_type"], r["rel_rmse"], r["mean_part"], r["growth"],
                               r.get("rel_rmse_corrected"), r.get("mean_part_corrected")]
                              for r in layer_error.worst(rows)]))
    return "".join(md)


def write_report(prefix: str, bench: Bench, results: list[CalibResult]) -> dict[str, Any]:
    from scarlet_deploy.runtime.core.report import write_reports

    data = report_data(bench, results)
    write_reports(data, report_markdown(data), f"{prefix}.json", f"{prefix}.md")
    return data
