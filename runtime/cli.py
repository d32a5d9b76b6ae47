"""`scarlet`: a thin command-line layer over the library.

Each sub-command lives in the module that owns its work and exposes
`register(subparsers)`; those modules import torch/onnx lazily so `--help` is fast.
A ScarletError becomes a one-paragraph message and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import textwrap

from scarlet_deploy.runtime.core.errors import ScarletError

COMMAND_MODULES = (
    "scarlet_deploy.export.cli",
    "scarlet_deploy.runtime.predict",
    "scarlet_deploy.runtime.verify.cli",
    "scarlet_deploy.calib.cli",
    "scarlet_deploy.runtime.tensorrt_cli",
    "scarlet_deploy.runtime.bench.cli",
    "scarlet_deploy.runtime.profile",
    "scarlet_deploy.runtime.doctor",
    "scarlet_deploy.runtime.gpu_check",
    "scarlet_deploy.runtime.serve.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scarlet", description="Deploy SCARLET-NAS classifiers: export, calibrate, verify, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # Ctrl-C while the parser imports the command modules (torch, onnx) is an interruption too
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except ScarletError as e:
        # Paths are never broken at their hyphens or slashes: a wrapped message still names the file exactly.
        print(textwrap.fill(f"error: {e}", width=100, break_on_hyphens=False, break_long_words=False), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was left half-written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
