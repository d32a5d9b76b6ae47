"""Output paths checked before any work starts: never one of the command's inputs, and writable.

A writer that discovers after minutes of work that its output is a directory, sits on a
read-only file system, or is the very file it read, either crashes or destroys its input.
Every command runs `check_output` on each output it will write, before loading anything.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from scarlet_deploy.runtime.core.artifacts import manifest_path
from scarlet_deploy.runtime.core.errors import ScarletError

PathLike = str | os.PathLike


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when `a` and `b` name one file: hard links and symlinks included (samefile), or,
    where one of them does not exist yet, when they resolve to the same path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output(output: PathLike, inputs: Iterable[tuple[str, PathLike | None]] = (), flag: str = "-o/--output",
                 companions: Iterable[PathLike] = ()) -> Path:
    """Refuse `output` (and `companions`, files written beside it such as its manifest) when it is one of
    `inputs` ((flag, path) pairs; None entries ignored), a directory, or in a place nothing can be written.

    Probes writability by creating (and at once removing) an anonymous temporary file in the
    nearest existing folder: access() says yes to root on a read-only mount, the probe does not.
    """
    out = Path(output).expanduser()
    inputs = [(name, src) for name, src in inputs if src is not None and str(src) != ""]
    # An input's manifest belongs to it: overwriting model.onnx.json loses the model's provenance.
    inputs += [(f"{name} (its manifest)", manifest_path(src)) for name, src in inputs]
    for target in (out, *map(Path, companions)):
        for name, src in inputs:
            if same_file(target, src):
                raise ScarletError(f"{flag} {out} would overwrite the input {name} {src}: an output must never replace "
                                   "what the command reads. Pass another output path.")
    if out.is_dir():
        raise ScarletError(f"{flag} {out} is a directory; pass the path of a file to write (inside it, for example).")
    folder = _existing_ancestor(out)
    if not folder.is_dir():
        raise ScarletError(f"{flag} {out} cannot be created: {folder} is a file, not a folder. Pass a path in a folder.")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ScarletError(f"{flag} {out} cannot be written: {folder} is not writable ({e.strerror or e}). "
                           "Pass an output path in a folder you can write to.") from None
    return out
