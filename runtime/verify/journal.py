"""The resume journal of a verify run: per-image result rows, one atomic file per completed chunk.

A run writes `<root>/<digest>/run.json` (what the run is: dataset, weights, backends) and,
after every chunk of images, `chunk-<n>.npz` with the rows of the images that chunk finished
(columns of equal length, `pos` = the image's index in the dataset). Each file is renamed into
place complete, so whatever kills the run (Ctrl-C, SIGTERM, SIGKILL, a crash) leaves only
whole chunks. `--resume` loads them, runs only the images they lack, and builds the report
from all rows in dataset order: the numbers are those of an uninterrupted run. A chunk file
that does not load is dropped with a note and its images are run again.

Nothing read back is trusted unchecked: each chunk carries the sha256 of its columns (names,
types, shapes, bytes) and of the run it belongs to, as the reference cache's meta.json carries
its logits' sha256, so an edited value, a missing column or a chunk copied from another run is
dropped with a note and recomputed. A run holds an flock on `<digest>.lock` (holding its pid)
beside its folder while it runs: a second run of the same check is refused, naming the pid,
instead of clearing the first's live journal as an interrupted one.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from scarlet_deploy.runtime.core.artifacts import atomic_path, write_json_atomic
from scarlet_deploy.runtime.core.errors import ScarletError

FORMAT = 2  # 2: chunks carry a sha256, runs hold a lock
CHECKSUM = "sha256"


def run_digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **identity}, sort_keys=True).encode()).hexdigest()


def chunk_sha256(run: str, chunk: dict[str, np.ndarray]) -> str:
    """Of every column but the checksum itself: name, type, shape and bytes, and the run's digest."""
    h = hashlib.sha256(run.encode())
    for k in sorted(chunk):
        if k != CHECKSUM:
            v = np.ascontiguousarray(chunk[k])
            h.update(f"\0{k}\0{v.dtype.str}\0{v.shape}\0".encode())
            h.update(v.tobytes())
    return h.hexdigest()


