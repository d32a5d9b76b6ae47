from __future__ import annotations

import argparse
from pathlib import Path

from scarlet_deploy.runtime.core import cli_types
from scarlet_deploy.runtime.core.paths import check_output
from scarlet_deploy.runtime.runners.registry import ONNX_RUNTIMES
from scarlet_deploy.runtime.verify.compare import Thresholds
from scarlet_deploy.runtime.verify.config import VerifyConfig
from scarlet_deploy.runtime.verify.report import render_markdown
from scarlet_deploy.runtime.verify.run import verify


def register(sub: argparse._SubParsersAction) -> None:
    from scarlet_deploy.export.registry import MODELS

    t = Thresholds()
    p = sub.add_parser("verify", help="parity of every backend with PyTorch on real images (exit 1 on failure)",
                       description="Compare PyTorch with ONNX (onnxruntime) and TensorRT backends on a validation "
                                   "folder: accuracy, top-1 agreement, logit errors. Exit status 1 when a backend fails.")
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--let", action="store_true", help="the SCARLET network with LET layers")
    p.add_argument("--checkpoint", help="PyTorch checkpoint; default: shipped (Lite0) or seeded weights, as export uses")
    p.add_argument("--seed", type=cli_types.seed, default=0, help="seed of the seeded weights (as given to export)")
    p.add_argument("--onnx", action="append", type=Path, default=[], help="ONNX model to check (repeatable)")
    p.add_argument("--auto-onnx", type=Path, metavar="DIR",
                   help="also every DIR/<model>*.onnx whose manifest names this model (FP32, FP16, INT8); "
                        "exports DIR/<model>.onnx first when there is none")
    p.add_argument("--engine", action="append", type=Path, default=[], help="TensorRT plan (repeatable; GPU only)")
    p.add_argument("--backends", type=lambda t: [r.strip() for r in t.split(",") if r.strip()], default=["ort"],
                   help=f"CPU runtimes every ONNX runs on, comma-separated: {', '.join(ONNX_RUNTIMES)} (default ort); "
                        "each gated by its precision's threshold, unavailable ones skipped with the reason")
    p.add_argument("--val-dir", type=Path, help="DIR/<wnid>/*.JPEG, an ImageNet root with val/, or flat "
                   "ILSVRC2012_val_*.JPEG (+ LOC_val_solution.csv); default: the shared sample, else sample photos")
    p.add_argument("--limit", type=cli_types.positive_int, help="only N images, spread over the folder")
    p.add_argument("--batch", type=cli_types.positive_int, default=64)
    p.add_argument("--workers", type=cli_types.nonneg_int, help="decode processes (default: every core; 0 = decode inline)")
    p.add_argument("--threads", type=cli_types.positive_int, help="inference threads (default: physical cores)")
    p.add_argument("--no-pipeline-parity", dest="pipeline_parity", action="store_false",
                   help="skip the OpenCV deploy-preprocessing pass on the first FP32 ONNX")
    p.add_argument("--fp32-max-rel-error", type=cli_types.nonneg_float, default=t.fp32_max_rel_error)
    p.add_argument("--fp32-min-agreement", type=cli_types.fraction, default=t.fp32_min_agreement)
    p.add_argument("--fp16-min-agreement", type=cli_types.fraction, default=t.fp16_min_agreement)
    p.add_argument("--int8-min-agreement", type=cli_types.fraction, default=t.int8_min_agreement)
    p.add_argument("--bf16-min-agreement", type=cli_types.fraction, default=t.bf16_min_agreement, help="for FP32 ONNX on ov-bf16")
    p.add_argument("--json", help="write the full report (every number, manifests, versions) here")
    p.add_argument("--markdown", help="write the markdown report here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scarlet_deploy.runtime.core.report import write_reports

    cfg = VerifyConfig(
        model=args.model, onnx=args.onnx, engines=args.engine, backends=args.backends, auto_onnx=args.auto_onnx, let=args.let,
        checkpoint=args.checkpoint, seed=args.seed, val_dir=args.val_dir, limit=args.limit, batch=args.batch,
        workers=args.workers, threads=args.threads, pipeline_parity=args.pipeline_parity,
        thresholds=Thresholds(args.fp32_max_rel_error, args.fp32_min_agreement, args.fp16_min_agreement,
                              args.int8_min_agreement, args.bf16_min_agreement),
        progress=not args.quiet)
    found = sorted(args.auto_onnx.glob(f"{args.model}*.onnx")) if args.auto_onnx and args.auto_onnx.is_dir() else []
    inputs = [("--onnx", o) for o in args.onnx] + [("--auto-onnx", o) for o in found] + \
        [("--engine", e) for e in args.engine] + [("--checkpoint", args.checkpoint)]
    for flag, out in (("--json", args.json), ("--markdown", args.markdown)):
        if out:  # before minutes of inference, and never over a model being verified
            check_output(out, inputs, flag)
    report = verify(cfg)
    md = render_markdown(report)
    write_reports(report.as_dict(), md, args.json, args.markdown)
    print(md)
    for path in (args.json, args.markdown):
        if path:
            print(f"wrote {path}")
    return 0 if report.passed else 1
