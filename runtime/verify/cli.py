from __future__ import annotations

import argparse
import os
from pathlib import Path

from scarlet_deploy.runtime.core import cli_types
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.paths import check_outputs
from scarlet_deploy.runtime.runners.registry import ONNX_RUNTIMES
from scarlet_deploy.runtime.verify.compare import Thresholds
from scarlet_deploy.runtime.verify.config import VerifyConfig
from scarlet_deploy.runtime.verify.report import render_markdown, seed_result_line
from scarlet_deploy.runtime.verify.run import verify

# SCARLET-NAS's verify.py spells the models this way; our users come from its command line.
SEED_MODELS = {"Scarlet_A": "scarlet_a", "Scarlet_B": "scarlet_b", "Scarlet_C": "scarlet_c"}
SEED_FLAGS = ("val_dataset_root", "pretrained_path", "batch_size", "device", "gpu_id")


def register(sub: argparse._SubParsersAction) -> None:
    from scarlet_deploy.export.registry import MODELS

    t = Thresholds()
    p = sub.add_parser("verify", help="parity of every backend with PyTorch on real images (exit 1 on failure)",
                       description="Compare PyTorch with ONNX (onnxruntime) and TensorRT backends on a validation "
                                   "folder: accuracy, top-1 agreement, logit errors. Exit status 1 when a backend fails.")
    p.add_argument("--model", required=True, choices=[*sorted(MODELS), *SEED_MODELS],
                   help="Scarlet_A/B/C (SCARLET-NAS's names) are scarlet_a/b/c")
    p.add_argument("--let", action="store_true", help="the SCARLET network with LET layers")
    p.add_argument("--checkpoint", type=cli_types.input_file(".pth", as_path=False), help="PyTorch checkpoint; default: shipped (Lite0) or seeded weights, as export uses")
    p.add_argument("--seed", type=cli_types.seed, default=0, help="seed of the seeded weights (as given to export)")
    p.add_argument("--onnx", action="append", type=cli_types.input_file(".onnx"), default=[], help="ONNX model to check (repeatable)")
    p.add_argument("--auto-onnx", type=Path, metavar="DIR",
                   help="also every DIR/<model>*.onnx whose manifest names this model (FP32, FP16, INT8); "
                        "exports DIR/<model>.onnx first when there is none")
    p.add_argument("--engine", action="append", type=cli_types.input_file(".plan"), default=[], help="TensorRT plan (repeatable; GPU only)")
    p.add_argument("--backends", type=lambda t: [r.strip() for r in t.split(",") if r.strip()], default=["ort"],
                   help=f"CPU runtimes every ONNX runs on, comma-separated: {', '.join(ONNX_RUNTIMES)} (default ort); "
                        "each gated by its precision's threshold, unavailable ones skipped with the reason")
    p.add_argument("--val-dir", type=Path, help="DIR/<wnid>/*.JPEG, an ImageNet root with val/, or flat "
                   "ILSVRC2012_val_*.JPEG (+ LOC_val_solution.csv); default: the shared sample, else sample photos")
    p.add_argument("--limit", type=cli_types.positive_int, help="only N images, spread over the folder")
    p.add_argument("--batch", type=cli_types.positive_int, help="images per batch (default 64)")
    p.add_argument("--workers", type=cli_types.nonneg_int, help="decode processes (default: every core; 0 = decode inline)")
    p.add_argument("--threads", type=cli_types.positive_int, help="inference threads (default: physical cores)")
    p.add_argument("--no-pipeline-parity", dest="pipeline_parity", action="store_false",
                   help="skip the OpenCV deploy-preprocessing pass on the first FP32 ONNX")
    p.add_argument("--fp32-max-rel-error", type=cli_types.nonneg_float, default=t.fp32_max_rel_error)
    p.add_argument("--fp32-min-agreement", type=cli_types.fraction, default=t.fp32_min_agreement)
    p.add_argument("--fp16-min-agreement", type=cli_types.fraction, default=t.fp16_min_agreement)
    p.add_argument("--int8-min-agreement", type=cli_types.fraction, default=t.int8_min_agreement)
    p.add_argument("--bf16-min-agreement", type=cli_types.fraction, default=t.bf16_min_agreement, help="for FP32 ONNX on ov-bf16")
    p.add_argument("--int8-bf16-min-agreement", type=cli_types.fraction, default=t.int8_bf16_min_agreement,
                   help="for the OpenVINO-calibrated INT8 ONNX on ov-int8-bf16 (float parts in bf16)")
    p.add_argument("--json", help="write the full report (every number, manifests, versions) here")
    p.add_argument("--markdown", help="write the markdown report here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("SCARLET_CACHE_DIR", "build")), metavar="DIR",
                   help="PyTorch reference logits are cached in DIR/reference/ (keyed by model, weights, "
                        "preprocessing and the image list) and the resume journal kept in DIR/verify-resume/ "
                        "(default: $SCARLET_CACHE_DIR, else build)")
    p.add_argument("--no-reference-cache", dest="reference_cache", action="store_false",
                   help="compute the PyTorch reference even when it is cached, and do not cache it")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run (Ctrl-C, SIGTERM, a killed process) of the same command from "
                        "its last completed chunk; the report equals an uninterrupted run's")
    p.add_argument("--chunk-images", type=cli_types.positive_int, default=256, metavar="N",
                   help="images per resume-journal chunk: the most an interruption loses (default: 256)")

    seed = p.add_argument_group(
        "SCARLET-NAS verify.py command line",
        "python3 verify.py --model Scarlet_A --device cpu --val-dataset-root ROOT --pretrained-path P runs here as "
        "scarlet verify with the same flags: PyTorch alone unless --onnx/--engine/--auto-onnx add backends, our full "
        "report, then the seed's 'Evaluate Result: Total: N<TAB>mTop1: X<TAB>mTop5: Y' line (percentages) from the "
        "PyTorch reference. Labels differ on purpose: each <wnid> folder gets its index in the sorted list of the "
        "1000 ImageNet-1k wnids, whereas the seed's ImageFolder numbers the folders present, which is right only "
        "on a complete 1000-class folder; on a partial folder the seed's own numbers are wrong and ours are not.")
    seed.add_argument("--val-dataset-root", type=Path, metavar="ROOT",
                      help="ROOT/valid/<wnid>/*.JPEG (what the seed's preprocess_val_dataset.sh makes); without "
                           "valid/, ROOT is read as --val-dir reads it")
    seed.add_argument("--pretrained-path", metavar="P", type=cli_types.input_file(".pth", as_path=False),
                      help="the same as --checkpoint: {'model_state': state_dict} (the SCARLET-NAS release) or a state_dict")
    seed.add_argument("--batch-size", type=cli_types.positive_int, metavar="N", help="the same as --batch")
    seed.add_argument("--device", choices=("cpu", "cuda"),
                      help="where the PyTorch reference runs (default cpu; the seed's default is cuda); "
                           "onnxruntime backends run on the CPU either way")
    seed.add_argument("--gpu-id", type=cli_types.nonneg_int, metavar="N",
                      help="the CUDA GPU of --device cuda (default 0; ignored on the CPU, as the seed does)")
    p.set_defaults(func=run)


