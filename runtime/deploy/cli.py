"""`scarlet deploy` and `scarlet check`: argument parsing only; the work is in run.py and check.py."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scarlet_deploy.runtime.core import cli_types
from scarlet_deploy.runtime.core.cli_types import csv_of, float_range, positive_float, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    from scarlet_deploy.export.registry import MODELS

    p = sub.add_parser("deploy", help="the fastest artifact that is still your model on this machine, as a "
                                      "self-checking package (export, calibrate, verify, time, choose)")
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--checkpoint", type=cli_types.input_file(".pth", as_path=False), help="trained weights ({'model_state': ...} or a state_dict); default: the "
                                        "model's shipped weights, else seeded ones (accuracy then means nothing)")
    p.add_argument("--let", action="store_true", help="the LET variant of a SCARLET model")
    p.add_argument("--images", help="ImageNet-style <wnid>/*.JPEG folder to calibrate and verify on "
                                    "(default: the shared sample beside the checkout, or $SCARLET_VAL_DIR)")
    p.add_argument("--objective", choices=("throughput", "latency"), default="throughput",
                   help="throughput: images/s at --batch; latency: p50 at batch 1 (default throughput)")
    p.add_argument("--batch", type=positive_int, default=8, help="batch of the throughput objective (default 8)")
    p.add_argument("--max-top1-drop", type=float_range(0.0, 100.0), default=0.5,
                   help="labelled top-1 points a candidate may lose, unless within noise by McNemar's test "
                        "(trained weights; default 0.5)")
    p.add_argument("--min-agreement", type=float_range(0.0, 100.0), default=97.0,
                   help="percent of verification images whose top-1 equals PyTorch's (default 97)")
    p.add_argument("--backends", type=csv_of(str), help="comma-separated candidates to consider (default: every one "
                                                         "this machine runs): ort,ov,ov-bf16,ort-fp16,ort-int8,ov-int8,ov-int8-bf16,trt-fp16,trt-int8")
    p.add_argument("-o", "--output", help="package folder (default deploy/MODEL); an older package there is replaced "
                                          "only once the new one has passed its own check")
    p.add_argument("--work-dir", default="build/deploy", help="reusable artifacts (default build/deploy)")
    p.add_argument("--report", help="PREFIX for PREFIX.json/.md/.png, written pass or fail (default reports/deploy-MODEL)")
    p.add_argument("--golden", type=positive_int, default=32, help="golden images in the package (default 32)")
    p.add_argument("--num-calib", type=positive_int, default=128, help="calibration images (default 128)")
    p.add_argument("--num-select", type=positive_int, default=100, help="selection images (default 100)")
    p.add_argument("--min-verify", type=positive_int, default=100, help="fewest verification images (default 100)")
    p.add_argument("--max-verify", type=positive_int, default=1000,
                   help="most verification images, sampled across classes (default 1000)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timing rounds (default 5)")
    p.add_argument("--seconds", type=positive_float, default=0.5, help="seconds per backend and round (default 0.5)")
    p.add_argument("--threads", type=positive_int, help="threads for every runtime (default: physical cores)")
    p.set_defaults(func=run_deploy)

    p = sub.add_parser("check", help="re-check a deploy package wherever it is: files, golden images, drift "
                                     "(exit 0 pass, 1 fail, 2 unusable)")
    p.add_argument("package", help="the folder `scarlet deploy` wrote")
    p.add_argument("--server", help="also send the golden images to a live Triton serving the package: "
                                    "http://HOST:PORT or grpc://HOST:PORT")
    p.add_argument("--threads", type=positive_int, help="runtime threads (default: physical cores)")
    p.add_argument("--json", help="write the result as JSON here")
    p.set_defaults(func=run_check)


def run_deploy(args: argparse.Namespace) -> int:
    from scarlet_deploy.runtime.deploy.gates import Gates
    from scarlet_deploy.runtime.deploy.report import summary
    from scarlet_deploy.runtime.deploy.run import DeployConfig, deploy

    cfg = DeployConfig(
        model=args.model, output=Path(args.output or f"deploy/{args.model}{'-let' if args.let else ''}"),
        checkpoint=Path(args.checkpoint) if args.checkpoint else None, let=args.let,
        images=Path(args.images) if args.images else None, objective=args.objective, batch=args.batch,
        gates=Gates(min_agreement=args.min_agreement, max_top1_drop=args.max_top1_drop), backends=args.backends,
        work_dir=Path(args.work_dir), report=Path(args.report or f"reports/deploy-{args.model}{'-let' if args.let else ''}"),
        golden=args.golden, num_calib=args.num_calib, num_select=args.num_select, min_verify=args.min_verify, max_verify=args.max_verify,
        threads=args.threads, repeats=args.repeats, seconds=args.seconds)
    res = deploy(cfg)
    print(summary(res.data, res.package))
    print(f"report: {cfg.report}.md / .json / .png")
    return 0 if res.chosen else 1


def run_check(args: argparse.Namespace) -> int:
    from scarlet_deploy.runtime.core.artifacts import write_json_atomic
    from scarlet_deploy.runtime.deploy.check import check_package

    res = check_package(args.package, server=args.server, threads=args.threads)
    print(res.text())
    if args.json:
        write_json_atomic(args.json, res.as_dict())
    sys.stdout.flush()
    return 0 if res.passed else 1
