"""A model's data config (`Preprocess`) and the two preprocessing pipelines it drives.

- `reference`: the SCARLET-NAS evaluation transform (PIL, torchvision's Resize/CenterCrop
  arithmetic), re-implemented so that torchvision is not a dependency. PyTorch parity is
  measured on it.
- `deploy`: OpenCV, what `predict` and the benchmarks use because it decodes and resizes
  faster. `verify` reports how much it changes results (pipeline parity).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from scarlet_deploy.runtime.data.images import UnreadableImage, check_image_bytes, read_image_bytes

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Shorter side to `resize` (bilinear), centre crop `crop`, RGB, /255, (x-mean)/std."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def _resized_size(w: int, h: int, short: int) -> tuple[int, int]:
    # torchvision.transforms.Resize(int): the short side becomes `short`, the long side truncates.
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


def _crop_box(w: int, h: int, crop: int) -> tuple[int, int]:
    # torchvision.transforms.CenterCrop offsets.
    return int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))


def _normalise(rgb_hwc_uint8: np.ndarray, p: Preprocess) -> np.ndarray:
    x = rgb_hwc_uint8.astype(np.float32) / 255.0
    x = (x - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def reference(path: str | os.PathLike, p: Preprocess) -> np.ndarray:
    """(3, crop, crop) float32 through PIL, as the SCARLET-NAS evaluation does."""
    return reference_pixels(decode_rgb(path), p)


def decode_rgb(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB as PIL decodes the file: what `reference` starts from, and what a deploy
    package's golden images hold (decoders differ between libjpeg builds; resizing does not)."""
    from PIL import Image

    data = read_image_bytes(path)  # regular files only, pixel cap: the same limits as `deploy`
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)  # greyscale, CMYK, palette -> RGB
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"{path}: not a readable image ({e})") from e


def reference_pixels(rgb: np.ndarray, p: Preprocess) -> np.ndarray:
    """`reference` from decoded (H, W, 3) uint8 RGB pixels: resize, centre crop, normalise."""
    from PIL import Image

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise UnreadableImage(f"decoded image of shape {rgb.shape} and type {rgb.dtype}: expected (H, W, 3) uint8 RGB")
    im = Image.fromarray(rgb, "RGB")
    w, h = _resized_size(*im.size, p.resize)
    im = im.resize((w, h), Image.BILINEAR)
    left, top = _crop_box(w, h, p.crop)
    im = im.crop((left, top, left + p.crop, top + p.crop))
    return _normalise(np.asarray(im, dtype=np.uint8), p)


def deploy(path: str | os.PathLike, p: Preprocess) -> np.ndarray:
    """(3, crop, crop) float32 through OpenCV: decode, area/linear resize, centre crop."""
    return deploy_bytes(np.frombuffer(read_image_bytes(path), np.uint8), p, str(path))  # regular files only, pixel cap


def deploy_bytes(data: np.ndarray, p: Preprocess, source: str = "image") -> np.ndarray:
    """`deploy` on an encoded file already in memory (uint8 bytes), as the server receives it."""
    import cv2

    check_image_bytes(data.tobytes(), source)  # the same limits for bytes received by the server
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if img is None:
        raise UnreadableImage(f"{source}: not a readable image (OpenCV could not decode it)")
    h, w = img.shape[:2]
    nw, nh = _resized_size(w, h, p.resize)
    interp = cv2.INTER_AREA if nw < w else cv2.INTER_LINEAR
    img = cv2.resize(img, (nw, nh), interpolation=interp)
    left, top = _crop_box(nw, nh, p.crop)
    img = img[top:top + p.crop, left:left + p.crop, ::-1]  # BGR -> RGB
    return _normalise(img, p)


PIPELINES: dict[str, Callable[[str | os.PathLike, Preprocess], np.ndarray]] = {
    "reference": reference,
    "deploy": deploy,
}


def load_batch(paths: list, p: Preprocess, pipeline: str = "reference") -> np.ndarray:
    fn = PIPELINES[pipeline]
    return np.stack([fn(x, p) for x in paths])