def _one(ours: object, seeds: object, flags: str) -> object:
    """One value from our flag and the seed's spelling of it; both given and different is an error."""
    if ours is not None and seeds is not None and ours != seeds:
        raise ScarletError(f"{flags} disagree ({ours} and {seeds}); give one of them.")
    return seeds if seeds is not None else ours


def run(args: argparse.Namespace) -> int:
    from scarlet_deploy.runtime.core.report import write_reports

    seed_style = args.model in SEED_MODELS or any(getattr(args, f) is not None for f in SEED_FLAGS)
    root = args.val_dataset_root
    seed_val_dir = (root / "valid" if (root / "valid").is_dir() else root) if root is not None else None
    batch = _one(args.batch, args.batch_size, "--batch and --batch-size")
    cfg = VerifyConfig(
        model=SEED_MODELS.get(args.model, args.model), onnx=args.onnx, engines=args.engine, backends=args.backends,
        auto_onnx=args.auto_onnx,
        let=args.let, checkpoint=_one(args.checkpoint, args.pretrained_path, "--checkpoint and --pretrained-path"),
        seed=args.seed, val_dir=_one(args.val_dir, seed_val_dir, "--val-dir and --val-dataset-root"),
        limit=args.limit, batch=64 if batch is None else batch,
        workers=args.workers, threads=args.threads, pipeline_parity=args.pipeline_parity,
        thresholds=Thresholds(args.fp32_max_rel_error, args.fp32_min_agreement, args.fp16_min_agreement,
                              args.int8_min_agreement, args.bf16_min_agreement, args.int8_bf16_min_agreement),
        progress=not args.quiet, device=args.device or "cpu", gpu_id=args.gpu_id or 0, cache_dir=args.cache_dir,
        reference_cache=args.reference_cache, resume=args.resume, chunk_images=args.chunk_images,
        reference_only=seed_style)
    found = sorted(args.auto_onnx.glob(f"{cfg.model}*.onnx")) if args.auto_onnx and args.auto_onnx.is_dir() else []
    inputs = [("--onnx", o) for o in args.onnx] + [("--auto-onnx", o) for o in found] + \
        [("--engine", e) for e in args.engine] + [("--checkpoint", cfg.checkpoint)]
    # Before minutes of inference: never over a model being verified, each other, or the cache read back.
    cache = cfg.cache_dir
    check_outputs([("--json", args.json), ("--markdown", args.markdown)], inputs,
                  [("the reference cache", cache / "reference" if cache else None),
                   ("the resume journal", cache / "verify-resume" if cache else None)])
    report = verify(cfg)
    md = render_markdown(report)
    write_reports(report.as_dict(), md, args.json, args.markdown)
    print(md)
    for path in (args.json, args.markdown):
        if path:
            print(f"wrote {path}")
    line = seed_result_line(report) if seed_style else None
    if line:
        print(line)  # last, as the seed prints it: scripts that read its last line keep working
    return 0 if report.passed else 1
