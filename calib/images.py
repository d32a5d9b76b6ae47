"""Which images calibrate, which select and which report: a seeded, class-spread, disjoint split.

Three sets, because a choice judged on the images it is reported on reports its own luck:
calibration images give ranges and bias corrections, selection images decide (method, bias
correction, float layers), and report images give the accuracy the report states, touched by
no decision.

Labels come from runtime.dataset (the one reader of ImageNet layouts: <wnid>/ folders, flat
ILSVRC files with LOC_val_solution.csv or the devkit); calibration itself needs none, so any
other folder of images is accepted, unlabelled (accuracy budgets then use agreement only)."""
from __future__ import annotations

import hashlib
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
    eval: tuple[Path, ...]  # the report set
    eval_labels: tuple[int, ...]  # ImageNet-1k index per report image; -1: unknown
    select: tuple[Path, ...] = ()
    select_labels: tuple[int, ...] = ()


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
                 eval_dir: str | os.PathLike | None = None, num_eval: int | None = None,
                 num_select: int = 0) -> ImageSplit:
    """Calibration images sampled from `images`; from what `eval_dir` (default: the same folder) holds
    besides them, `num_select` selection images, and the report images (at most `num_eval`) from
    the rest, so no two sets share a file."""
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
    held_out = {p: label for p, label in pool.items() if p.resolve() not in taken}
    if num_select and num_select >= len(held_out):
        raise ScarletError(f"{len(held_out)} images are left after the {len(calib)} calibration images, too few for "
                           f"{num_select} selection images and a report set; lower --num-images or --num-select, "
                           f"or pass --eval-dir with more images.")
    select = sample_across_classes(held_out, num_select, seed + 1) if num_select else []
    chosen = set(select)
    evals = {p: label for p, label in held_out.items() if p not in chosen}
    picked = sample_across_classes(evals, num_eval, seed) if num_eval is not None else sorted(evals)
    return ImageSplit(tuple(calib), tuple(picked), tuple(evals[p] for p in picked),
                      tuple(select), tuple(held_out[p] for p in select))


def load(paths: list[Path] | tuple[Path, ...], preprocess: Preprocess, what: str = "images") -> np.ndarray:
    """(N, 3, crop, crop) float32 through the reference pipeline (the one PyTorch parity is measured on)."""
    from tqdm import tqdm

    from scarlet_deploy.runtime.data.preprocess import reference

    out = np.empty((len(paths), 3, preprocess.crop, preprocess.crop), np.float32)
    for i, p in enumerate(tqdm(paths, desc=f"reading {what}", unit="img", leave=False, disable=len(paths) < 64)):
        out[i] = reference(p, preprocess)
    return out


def readable(split: ImageSplit) -> ImageSplit:
    """`split` without the files the shared image loader refuses (FIFO, device, pixel bomb, empty or
    not an image: the limits of predict and verify, checked from the header), each reported as one
    `skipped FILE: why` line; a file that passes but fails to decode later is still a clear error."""
    from tqdm import tqdm

    from scarlet_deploy.runtime.data.images import UnreadableImage, read_image_bytes

    def keep(paths: tuple[Path, ...]) -> list[int]:
        out = []
        for i, p in enumerate(paths):
            try:
                read_image_bytes(p)
                out.append(i)
            except UnreadableImage as e:
                tqdm.write(f"skipped {e}")
        return out

    ci, si, ei = keep(split.calib), keep(split.select), keep(split.eval)
    if not ci:
        raise ScarletError(f"none of the {len(split.calib)} calibration images could be read (see the skipped lines); "
                           "check the --images folder.")
    return ImageSplit(tuple(split.calib[i] for i in ci), tuple(split.eval[i] for i in ei),
                      tuple(split.eval_labels[i] for i in ei), tuple(split.select[i] for i in si),
                      tuple(split.select_labels[i] for i in si))


# Below this standard deviation (in 0-255 grey levels, in every channel) an image is one flat colour: it
# carries nothing to calibrate on, and a report on such images measures nothing (an all-black set agrees 100 %
# with anything). The least varied of the 500 shared ImageNet sample images has 22 levels.
MIN_PIXEL_STD = 2.0


def informative(split: ImageSplit, x: dict[str, np.ndarray], preprocess: Preprocess) -> tuple[ImageSplit, dict[str, np.ndarray]]:
    """`split` and its loaded arrays (`x` keyed calib/select/eval) without flat images and without repeats
    (pixel-identical after preprocessing, within or across the three sets: a report image equal to a
    calibration image is not held out), each dropped with a `skipped FILE: why` line. Refuses a set that
    loses half its images or more: a degenerate image set must not yield a model or a report."""
    from tqdm import tqdm

    scale = np.asarray(preprocess.std, np.float32) * 255.0
    seen: dict[bytes, Path] = {}
    keep: dict[str, list[int]] = {}
    for what, paths in (("calib", split.calib), ("select", split.select), ("eval", split.eval)):
        keep[what] = []
        for i, (path, xi) in enumerate(zip(paths, x[what])):
            std = xi.reshape(len(scale), -1).std(1) * scale
            digest = hashlib.sha256(np.ascontiguousarray(xi).tobytes()).digest()
            if (std < MIN_PIXEL_STD).all():
                tqdm.write(f"skipped {path}: a flat image (pixel std {std.max():.2f} grey levels, below "
                           f"{MIN_PIXEL_STD}) carries nothing to calibrate on or judge by")
            elif digest in seen:
                tqdm.write(f"skipped {path}: the same pixels as {seen[digest]}")
            else:
                seen[digest] = path
                keep[what].append(i)
    names = {"calib": "calibration", "select": "selection", "eval": "report"}
    for what, paths in (("calib", split.calib), ("select", split.select), ("eval", split.eval)):
        if paths and len(keep[what]) * 2 <= len(paths):
            raise ScarletError(f"only {len(keep[what])} of the {len(paths)} {names[what]} images are distinct images "
                               "with content (the others are flat colours or repeats; see the skipped lines): such a "
                               "set calibrates nothing and makes any model look good. Pass --images (and --eval-dir) "
                               "folders of real, varied photographs.")
    out = ImageSplit(tuple(split.calib[i] for i in keep["calib"]), tuple(split.eval[i] for i in keep["eval"]),
                     tuple(split.eval_labels[i] for i in keep["eval"]), tuple(split.select[i] for i in keep["select"]),
                     tuple(split.select_labels[i] for i in keep["select"]))
    return out, {k: x[k][keep[k]] for k in keep}


def relative_names(paths: list[Path] | tuple[Path, ...]) -> list[str]:
    """`wnid/file.JPEG`: what reports and caches record (stable across checkouts)."""
    return [f"{p.parent.name}/{p.name}" for p in paths]
