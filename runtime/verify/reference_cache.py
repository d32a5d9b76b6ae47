"""PyTorch reference logits kept between verify runs, keyed by everything that determines them.

A new INT8 or FP16 model is checked against the same PyTorch logits as the last one; on
50,000 images recomputing them costs most of the run. An entry is a folder
`<root>/<model>[-let]-<digest>/` holding `logits.npy` (float32, (images, classes), one row
per image in dataset order; memory-mappable) and `meta.json` (the key, the logits' sha256,
the rows no pipeline could read, and when, where and how fast the reference was computed;
each of these is checked for its type and range when read back, as the logits are against their sha256).

The key: model and LET variant, the weights (checkpoint sha256, or seeded + seed + a hash
of the seeded tensors), the preprocessing (its parameters and its code), the model's code
and torch's version, and the ordered image list with each file's size and mtime. The
device is not in the key: CPU and GPU logits differ by float rounding, far below any gate
(meta.json records it). An entry is built in a `.partial-<digest>` folder beside it (kept
across an interrupted run so that `--resume` can finish it) and renamed into place complete;
a folder that fails any check is reported and ignored, never trusted.

Rows are written and read with pwrite/pread rather than through a memory map: mapped pages
count in the process's RSS, and 50,000 rows are 200 MB.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from scarlet_deploy.runtime.core.artifacts import write_json_atomic

FORMAT = 1  # bump when the layout or the meaning of a key field changes
DTYPE = np.dtype("<f4")
HASH_BLOCK = 1 << 22


@dataclass(frozen=True)
class ReferenceKey:
    model: str
    let: bool
    weights: str  # "sha256:<checkpoint>" or "seeded:seed=<n>:tensors=<sha256>"
    preprocess: dict[str, Any]
    code: str  # sha256 of the model's and the preprocessing's source files
    torch: str  # version: kernels change between releases
    images: int
    image_list_sha256: str  # ordered paths with size and mtime
    classes: int = 1000

    def as_json(self) -> dict[str, Any]:
        """The key as meta.json holds it (tuples become lists), for comparing with what was stored."""
        return json.loads(json.dumps(asdict(self)))

    def digest(self) -> str:
        text = json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def folder_name(self) -> str:
        return f"{self.model}{'-let' if self.let else ''}-{self.digest()[:20]}"


def image_list_sha256(paths: Iterable[os.PathLike | str]) -> str:
    """The ordered list with each file's size and mtime (through symlinks): an edited, replaced,
    added or removed image changes it. Content hashes would be exact but read 6 GB per run."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{os.fspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError as e:
            h.update(f"{os.fspath(p)}\0missing:{e.errno}\n".encode())
    return h.hexdigest()


def sources_sha256(paths: Iterable[os.PathLike | str]) -> str:
    h = hashlib.sha256()
    for p in sorted({os.fspath(p) for p in paths}):
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def _file_digest_and_finite(path: Path, offset: int, nbytes: int) -> tuple[str, bool]:
    h, finite = hashlib.sha256(), True
    rowbytes = DTYPE.itemsize
    with open(path, "rb") as f:
        f.seek(offset)
        left = nbytes
        while left:
            block = f.read(min(HASH_BLOCK, left))
            if not block:
                break
            h.update(block)
            whole = len(block) - len(block) % rowbytes
            finite = finite and bool(np.isfinite(np.frombuffer(block[:whole], DTYPE)).all())
            left -= len(block)
    return h.hexdigest(), finite and left == 0


def _runs(positions: np.ndarray) -> list[tuple[int, int, int]]:
    """(first position, count, index into `positions`) of each run of consecutive positions."""
    if not len(positions):
        return []
    cuts = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(positions)]])
    return [(int(positions[s]), int(e - s), int(s)) for s, e in zip(starts, ends)]


class _Rows:
    """Rows of an .npy file by position, through the file descriptor."""

    def __init__(self, path: Path, images: int, classes: int, writable: bool):
        self.path, self.images, self.classes = path, images, classes
        if writable and not path.exists():
            with open(path, "wb") as f:  # a sparse file: rows not written yet read as zeros
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(DTYPE),
                                                         "fortran_order": False, "shape": (images, classes)})
                f.truncate(f.tell() + images * classes * DTYPE.itemsize)
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if shape != (images, classes) or fortran or dtype != DTYPE:
            raise ValueError(f"holds {dtype} {shape}, not float32 ({images}, {classes})")
        self.rowbytes = classes * DTYPE.itemsize
        want = self.offset + images * self.rowbytes
        if os.path.getsize(path) != want:
            raise ValueError(f"is {os.path.getsize(path)} bytes, not {want} (truncated?)")
        self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)

    def read(self, positions: Sequence[int]) -> np.ndarray:
        positions = np.asarray(positions, np.int64)
        out = np.empty((len(positions), self.classes), DTYPE)
        if len(positions) and np.all(np.diff(positions) > 0):
            for first, count, at in _runs(positions):
                data = os.pread(self.fd, count * self.rowbytes, self.offset + first * self.rowbytes)
                out[at:at + count] = np.frombuffer(data, DTYPE).reshape(count, self.classes)
        else:
            for i, p in enumerate(positions):
                out[i] = np.frombuffer(os.pread(self.fd, self.rowbytes, self.offset + int(p) * self.rowbytes), DTYPE)
        return out

    def write(self, positions: Sequence[int], logits: np.ndarray) -> None:
        logits = np.ascontiguousarray(logits, DTYPE)
        for i, p in enumerate(positions):
            os.pwrite(self.fd, logits[i].tobytes(), self.offset + int(p) * self.rowbytes)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def check_info(meta: dict[str, Any], images: int) -> None:
    """What a report takes from meta.json besides the logits, each of the type and range it must have
    (ValueError saying which is not): a negative or NaN images/s would print a negative projected time,
    a string one would fail deep in the report."""
    skipped = meta.get("skipped")
    if not isinstance(skipped, dict):
        raise ValueError(f"meta.json's skipped is {skipped!r}, not its table of unreadable images")
    for k, v in skipped.items():
        if not (k.isascii() and k.isdigit() and int(k) < images and isinstance(v, str)):
            raise ValueError(f"meta.json's skipped (unreadable images) holds {k!r}: {v!r}, not an image index below "
                             f"{images} with a reason")
    rate = meta.get("images_per_s")
    if rate is not None and not (isinstance(rate, (int, float)) and not isinstance(rate, bool)
                                 and math.isfinite(rate) and rate > 0):
        raise ValueError(f"meta.json's images_per_s is {rate!r}, not a positive finite number")
    for field in ("created", "device", "machine", "torch"):
        if meta.get(field) is not None and not isinstance(meta[field], str):
            raise ValueError(f"meta.json's {field} is {meta[field]!r}, not text")


