"""`scarlet calibrate` (one ONNX, one target) and `scarlet calibrate-model` (what `make calib` runs)."""
from __future__ import annotations

import argparse
from pathlib import Path

from scarlet_deploy.calib.model import MODEL_DEFAULTS
from scarlet_deploy.calib.pipeline import trt_table_path
from scarlet_deploy.calib.qdq import TARGETS
from scarlet_deploy.runtime.core import cli_types
from scarlet_deploy.runtime.core.artifacts import manifest_path
from scarlet_deploy.runtime.core.paths import check_output, check_outputs


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-images", type=cli_types.positive_int, default=128,
                   help="calibration images, sampled across classes (default 128)")
    p.add_argument("--num-select", type=cli_types.nonneg_int, default=100,
                   help="selection images, apart from calibration and report images: method, bias correction "
                        "and float layers are decided on them (default 100); the rest is the report set")
    p.add_argument("--bias-correction", default="auto", choices=("auto", "off", "all", "linear"),
                   help="per-channel bias correction after quantization; auto (default) keeps the variant with "
                        "the lowest KL divergence to FP32 on the selection images, none included")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the plain onnxruntime quantize_static baseline in the report")
    p.add_argument("--method", default="auto", choices=("auto", "minmax", "percentile", "entropy", "mse"),
                   help="range method; auto (default) quantises every layer with each method and keeps the "
                        "one that meets the budget with the lowest logits error (percentile: clip at the "
                        "99.99th percentile of |x|)")
    p.add_argument("--max-top1-drop", type=cli_types.percent, default=None,
                   help="keep the most sensitive layers in float until top-1 drops at most this many points")
    p.add_argument("--min-agreement", type=cli_types.percent, default=None,
                   help="...and until top-1 agrees with FP32 on at least this percent of evaluation images")
    p.add_argument("--num-eval", type=cli_types.positive_int, default=None, help="evaluate on at most this many images")
    p.add_argument("--seed", type=cli_types.seed, default=0)
    p.add_argument("--no-compare", action="store_true", help="skip the comparison of all methods")
    p.add_argument("--bench-rounds", type=cli_types.nonneg_int, default=10,
                   help="time FP32, INT8 and the baseline at batch 8, interleaved, this many rounds (0: skip)")
    p.add_argument("--threads", type=cli_types.positive_int, default=None, help="onnxruntime threads (default: physical cores)")


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="INT8 Q/DQ ONNX from a float ONNX and calibration images")
    p.add_argument("--onnx", type=cli_types.input_file(".onnx"), required=True)
    p.add_argument("--images", type=Path, required=True,
                   help="calibration images: any folder of images (labels, for --max-top1-drop, from "
                        "<wnid>/ folders or flat ILSVRC files with LOC_val_solution.csv)")
    p.add_argument("--eval-dir", type=Path, default=None,
                   help="evaluation images (default: --images minus the calibration images)")
    p.add_argument("--target", default="ort", choices=TARGETS,
                   help="ort: onnxruntime CPU (default); trt: TensorRT explicit quantization; ov: OpenVINO CPU "
                        "(needs the openvino extra: its accuracy is measured on OpenVINO)")
    p.add_argument("--cache", type=Path, default=None, help="calibration cache: reused when it matches, written otherwise")
    p.add_argument("--model", default=None, help="registry model name, when the ONNX has no manifest")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--report", default=None, metavar="PREFIX", help="write PREFIX.json and PREFIX.md")
    _common(p)
    p.set_defaults(func=run)

    m = sub.add_parser("calibrate-model", help="INT8 ONNX for onnxruntime, TensorRT and OpenVINO from build/<model>.onnx (make calib)")
    m.add_argument("--model", required=True)
    m.add_argument("--checkpoint", default=None, type=cli_types.input_file(".pth", as_path=False), help="weights to export with when build/<model>.onnx is missing")
    m.add_argument("--out-dir", type=Path, default=Path("build"))
    m.add_argument("--val-dir", type=Path, default=None, help="images (default: the shared ImageNet sample)")
    m.add_argument("--targets", nargs="+", default=None, choices=TARGETS,
                   help="default: ort trt, and ov where OpenVINO is installed")
    m.add_argument("--report", default=None, metavar="PREFIX")
    _common(m)
    m.set_defaults(func=run_model, **MODEL_DEFAULTS)


def _config(args, **kw):
    from scarlet_deploy.calib.pipeline import CalibConfig

    return CalibConfig(num_images=args.num_images, method=args.method, max_top1_drop=args.max_top1_drop,
                       min_agreement=args.min_agreement, num_eval=args.num_eval, seed=args.seed,
                       compare_methods=not args.no_compare, bench_rounds=args.bench_rounds, threads=args.threads,
                       num_select=args.num_select, bias_correction=args.bias_correction, baseline=not args.no_baseline,
                       **kw)


def _summary(res) -> str:
    a = res.int8
    acc = f"top-1 {a.top1:.2f} %, agreement {a.agreement:.2f} %" if a and a.top1 is not None else "not evaluated"
    return f"{res.output} ({res.target}, {res.method}): {acc}; kept in float: {len(res.manifest['nodes_kept_float'])} layers"


def run(args) -> int:
    from scarlet_deploy.calib.pipeline import calibrate

    inputs = [("--onnx", args.onnx)]
    check_output(args.output, inputs + [("--cache", args.cache)], companions=[manifest_path(args.output), trt_table_path(args.output)])
    if args.cache:  # read and rewritten: it may be anything but the model
        check_output(args.cache, inputs, "--cache")
    reports = [("--report", f"{args.report}{suffix}") for suffix in ((".json", ".md") if args.report else ())]
    check_outputs([("-o/--output", args.output), ("--cache", args.cache), *reports], inputs)
    cfg = _config(args, onnx=args.onnx, images=args.images, output=args.output, target=args.target,
                  eval_dir=args.eval_dir, cache=args.cache, model=args.model, report=args.report)
    _, res = calibrate(cfg)
    print(_summary(res))
    return 0


def run_model(args) -> int:
    from scarlet_deploy.calib.model import OUTPUT_SUFFIX, calibrate_model, default_targets

    float_onnx = args.out_dir / f"{args.model}.onnx"
    if args.targets is None:
        args.targets, note = default_targets()
        if note:
            print(note)
    for t in args.targets:  # --out-dir must be writable before minutes of calibration
        check_output(args.out_dir / f"{args.model}{OUTPUT_SUFFIX[t]}", [("--checkpoint", args.checkpoint), ("the float ONNX", float_onnx)],
                     "--out-dir")
    for res in calibrate_model(args.model, args.out_dir, args.val_dir, args.targets, args.report,
                               args.checkpoint, _config(args, onnx=Path(), images=Path(), output=Path())):
        print(_summary(res))
    return 0
