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

from scarlet_deploy.runtime.core.artifacts import is_stream, manifest_path, special_file
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
    for target in (out, *map(Path, companions)):
        if is_stream(target):
            if target is out and not list(companions):
                return out  # a report written through to stdout (or discarded): nothing is renamed there
            raise ScarletError(f"{flag} {out} is a stream, but this output is a file with companions "
                               f"({', '.join(str(c) for c in companions)}); pass the path of a regular file.")
        what = special_file(target)
        if what:
            raise ScarletError(f"{flag} {target} is {what}, not a regular file; scarlet writes a file beside it and "
                               "renames it into place, which would replace it. Pass the path of a regular file "
                               "(a report may also go to /dev/stdout).")
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


def check_outputs(outputs: Iterable[tuple[str, PathLike | None]], inputs: Iterable[tuple[str, PathLike | None]] = (),
                  protected: Iterable[tuple[str, PathLike | None]] = ()) -> list[Path]:
    """The output policy of every command that writes, checked before any work: each output passes
    `check_output`; no two outputs (flag, path) are one file (the second would silently replace the first);
    none lies inside a `protected` folder (flag, dir), such as the reference cache, whose files the command
    reads back. Streams (/dev/stdout) may be shared. None/empty outputs are skipped."""
    inputs = list(inputs)
    outs = [(flag, Path(p).expanduser()) for flag, p in outputs if p is not None and str(p) != ""]
    for flag, out in outs:
        check_output(out, inputs, flag)
        for name, d in protected:
            if d is not None and Path(d).is_dir() and os.path.realpath(out).startswith(os.path.realpath(d) + os.sep):
                raise ScarletError(f"{flag} {out} lies inside {name} {d}, whose files scarlet reads back; an output "
                                   "there would corrupt it. Pass a path outside it.")
    for i, (flag_a, a) in enumerate(outs):
        for flag_b, b in outs[i + 1:]:
            if not is_stream(a) and same_file(a, b):
                raise ScarletError(f"{flag_a} and {flag_b} are both {a}: the second write would replace the first. "
                                   "Pass a different path to each.")
    return [o for _, o in outs]
