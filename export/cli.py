"""`scarlet export` and `scarlet export-all` (what `make export` runs)."""
from __future__ import annotations

import argparse
from pathlib import Path

from scarlet_deploy.runtime.core import cli_types


def _batch(text: str) -> str:
    return text if text == "dynamic" else str(cli_types.positive_int(text))


def _exporter_args(p: argparse.ArgumentParser) -> None:
    from scarlet_deploy.export.opsets import DEFAULT_EXPORTER, EXPORTERS, MAX_OPSET, MIN_OPSET, OPSETS

    p.add_argument("--exporter", choices=EXPORTERS, default=DEFAULT_EXPORTER,
                   help="dynamo (torch.export, default) or torchscript (deprecated by PyTorch; the reference dynamo "
                        "is checked against)")
    p.add_argument("--opset", type=cli_types.int_range(MIN_OPSET, MAX_OPSET), default=None,
                   help="ONNX opset; " + "; ".join(f"{e}: {lo}-{hi}, default {d}" for e, (lo, hi, d) in OPSETS.items()))


def register(sub: argparse._SubParsersAction) -> None:
    from scarlet_deploy.export.registry import MODELS

    p = sub.add_parser("export", help="export one model to simplified ONNX (+ manifest)")
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--let", action="store_true", help="the network with a LET in every identity slot")
    p.add_argument("--checkpoint", type=cli_types.input_file(".pth", as_path=False), help="PyTorch checkpoint (.pth/.pth.tar); default: shipped or seeded weights")
    _exporter_args(p)
    p.add_argument("--batch", type=_batch, default="dynamic", help="'dynamic' (default) or a fixed batch size")
    p.add_argument("--seed", type=cli_types.seed, default=0, help="seed for weights when no checkpoint is given")
    p.add_argument("-o", "--output", required=True, type=Path)
    p.set_defaults(func=run_export)

    p = sub.add_parser("export-all", help="export several models into a folder and print a summary table")
    p.add_argument("--models", nargs="+", default=["scarlet_a", "scarlet_b", "scarlet_c"], choices=sorted(MODELS))
    p.add_argument("--let", action="store_true")
    p.add_argument("--checkpoint", type=cli_types.input_file(".pth", as_path=False), help="only with a single model")
    _exporter_args(p)
    p.add_argument("--out-dir", type=Path, default=Path("build"))
    p.set_defaults(func=run_export_all)


def _export(model: str, let: bool, checkpoint: str | None, opset: int | None, batch: str, seed: int, output: Path,
            exporter: str):
    from scarlet_deploy.export.onnx_export import ExportConfig, export_model

    report = export_model(ExportConfig(model, output, let, checkpoint, opset, batch, seed, exporter))
    m = report.manifest
    if not m["pretrained"]:
        print(f"WARNING: {model} uses seeded weights, NOT PRETRAINED: accuracy numbers are meaningless; pass --checkpoint.")
    return report


def run_export(args: argparse.Namespace) -> int:
    r = _export(args.model, args.let, args.checkpoint, args.opset, args.batch, args.seed, args.output, args.exporter)
    m = r.manifest
    print(f"wrote {r.output} ({r.output.stat().st_size / 1e6:.1f} MB) and {r.output.name}.json "
          f"({m['exporter']} exporter, opset {m['opset']})")
    print(f"  weights: {m['weights_source']}")
    print(f"  ops: {', '.join(f'{k} {v}' for k, v in m['ops'].items())}")
    for f in m["lets"]:
        print(f"  LET slot {f['slot']}: {'folded (' + f['case'] + ') into ' + f['absorbed_by'] if f['folded'] else 'kept as a 1x1 conv (condition number %.3g)' % f['condition_number']}")
    p = m["parity"]
    print(f"  parity vs PyTorch on {p['source']}: max abs {p['max_abs_error']:.2e}, relative {p['max_rel_error']:.2e}, top-1 agreement {p['top1_agreement']:.0%}")
    return 0


def run_export_all(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from scarlet_deploy.runtime.core.errors import ScarletError
    from scarlet_deploy.runtime.core.report import markdown_table

    if args.checkpoint and len(args.models) != 1:
        raise ScarletError("--checkpoint belongs to one model; pass a single --models NAME with it.")
    rows = []
    for name in tqdm(args.models, desc="export", unit="model"):
        out = args.out_dir / f"{name}{'-let' if args.let else ''}.onnx"
        m = _export(name, args.let, args.checkpoint, args.opset, "dynamic", 0, out, args.exporter).manifest
        p = m["parity"]
        rows.append([str(out), "yes" if m["pretrained"] else "NO (seeded)", m["ops"].get("Conv", 0),
                     m["fused"].get("HardSwish", 0) + m["fused"].get("HardSigmoid", 0),
                     f"{out.stat().st_size / 1e6:.1f} MB", f"{p['max_rel_error']:.1e}", f"{p['top1_agreement']:.0%}", f"{m['export_seconds']:.0f} s"])
    print()
    print(markdown_table(["ONNX", "pretrained", "Conv", "fused h-act", "size", "rel. logit err", "top-1 agree", "time"], rows))
    return 0
