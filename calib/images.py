"""Which images calibrate and which evaluate: a seeded, class-spread, disjoint split.

Labels come from runtime.dataset (the one reader of ImageNet layouts: <wnid>/ folders, flat
ILSVRC files with LOC_val_solution.csv or the devkit); calibration itself needs none, so any
other folder of images is accepted, unlabelled (accuracy budgets then use agreement only)."""
from __future__ import annotations

import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.data.preprocess import Preprocess


@dataclass(frozen=True)
class ImageSplit:
    calib: tuple[Path, ...]
    eval: tuple[Path, ...]
    eval_labels: tuple[int, ...]  # ImageNet-1k index per evaluation image; -1: unknown


def _images(root: str | os.PathLike) -> dict[Path, int]:
    """Image -> ImageNet-1k label (-1 where the folder layout gives none)."""
    from scarlet_deploy.runtime.data.dataset import open_dataset
    from scarlet_deploy.runtime.data.images import list_images

    if not Path(root).is_dir():
        raise ScarletError(f"image directory {root} does not exist; pass --images DIR with ImageNet-style <wnid>/*.JPEG "
                           "folders (or flat ILSVRC2012_val_*.JPEG with LOC_val_solution.csv).")
    try:
        return {it.path: it.label for it in open_dataset(root).items}
    except ScarletError:
        files = list_images(root)
    if not files:
        raise ScarletError(f"{root} holds no images (.jpeg/.jpg/.png/...); pass a folder of <wnid>/ sub-folders.")
    return {f: -1 for f in files}


def sample_across_classes(files: dict[Path, int], n: int, seed: int) -> list[Path]:
    """`n` files taken round-robin over the classes (their label, else their folder; shuffled with
    `seed`), so a small calibration set still covers as many classes as it can. Returned sorted."""
    from scarlet_deploy.runtime.data.classes import wnids

    names = wnids()
    by_class: dict[str, list[Path]] = defaultdict(list)
    for f in sorted(files):  # keyed by wnid: the same sample whichever layout gave the label
        by_class[names[files[f]] if files[f] >= 0 else f.parent.name].append(f)
    rng = random.Random(seed)
    classes = sorted(by_class)
    rng.shuffle(classes)
    for c in classes:
        rng.shuffle(by_class[c])
    picked: list[Path] = []
    depth = 0
    while len(picked) < n and any(len(v) > depth for v in by_class.values()):
        picked += [by_class[c][depth] for c in classes if len(by_class[c]) > depth][: n - len(picked)]
        depth += 1
    return sorted(picked)


def split_images(images: str | os.PathLike, num_calib: int, seed: int = 0,
                 eval_dir: str | os.PathLike | None = None, num_eval: int | None = None) -> ImageSplit:
    """Calibration images sampled from `images`; evaluation images from `eval_dir` (default: the same
    folder) with every calibration file removed, so the two sets never overlap."""
    files = _images(images)
    if num_calib < 1:
        raise ScarletError(f"--num-images must be at least 1 (got {num_calib}).")
    if eval_dir is None and num_calib >= len(files):
        raise ScarletError(f"--num-images {num_calib} would take all {len(files)} images of {images} for calibration, leaving "
                           f"none to evaluate the INT8 model on; pass --num-images {max(len(files) // 2, 1)} (or fewer), or "
                           "--eval-dir with other images.")
    calib = sample_across_classes(files, min(num_calib, len(files)), seed)
    taken = {p.resolve() for p in calib}
    pool = _images(eval_dir) if eval_dir is not None else files
    evals = {p: label for p, label in pool.items() if p.resolve() not in taken}
    picked = sample_across_classes(evals, num_eval, seed) if num_eval is not None else sorted(evals)
    return ImageSplit(tuple(calib), tuple(picked), tuple(evals[p] for p in picked))


def load_split(split: ImageSplit, preprocess: Preprocess) -> tuple[ImageSplit, np.ndarray, np.ndarray]:
    """Both sets loaded, with every unreadable image (FIFO, pixel bomb, damaged file: the same limits as
    predict and verify) dropped from the split and reported as one `skipped FILE: why` line."""
    from tqdm import tqdm

    from scarlet_deploy.runtime.data.images import UnreadableImage
    from scarlet_deploy.runtime.data.preprocess import reference

    def readable(paths: tuple[Path, ...], what: str) -> tuple[list[int], np.ndarray]:
        kept, arrays = [], []
        for i, p in enumerate(tqdm(paths, desc=f"reading {what}", unit="img", leave=False, disable=len(paths) < 64)):
            try:
                arrays.append(reference(p, preprocess))
                kept.append(i)
            except UnreadableImage as e:
                tqdm.write(f"skipped {e}")
        return kept, np.stack(arrays) if arrays else np.empty((0, 3, preprocess.crop, preprocess.crop), np.float32)

    ci, x_calib = readable(split.calib, "calibration images")
    if not ci:
        raise ScarletError(f"none of the {len(split.calib)} calibration images could be read (see the skipped lines); "
                           "check the --images folder.")
    ei, x_eval = readable(split.eval, "evaluation images")
    kept = ImageSplit(tuple(split.calib[i] for i in ci), tuple(split.eval[i] for i in ei),
                      tuple(split.eval_labels[i] for i in ei))
    return kept, x_calib, x_eval


def relative_names(paths: list[Path] | tuple[Path, ...]) -> list[str]:
    """`wnid/file.JPEG`: what reports and caches record (stable across checkouts)."""
    return [f"{p.parent.name}/{p.name}" for p in paths]
