"""Where real images come from when the user names none."""
from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

from scarlet_deploy.runtime.core.errors import ScarletError

REPO_ROOT = Path(__file__).resolve().parent.parent
# The one list of image files every command lists from a folder (verify, calibrate, the defaults): the formats
# both pipelines decode, PIL (reference) and OpenCV (deploy; also the server's). predict and the server take
# any file they are given and decode what they can; a test decodes each suffix here through both pipelines.
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif",
                  ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".avif"}


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


class UnreadableImage(ScarletError):
    """One image that cannot be used; commands that read many skip it with this message as the reason."""


# PIL's decompression-bomb threshold (PIL.Image.MAX_IMAGE_PIXELS, ~89 M pixels, 256 MiB as RGB): PIL
# warns there and refuses twice as many, OpenCV only beyond 2**30. A 400 KB PNG can declare 20000x20000
# pixels, 1.2 GB decoded; one cap for both pipelines, checked from the header before decoding.
MAX_PIXELS = 89_478_485
MAX_BYTES = 256 * 2**20  # far above any photo; a bigger file is not one


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of an image file, refused (UnreadableImage) unless it is a regular file of sane size
    whose header declares at most MAX_PIXELS pixels. Reading a FIFO or a device would block forever."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UnreadableImage(f"{path}: cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableImage(f"{path}: not a regular file (a FIFO, device, socket or folder); pass image files")
    if st.st_size > MAX_BYTES:
        raise UnreadableImage(f"{path}: {st.st_size / 2**20:.0f} MiB is more than an image file should be "
                              f"(limit {MAX_BYTES // 2**20} MiB)")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UnreadableImage(f"{path}: cannot be read ({e.strerror or e})") from None
    check_image_bytes(data, str(path))
    return data


def check_image_bytes(data: bytes, source: str) -> None:
    """Refuse (UnreadableImage, naming `source`) encoded bytes that are empty, not an image, or whose
    header declares more than MAX_PIXELS pixels: read from the header, before anything is decoded."""
    import io

    from PIL import Image

    if not len(data):
        raise UnreadableImage(f"{source}: empty file (0 bytes)")
    if len(data) > MAX_BYTES:
        raise UnreadableImage(f"{source}: {len(data) / 2**20:.0f} MiB is more than an image should be (limit {MAX_BYTES // 2**20} MiB)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with a clearer message
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError:
        raise UnreadableImage(f"{source}: declares more than twice the {MAX_PIXELS / 1e6:.0f} M pixel limit; "
                              "downscale it first") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage(f"{source}: not an image (no format PIL or OpenCV reads)") from None
    except (OSError, ValueError) as e:
        raise UnreadableImage(f"{source}: not a readable image ({e})") from None
    if w * h > MAX_PIXELS:
        raise UnreadableImage(f"{source}: {w}x{h} is {w * h / 1e6:.0f} M pixels, over the {MAX_PIXELS / 1e6:.0f} M pixel "
                              "limit; downscale it first")
