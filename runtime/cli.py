"""`scarlet`: a thin command-line layer over the library.

Each sub-command lives in the module that owns its work and exposes
`register(subparsers)`; those modules import torch/onnx lazily so `--help` is fast.
A ScarletError becomes a one-paragraph message and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import signal
import sys
import textwrap
import threading

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
    "scarlet_deploy.runtime.deploy.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scarlet", description="Deploy SCARLET-NAS classifiers: export, calibrate, verify, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


# What an OS error means for the user, by errno; anything else is named by its strerror.
_OS_HINTS = {
    errno.ENOSPC: "the disk is full; free space there or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted; free space there or write elsewhere",
    errno.EROFS: "that file system is read-only; pass output paths (and --cache-dir) on a writable one",
    errno.EACCES: "permission denied; pass paths you can read (inputs) and write (outputs)",
    errno.EPERM: "the operation is not permitted; pass paths you can read (inputs) and write (outputs)",
    errno.ENAMETOOLONG: "a file name is over 255 bytes or a path over 4096; pass a shorter one",
    errno.EMFILE: "too many open files; raise `ulimit -n` or use fewer --workers",
    errno.EEXIST: "a file is where a folder is needed (-o of `scarlet triton` names a folder); pass another path",
    errno.ENOTDIR: "a file is where a folder is needed; pass a path whose parents are folders",
    errno.ENOMEM: "the system is out of memory; lower --batch (or --workers) and retry",
}


def _os_error(e: OSError) -> str:
    where = " ".join(f"{f}" for f in (e.filename, e.filename2) if f is not None)
    hint = _OS_HINTS.get(e.errno, "check the path and retry")
    return f"{e.strerror or e}{f' ({where})' if where else ''}: {hint}. Nothing was left half-written."


def _sigterm(signum, _frame) -> None:
    # SIGTERM (kill, a CI timeout, systemd) stops a command exactly as Ctrl-C does: every clean-up that runs
    # on KeyboardInterrupt (temporary folders, partial files, journals) runs for it too.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _sigterm) if in_main_thread else None
    try:  # Ctrl-C while the parser imports the command modules (torch, onnx) is an interruption too
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except ScarletError as e:
        message = str(e)
    except OSError as e:  # the one place an OS refusal (full disk, read-only, too long a name) becomes a paragraph
        message = _os_error(e)
    except MemoryError as e:
        message = (f"not enough memory for the requested sizes ({e or 'an allocation failed'}); lower --batch "
                   "(or --limit, --workers, the number of images) and retry.")
    except KeyboardInterrupt:
        print("interrupted; nothing was left half-written.", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    # Paths are never broken at their hyphens or slashes: a wrapped message still names the file exactly.
    print(textwrap.fill(f"error: {message}", width=100, break_on_hyphens=False, break_long_words=False), file=sys.stderr)
    return 2

if __name__ == "__main__":
    sys.exit(main())
