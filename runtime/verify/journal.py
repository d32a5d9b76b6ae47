"""The resume journal of a verify run: per-image result rows, one atomic file per completed chunk.

A run writes `<root>/<digest>/run.json` (what the run is: dataset, weights, backends) and,
after every chunk of images, `chunk-<n>.npz` with the rows of the images that chunk finished
(columns of equal length, `pos` = the image's index in the dataset). Each file is renamed into
place complete, so whatever kills the run (Ctrl-C, SIGTERM, SIGKILL, a crash) leaves only
whole chunks. `--resume` loads them, runs only the images they lack, and builds the report
from all rows in dataset order: the numbers are those of an uninterrupted run. A chunk file
that does not load is dropped with a note and its images are run again.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from scarlet_deploy.runtime.core.artifacts import atomic_path, write_json_atomic

FORMAT = 1


def run_digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **identity}, sort_keys=True).encode()).hexdigest()


class Journal:
    def __init__(self, root: str | Path | None, identity: dict[str, Any], resume: bool):
        """Open the journal of the run `identity` describes: with `resume`, keep the chunks an
        interrupted run left; without, start it empty. `notes` says what happened.
        `root` None: rows are kept in memory only (a library call that asked for no files)."""
        self.identity = json.loads(json.dumps(identity))  # as run.json stores it
        self.digest = run_digest(self.identity)
        self.folder = Path(root) / self.digest[:24] if root is not None else None
        self.notes: list[str] = []
        self.chunks: list[dict[str, np.ndarray]] = []
        self.resumed_images = 0
        if self.folder is None:
            self._next = 1
            return
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
        if stored.get("digest") != self.digest:
            self.notes.append(f"--resume: {self.folder} belongs to another run; starting from the first image")
            return
        for path in sorted(self.folder.glob("chunk-*.npz")):
            try:
                with np.load(path, allow_pickle=False) as z:
                    chunk = {k: z[k] for k in z.files}
                n = len(chunk["pos"])
                if any(len(v) != n for k, v in chunk.items() if v.ndim) or int(chunk["chunk"]) != int(path.stem[6:]):
                    raise ValueError("columns of unequal length")
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
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
        keys = self.chunks[0].keys()
        out = {}
        for k in keys:
            parts = [c[k] for c in self.chunks]
            out[k] = np.concatenate(parts) if parts[0].ndim else np.sum(parts, dtype=np.float64)
        order = np.argsort(out["pos"], kind="stable")
        return {k: (v[order] if np.ndim(v) else v) for k, v in out.items() if k != "chunk"}

    def finish(self) -> None:
        """The run is complete: the journal has served."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
