"""Where real images come from when the user names none."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def default_val_dir() -> Path | None:
    """The shared ImageNet sample if this checkout sits beside it ($SCARLET_VAL_DIR wins)."""
    env = os.environ.get("SCARLET_VAL_DIR")
    candidates = [Path(env)] if env else []
    candidates += [REPO_ROOT.parent / "shared/data/imagenet-sample/val", Path.cwd().parent / "shared/data/imagenet-sample/val"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


def list_images(root: str | os.PathLike) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def fixed_images(n: int) -> list[Path]:
    """A fixed, spread-out set of `n` real images (every k-th of the sorted sample)."""
    d = default_val_dir()
    if d is None:
        return []
    files = list_images(d)
    step = max(len(files) // max(n, 1), 1)
    return files[::step][:n]