class CachedReference:
    """A complete, checked entry: rows of PyTorch logits by dataset position."""

    def __init__(self, folder: Path, meta: dict[str, Any], rows: _Rows):
        self.folder, self.meta, self._rows = folder, meta, rows
        self.skipped = {int(k): v for k, v in meta["skipped"].items()}

    def logits(self, positions: Sequence[int]) -> np.ndarray:
        return self._rows.read(positions)

    def close(self) -> None:
        self._rows.close()


class ReferenceWriter:
    """Fills a `.partial-<digest>` folder row by row; `commit` checks it and renames it into place.

    Holds an exclusive lock on the folder so that two runs never fill one entry.
    """

    def __init__(self, cache: "ReferenceCache", key: ReferenceKey, keep_rows: bool):
        self.cache, self.key = cache, key
        self.folder = cache.root / f".partial-{key.folder_name}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lock)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BlockingIOError(f"another verify is filling {self.folder}") from None
            raise
        logits = self.folder / "logits.npy"
        if not keep_rows:
            logits.unlink(missing_ok=True)
        self.kept_rows = logits.exists()  # rows an interrupted run wrote, for --resume to keep
        try:
            self._rows = _Rows(logits, key.images, key.classes, writable=True)
        except (OSError, ValueError):
            logits.unlink(missing_ok=True)
            self.kept_rows = False
            self._rows = _Rows(logits, key.images, key.classes, writable=True)

    def write(self, positions: Sequence[int], logits: np.ndarray) -> None:
        self._rows.write(positions, logits)

    def sync(self) -> None:
        """Rows on disk before the journal says they are done: a crash then never loses a row the journal claims."""
        self._rows.sync()

    def commit(self, skipped: dict[int, str], info: dict[str, Any]) -> CachedReference:
        self._rows.sync()
        rows = self._rows
        sha, finite = _file_digest_and_finite(rows.path, rows.offset, self.key.images * rows.rowbytes)
        if not finite:
            raise ValueError("the reference logits hold NaN or Inf")
        meta = {"format": FORMAT, "digest": self.key.digest(), "key": self.key.as_json(), "logits_sha256": sha,
                "skipped": {str(k): v for k, v in sorted(skipped.items())},
                "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **info}
        write_json_atomic(self.folder / "meta.json", meta)
        final = self.cache.root / self.key.folder_name
        if final.exists():  # a corrupt entry this run was told to replace, or one a parallel run finished
            shutil.rmtree(final)
        os.rename(self.folder, final)
        self.close()
        entry, _ = self.cache.lookup(self.key)
        if entry is None:
            raise ValueError(f"{final} failed its own check after writing")
        return entry

    def close(self) -> None:
        self._rows.close()
        if self._lock >= 0:
            os.close(self._lock)  # releases the flock
            self._lock = -1

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class ReferenceCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def lookup(self, key: ReferenceKey) -> tuple[CachedReference | None, str | None]:
        """The entry for `key` when it exists and passes every check; else None and, for a bad one, why."""
        folder = self.root / key.folder_name
        if not folder.is_dir():
            return None, None
        try:
            try:
                meta = json.loads((folder / "meta.json").read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"its meta.json is not JSON ({e})") from None
            if not isinstance(meta, dict):
                raise ValueError(f"its meta.json holds a {type(meta).__name__}, not an object")
            if meta.get("format") != FORMAT or meta.get("digest") != key.digest() or meta.get("key") != key.as_json():
                raise ValueError("its meta.json is for another key or format")
            rows = _Rows(folder / "logits.npy", key.images, key.classes, writable=False)
            sha, finite = _file_digest_and_finite(rows.path, rows.offset, key.images * rows.rowbytes)
            if sha != meta.get("logits_sha256"):
                rows.close()
                raise ValueError("logits.npy does not match the sha256 in meta.json (changed or damaged)")
            if not finite:
                rows.close()
                raise ValueError("logits.npy holds NaN or Inf")
            try:
                check_info(meta, key.images)
            except ValueError:
                rows.close()
                raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            return None, f"ignored the cached reference in {folder}: {e}; recomputing it"
        return CachedReference(folder, meta, rows), None

    def writer(self, key: ReferenceKey, keep_rows: bool) -> ReferenceWriter:
        return ReferenceWriter(self, key, keep_rows)