class _RunLock:
    """An exclusive flock on `path` for as long as the run lives, with the holder's pid in the file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                try:
                    pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                finally:
                    os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise BlockingIOError(pid) from None
                raise
            try:  # the holder before us may have removed the file after we opened it: lock the one on disk
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd >= 0:
            self.path.unlink(missing_ok=True)  # while still held: a run that opened it before re-checks the inode (above)
            os.close(self.fd)
            self.fd = -1


class Journal:
    def __init__(self, root: str | Path | None, identity: dict[str, Any], resume: bool,
                 columns: Iterable[str] | None = None):
        """Open the journal of the run `identity` describes: with `resume`, keep the chunks an
        interrupted run left; without, start it empty. `notes` says what happened. `columns`: the
        names every chunk holds (rows and per-chunk totals); a stored chunk with others is dropped.
        `root` None: rows are kept in memory only (a library call that asked for no files).
        Raises ScarletError when another live run holds this journal; `close` (or `finish`) releases it."""
        self.identity = json.loads(json.dumps(identity))  # as run.json stores it
        self.digest = run_digest(self.identity)
        self.folder = Path(root) / self.digest[:24] if root is not None else None
        self.columns_expected = None if columns is None else {*columns, "chunk", CHECKSUM}
        self.notes: list[str] = []
        self.chunks: list[dict[str, np.ndarray]] = []
        self.resumed_images = 0
        self._lock: _RunLock | None = None
        if self.folder is None:
            self._next = 1
            return
        try:
            self._lock = _RunLock(self.folder.with_name(self.folder.name + ".lock"))
        except BlockingIOError as e:
            # Refused, not waited for: the other run computes this very report, and a wait behind a
            # stalled run would look like a hang. Its journal is left exactly as it is.
            raise ScarletError(
                f"another verify (pid {e}) is running this same check right now, with its resume journal in "
                f"{self.folder}; wait for it to finish (its report is the one this run would make), or stop it "
                f"(kill {e}) and rerun with --resume to continue from its last chunk.") from None
        if resume:
            self._load()
        elif done := sum(1 for _ in self.folder.glob("chunk-*.npz")):
            self.notes.append(f"started over: an interrupted run of this same check had {done} chunk(s) in "
                              f"{self.folder}; add --resume to continue one instead")
        if not self.chunks:
            shutil.rmtree(self.folder, ignore_errors=True)
            write_json_atomic(self.folder / "run.json", {"format": FORMAT, "digest": self.digest, **self.identity})
        self._next = 1 + max((int(c["chunk"]) for c in self.chunks), default=0)

    def _load(self) -> None:
        try:
            stored = json.loads((self.folder / "run.json").read_text())
        except FileNotFoundError:
            self.notes.append("--resume: no interrupted run of this check was found; starting from the first image")
            return
        except (OSError, json.JSONDecodeError) as e:
            self.notes.append(f"--resume: {self.folder / 'run.json'} is unreadable ({e}); starting from the first image")
            return
        if not isinstance(stored, dict) or stored.get("digest") != self.digest:
            self.notes.append(f"--resume: {self.folder} belongs to another run; starting from the first image")
            return
        for path in sorted(self.folder.glob("chunk-*.npz")):
            try:
                with np.load(path, allow_pickle=False) as z:
                    chunk = {k: z[k] for k in z.files}
                if CHECKSUM not in chunk or str(chunk[CHECKSUM]) != chunk_sha256(self.digest, chunk):
                    raise ValueError("its sha256 does not match its contents (edited, damaged or from another run)")
                if self.columns_expected is not None and set(chunk) != self.columns_expected:
                    missing = sorted(self.columns_expected - set(chunk))
                    extra = sorted(set(chunk) - self.columns_expected)
                    raise ValueError(f"columns differ from this run's (missing {missing}, unexpected {extra})")
                n = len(chunk["pos"])
                if any(len(v) != n for k, v in chunk.items() if v.ndim) or int(chunk["chunk"]) != int(path.stem[6:]):
                    raise ValueError("columns of unequal length")
            except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as e:
                self.notes.append(f"--resume: dropped {path.name} ({type(e).__name__}: {e}); its images run again")
                path.unlink(missing_ok=True)
                continue
            self.chunks.append(chunk)
        self.resumed_images = sum(len(c["pos"]) for c in self.chunks)
        if self.chunks:
            self.notes.append(f"resumed: {self.resumed_images} images from {len(self.chunks)} chunk(s) of an "
                              f"interrupted run ({self.folder})")

    def done_positions(self) -> set[int]:
        return {int(p) for c in self.chunks for p in c["pos"]}

    def append(self, rows: dict[str, np.ndarray], scalars: dict[str, float]) -> None:
        """One completed chunk: `rows` (equal-length columns, with `pos`) and per-chunk totals such as seconds."""
        chunk = {**{k: np.asarray(v) for k, v in rows.items()},
                 **{k: np.asarray(v, np.float64) for k, v in scalars.items()}, "chunk": np.asarray(self._next)}
        chunk[CHECKSUM] = np.asarray(chunk_sha256(self.digest, chunk))
        self._next += 1
        if self.folder is None:
            self.chunks.append(chunk)
            return
        with atomic_path(self.folder / f"chunk-{int(chunk['chunk']):06d}.npz") as tmp:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temporary's name
                np.savez(f, **chunk)
        self.chunks.append(chunk)

    def columns(self) -> dict[str, np.ndarray]:
        """Every row so far, sorted by dataset position; per-chunk scalars summed."""
        if not self.chunks:
            return {}
        keys = [k for k in self.chunks[0] if k not in ("chunk", CHECKSUM)]
        out = {}
        for k in keys:
            parts = [c[k] for c in self.chunks]
            out[k] = np.concatenate(parts) if parts[0].ndim else np.sum(parts, dtype=np.float64)
        order = np.argsort(out["pos"], kind="stable")
        return {k: (v[order] if np.ndim(v) else v) for k, v in out.items()}

    def close(self) -> None:
        """The run stops (completed or not): another may open this journal. Its chunks stay for --resume."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def finish(self) -> None:
        """The run is complete: the journal has served."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def discard(self) -> None:
        """Nothing this run did is worth resuming (no image could be read): as `finish`."""
        self.finish()
