"""`scarlet engine`: a TensorRT 11 plan from the exported ONNX; `scarlet fp16`: the FP16 ONNX alone (CPU).

Thin: parses flags and calls runtime.tensorrt / export.fp16, which tests call directly.
"""
from __future__ import annotations

import json
from pathlib import Path

from scarlet_deploy.runtime.core import cli_types
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.onnx_io import read_io
from scarlet_deploy.runtime.core.paths import check_output


def register(sub) -> None:
    p = sub.add_parser("engine", help="build a TensorRT 11 plan (fp32/fp16/int8) from the exported ONNX (needs an NVIDIA GPU)",
                       description="Build a TensorRT 11 plan. Precision comes from the ONNX tensor types: fp32 builds the "
                                   "exported ONNX (TF32 off), fp16 converts it to M.fp16.onnx first, int8 builds the Q/DQ "
                                   "ONNX from `scarlet calibrate --target trt`. A manifest (M.plan.json) records TensorRT, "
                                   "GPU, precision and profile; plans are refused on another TensorRT or GPU.")
    p.add_argument("--onnx", required=True, type=cli_types.input_file(".onnx"), help="exported FP32 ONNX (build/MODEL.onnx)")
    p.add_argument("--precision", required=True, choices=("fp32", "fp16", "int8"))
    p.add_argument("--int8-onnx", type=Path, help="TensorRT Q/DQ ONNX (default: MODEL.int8-trt.onnx beside --onnx)")
    p.add_argument("--int8-high-precision", choices=("fp16", "fp32"), default="fp16",
                   help="type of the layers an INT8 plan does not quantize (h-sigmoid, SE, pooling, layers kept in float): "
                        "fp16 (default, as NVIDIA ModelOpt writes; converted to MODEL.int8-trt.fp16.onnx and checked on CPU) "
                        "or fp32")
    p.add_argument("--batch", default="1,8,32", help="optimisation profile MIN,OPT,MAX batch sizes, or one fixed size (default 1,8,32)")
    p.add_argument("--workspace", type=cli_types.positive_float, metavar="GB", help="builder workspace limit in GB (default: TensorRT's, the device memory)")
    p.add_argument("--timing-cache", type=Path, metavar="FILE", help="timing cache reused between builds (default: timing.cache beside the plan)")
    p.add_argument("--rebuild", action="store_true", help="build even if an up-to-date plan exists")
    p.add_argument("-o", "--output", required=True, type=Path, help="plan to write (MODEL.PRECISION.plan)")
    p.set_defaults(func=run_engine)

    f = sub.add_parser("fp16", help="convert an exported ONNX to FP16 (float32 I/O, reductions in float32), or the float "
                                    "parts of a TensorRT Q/DQ ONNX (what INT8 plans build from); runs on CPU")
    f.add_argument("--onnx", required=True, type=cli_types.input_file(".onnx"))
    f.add_argument("-o", "--output", type=Path, help="default: MODEL.fp16.onnx beside --onnx")
    f.add_argument("--images", type=cli_types.nonneg_int, default=16, help="real images to compare FP16 vs FP32 on onnxruntime CPU (0: skip)")
    f.add_argument("--force", action="store_true", help="convert even if an up-to-date FP16 ONNX exists")
    f.set_defaults(func=run_fp16)


def run_engine(args) -> int:
    from scarlet_deploy.export.trt_build import BatchProfile, EngineConfig, build_engine

    check_output(args.output, [("--onnx", args.onnx), ("--int8-onnx", args.int8_onnx), ("--timing-cache", args.timing_cache)])
    cfg = EngineConfig(onnx=args.onnx, precision=args.precision, output=args.output, int8_onnx=args.int8_onnx,
                       batch=BatchProfile.parse(args.batch), workspace_gb=args.workspace,
                       timing_cache=args.timing_cache, rebuild=args.rebuild, int8_high_precision=args.int8_high_precision)
    r = build_engine(cfg)
    m = r.manifest
    state = "up to date" if r.reused else f"built in {r.seconds:.1f} s"
    print(f"{r.plan}: {r.precision} plan {state} (TensorRT {m['tensorrt']}, {m['gpu']['name']}, "
          f"batch {','.join(map(str, m['request']['batch']))}, from {r.build_onnx})")
    return 0


def run_fp16(args) -> int:
    import onnx

    from scarlet_deploy.export.fp16 import Fp16Config, convert_qdq_to_fp16, convert_to_fp16, report_dict, type_summary

    if not args.onnx.is_file():
        raise ScarletError(f"ONNX model {args.onnx} does not exist; create it with `scarlet export` (or `make export`).")
    read_io(args.onnx)  # not ONNX: one sentence, not a protobuf DecodeError
    qdq = type_summary(onnx.load(str(args.onnx), load_external_data=False))["qdq_nodes"] > 0
    convert = convert_qdq_to_fp16 if qdq else convert_to_fp16  # a Q/DQ ONNX: its float parts, as INT8 plans use it
    r = convert(Fp16Config(onnx=args.onnx, output=args.output, parity_images=args.images, force=args.force))
    print(json.dumps(report_dict(r), indent=2))
    return 0
