from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scarlet_deploy.runtime.bench.plan import BACKENDS, MODES, BenchConfig
from scarlet_deploy.runtime.bench.plot import plot
from scarlet_deploy.runtime.bench.readme import README_BEGIN, README_END, update_readme
from scarlet_deploy.runtime.bench.report import render_markdown
from scarlet_deploy.runtime.bench.run import run_bench
from scarlet_deploy.runtime.core import cli_types
from scarlet_deploy.runtime.core.paths import check_outputs


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure every backend side by side; write the performance table (docs/performance.md)")
    p.add_argument("--models", type=cli_types.csv_of(str), default=BenchConfig().models)
    p.add_argument("--backends", type=cli_types.csv_of(str), default=list(BACKENDS),
                   help="subset of " + ",".join(BACKENDS) + " (unavailable ones are skipped with a reason)")
    p.add_argument("--batch", type=cli_types.csv_of(cli_types.positive_int), default=[1, 8], help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--modes", type=cli_types.csv_of(str), default=list(MODES),
                   help="latency (infer, one batch at a time: p50/p90/p99) and/or throughput (infer_many, "
                        "batches in flight on every stream: img/s); default both")
    p.add_argument("--threads", type=cli_types.positive_int, default=None,
                   help="CPU threads for PyTorch, onnxruntime and OpenVINO (default: physical cores)")
    p.add_argument("--build-dir", type=Path, default=Path("build"))
    p.add_argument("--engine", type=cli_types.input_file(".plan"), nargs="+", action="extend", default=[],
                   help="TensorRT plans named <model>.<fp32|fp16|int8>.plan (default: looked for in --build-dir)")
    p.add_argument("--repeats", type=cli_types.positive_int, default=5, help="interleaved rounds per measurement")
    p.add_argument("--seconds", type=cli_types.positive_float, default=1.0, help="time per backend per round")
    p.add_argument("--warmup", type=cli_types.nonneg_float, default=0.5, help="warm-up seconds per backend (not recorded)")
    p.add_argument("--tune", action="store_true", help="try a small onnxruntime settings grid first; use the winner")
    p.add_argument("--calibrate-missing", action="store_true",
                   help="create a missing build/<model>.int8.onnx (ort-int8) or .int8-ov.onnx (ov-int8) "
                        "as `make calib` does (minutes per model)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak memory per backend in a subprocess")
    p.add_argument("--channels-last", action="store_true", help="run the PyTorch baseline in channels_last")
    p.add_argument("--reports-dir", type=Path, default=Path("reports"), help="where verify-<model>.json are read from")
    p.add_argument("--json")
    p.add_argument("--markdown")
    p.add_argument("--plot")
    p.add_argument("--readme", type=Path, default=None,
                   help=f"also replace the section between {README_BEGIN} and {README_END} in this file")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = BenchConfig(models=args.models, backends=args.backends, batches=args.batch, modes=args.modes, threads=args.threads,
                      build_dir=args.build_dir, engines=args.engine, repeats=args.repeats, seconds=args.seconds,
                      warmup_s=args.warmup, memory=args.memory, tune=args.tune, calibrate=args.calibrate_missing,
                      torch_channels_last=args.channels_last,
                      reports_dir=args.reports_dir)
    from scarlet_deploy.runtime.core.report import write_reports

    # Everything the run reads: the models' build files (ONNX, INT8, plans, manifests), engines, accuracy reports.
    inputs = [("--build-dir", p) for m in cfg.models for p in sorted(cfg.build_dir.glob(f"{m}.*"))] + \
        [("--engine", e) for e in cfg.engines] + \
        [("--reports-dir", cfg.reports_dir / f"{kind}-{m}.json") for m in cfg.models for kind in ("verify", "calib")]
    # Before minutes of measuring: never over a benchmarked model or over each other.
    check_outputs([("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)], inputs)

    data = {"command": " ".join(["scarlet", *sys.argv[1:]]), **run_bench(cfg)}
    md = render_markdown(data)
    write_reports(data, md, args.json, args.markdown)
    if args.plot:
        plot(data, args.plot)
    if args.readme:
        update_readme(args.readme, md)
    print(md)
    return 0
