"""argparse types that refuse out-of-range numbers while parsing.

A bad number is a usage error: argparse prints the usage line and `argument --x: ...` and exits
with status 2 before anything is loaded. Each type raises ArgumentTypeError, whose message
argparse shows as it is. NaN and infinities are refused wherever a float is expected: a
threshold of NaN makes every `x <= threshold` comparison False (or, negated, True).
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, TypeVar

T = TypeVar("T")

# numpy's, torch's and random's generators all accept seeds in [0, 2**32): one range for every command.
MAX_SEED = 2**32 - 1


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer in [lo, hi] (hi None: no upper bound)."""
    def parse(text: str) -> int:
        v = _int(text)
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range: expected {lo} <= N" + (f" <= {hi}" if hi is not None else ""))
        return v

    parse.__name__ = f"integer in [{lo}, {hi if hi is not None else 'inf'}]"
    return parse


def float_range(lo: float, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    """A finite float in [lo, hi] ((lo, hi] with lo_open)."""
    def parse(text: str) -> float:
        v = _float(text)
        if v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
            left = "<" if lo_open else "<="
            raise argparse.ArgumentTypeError(f"{v:g} is out of range: expected {lo:g} {left} x" + (f" <= {hi:g}" if hi is not None else ""))
        return v

    return parse


positive_int = int_range(1)
port = int_range(1, 65535)
nonneg_int = int_range(0)
seed = int_range(0, MAX_SEED)
finite_float = float_range(-math.inf)
nonneg_float = float_range(0.0)
positive_float = float_range(0.0, lo_open=True)
fraction = float_range(0.0, 1.0)  # agreement thresholds as fractions (0.99)
percent = float_range(0.0, 100.0)  # agreement and top-1 budgets in percent (97.0)


def csv_of(kind: Callable[[str], T]) -> Callable[[str], list[T]]:
    """A comma-separated, non-empty list, each item parsed by `kind` (e.g. csv_of(positive_int))."""
    def parse(text: str) -> list[T]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r} is empty: expected a comma-separated list")
        return [kind(t) for t in items]

    return parse


def input_file(suffix: str = "", as_path: bool = True) -> Callable[[str], "Path | str"]:
    """A file a command reads, refused while parsing when it cannot be one: a folder (naming the
    `suffix` files it holds), a symbolic link loop, a link to nothing, a FIFO, device or socket. A
    path that does not exist passes: the command says how to create the file it wants."""
    import errno
    import os
    import stat
    from pathlib import Path

    def parse(text: str) -> "Path | str":
        try:
            st = os.stat(text)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise argparse.ArgumentTypeError(f"{text} is a symbolic link loop (following it leads back to a link "
                                                 "already followed); pass the file itself") from None
            if e.errno == errno.ENOENT and os.path.islink(text):
                raise argparse.ArgumentTypeError(f"{text} is a symbolic link to {os.readlink(text)}, which does not "
                                                 "exist; pass the file itself") from None
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise argparse.ArgumentTypeError(f"{text} cannot be read ({e.strerror})") from None
            return Path(text) if as_path else text
        if stat.S_ISDIR(st.st_mode):
            inside = sorted(p.name for p in Path(text).glob(f"*{suffix}"))[:3] if suffix else []
            hint = f" such as {', '.join(inside)}" if inside else ""
            raise argparse.ArgumentTypeError(f"{text} is a folder, not a file; pass the {suffix or 'input'} file inside "
                                             f"it{hint}")
        if not stat.S_ISREG(st.st_mode):
            raise argparse.ArgumentTypeError(f"{text} is not a regular file (a FIFO, device or socket); pass a file")
        return Path(text) if as_path else text

    parse.__name__ = f"{suffix or 'input'} file"
    return parse
