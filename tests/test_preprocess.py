"""Both preprocessing pipelines on images that must be resized (up and down), against resampling computed here
from its definition: the reference pipeline is torchvision's Resize on a PIL image (PIL's antialiased bilinear,
a triangle filter widened by the scale when shrinking), the deploy pipeline OpenCV's INTER_AREA when shrinking
and INTER_LINEAR when enlarging. A 256x256 image is never resized, so it cannot tell one filter from another.

The images are uniform noise saved as PNG (decoded exactly by PIL and OpenCV alike): a nearest-neighbour or
box resize lands tens of levels away from a bilinear one, while the libraries' fixed-point arithmetic stays
within one level of the float computation below.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scarlet_deploy.runtime.data import preprocess as pre
from scarlet_deploy.runtime.data.preprocess import Preprocess

# mean 0, std 1/255: the pipelines hand back the 0..255 pixel values themselves
PIXELS = Preprocess(resize=256, crop=224, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)


def _triangle(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of bilinear resampling as PIL defines it: pixel centres at i + 0.5, a triangle
    filter of radius max(scale, 1) input pixels, weights renormalised where it crosses the border."""
    scale = n_in / n_out
    radius = max(scale, 1.0)
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        x = np.arange(n_in) + 0.5
        w = np.clip(1 - np.abs(x - centre) / radius, 0, None)
        m[i] = w / w.sum()
    return m


def _linear(n_in: int, n_out: int) -> np.ndarray:
    """OpenCV INTER_LINEAR: sample at (i + 0.5) * scale - 0.5, two neighbours, clamped at the border."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        s = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
        lo = int(np.floor(s))
        hi = min(lo + 1, n_in - 1)
        m[i, lo] += 1 - (s - lo)
        m[i, hi] += s - lo
    return m


def _area(n_in: int, n_out: int) -> np.ndarray:
    """OpenCV INTER_AREA when shrinking: each output pixel is the mean of the input it covers, pixels cut by its
    edges weighted by the part inside."""
    scale = n_in / n_out
    x = np.arange(n_in)
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        m[i] = np.clip(np.minimum(x + 1, (i + 1) * scale) - np.maximum(x, i * scale), 0, None) / scale
    return m


def _resample(img: np.ndarray, rows: np.ndarray, cols: np.ndarray, round_between: bool) -> np.ndarray:
    """Separable resampling of an (H, W, 3) image: columns first (as PIL does), then rows."""
    half_up = lambda a: np.floor(a + 0.5)  # noqa: E731  (the libraries' fixed point rounds halves up)
    x = img.astype(np.float64).transpose(2, 0, 1) @ cols.T  # (3, H, W')
    if round_between:  # PIL stores the horizontal pass as 8-bit pixels
        x = np.clip(half_up(x), 0, 255)
    return half_up(rows @ x).transpose(1, 2, 0)


def _centre(img: np.ndarray, crop: int) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = round((h - crop) / 2), round((w - crop) / 2)
    return img[top:top + crop, left:left + crop]


def _noise_png(path: Path, h: int, w: int) -> np.ndarray:
    from PIL import Image

    rgb = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


# (H, W) -> resized (256 short side, long side truncated) then centre-cropped to 224
CASES = {"down": (768, 960, (256, 320)), "up": (160, 200, (256, 320)), "down-portrait": (960, 768, (320, 256)),
         # 256 * 451 / 300 = 384.85: the long side truncates to 384, as torchvision's Resize does
         "down-uneven": (300, 451, (256, 384)), "up-uneven": (205, 150, (349, 256))}


@pytest.mark.parametrize("case", list(CASES))
def test_the_reference_pipeline_resizes_bilinearly_with_antialiasing(tmp_path, case):
    h, w, (nh, nw) = CASES[case]
    rgb = _noise_png(tmp_path / "noise.png", h, w)
    want = _centre(_resample(rgb, _triangle(h, nh), _triangle(w, nw), round_between=True), 224)
    got = pre.reference(tmp_path / "noise.png", PIXELS).transpose(1, 2, 0)
    assert got.shape == want.shape == (224, 224, 3)
    assert np.abs(got - want).max() <= 1.01, "PIL's bilinear resize, within one level of its fixed-point rounding"


@pytest.mark.parametrize("case", list(CASES))
def test_the_deploy_pipeline_shrinks_by_area_and_enlarges_bilinearly(tmp_path, case):
    h, w, (nh, nw) = CASES[case]
    rgb = _noise_png(tmp_path / "noise.png", h, w)
    kernel = _area if nh < h else _linear
    want = _centre(_resample(rgb, kernel(h, nh), kernel(w, nw), round_between=False), 224)
    got = pre.deploy(tmp_path / "noise.png", PIXELS).transpose(1, 2, 0)
    assert got.shape == want.shape == (224, 224, 3)
    assert np.abs(got - want).max() <= 1.01, "OpenCV's area/linear resize, within one level of its rounding"


def test_the_two_pipelines_agree_on_a_smooth_image_and_keep_the_channel_order(tmp_path):
    # A smooth image shrunk and cropped: PIL and OpenCV decode and resample it alike; a channel swap or a
    # misplaced crop would not be within a few levels. Red rises left to right, green top to bottom.
    from PIL import Image

    yy, xx = np.mgrid[0:600, 0:800]
    rgb = np.stack([xx * 255 // 799, yy * 255 // 599, np.full_like(xx, 40)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "ramp.png")
    p = Preprocess()
    ref, dep = pre.reference(tmp_path / "ramp.png", p), pre.deploy(tmp_path / "ramp.png", p)
    assert np.abs(ref - dep).max() < 0.05
    pixels = pre.reference(tmp_path / "ramp.png", PIXELS)
    assert pixels[0, :, -1].mean() > pixels[0, :, 0].mean() + 100 and pixels[1, -1].mean() > pixels[1, 0].mean() + 100
    assert np.allclose(pixels[2], 40, atol=1)
