"""Calibration cache (tensor ranges plus what produced them) and TensorRT's calibration-table text."""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from scarlet_deploy.runtime.core.artifacts import write_bytes_atomic, write_json_atomic
from scarlet_deploy.runtime.core.errors import ScarletError

FORMAT = "scarlet-calib-cache/1"
# NV_TENSORRT_VERSION of the TensorRT this project targets (11.4.0 -> major*10000 + minor*100 + patch),
# used in the table header when TensorRT itself is not installed here.
DEFAULT_TRT_VERSION = "11.4.0"


@dataclass(frozen=True)
class Provenance:
    """Everything that determines the ranges; a cache is reused only when all of it matches."""

    model: str
    onnx_sha256: str
    method: str
    target: str
    seed: int
    images: tuple[str, ...]


def save(path: str | os.PathLike, prov: Provenance, ranges: dict[str, tuple[float, float]],
         resolved_method: str | None = None) -> None:
    """`resolved_method`: what `--method auto` chose, so that a reuse need not choose again."""
    extra = {"resolved_method": resolved_method} if resolved_method else {}
    write_json_atomic(path, {"format": FORMAT, **asdict(prov), **extra,
                             "ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in ranges.items()}})


def resolved_method(path: str | os.PathLike) -> str | None:
    """The method `--method auto` chose when it wrote this cache (None for an explicit method)."""
    return json.loads(Path(path).read_text()).get("resolved_method")


def _subsequence(part: Any, whole: tuple[str, ...]) -> bool:
    it = iter(whole)
    return isinstance(part, tuple) and bool(part) and all(p in it for p in part)


def load(path: str | os.PathLike, want: Provenance, tensors: Iterable[str] | None = None,
         images_before_filtering: bool = False) -> dict[str, tuple[float, float]]:
    """The cached ranges, or a ScarletError saying what differs (a stale cache is never used) or what
    is wrong with them (see check_ranges; `tensors`: the activation tensors that need a range).
    `images_before_filtering`: `want.images` is the sample before unreadable, flat and repeated images
    are skipped (a check before loading them), so the cache's list, saved after, need only be a
    subsequence of it; the exact list is compared again once the images are loaded."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON, and UnicodeDecodeError for a binary file
        raise ScarletError(f"calibration cache {path} is unreadable ({str(e)[:120]}); delete it and calibrate again.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        data = data if isinstance(data, dict) else {}
        raise ScarletError(f"{path} is not a scarlet calibration cache (format {data.get('format')!r}); "
                           f"pass another --cache path or delete the file.")
    have = {k: data.get(k) for k in asdict(want)}
    have["images"] = tuple(have["images"]) if isinstance(have["images"], list) else have["images"]
    diffs = []
    for k, v in asdict(want).items():
        if k == "images" and images_before_filtering and _subsequence(have[k], v):
            continue
        if have[k] != v:
            if k == "images":
                shown = f"{len(have[k]) if isinstance(have[k], tuple) else 'no list of'} images vs {len(v)}"
            else:
                shown = f"{have[k]!r}, this run {v!r}"
            diffs.append(f"{k} (cache {shown})" if k != "images" else f"calibration images ({shown}, or another selection)")
    if diffs:
        what = "another model" if "onnx_sha256" in " ".join(diffs) else "other settings"
        raise ScarletError(f"calibration cache {path} was made for {what}: {'; '.join(diffs)}. Its ranges do not apply; "
                           f"delete it or pass another --cache path to calibrate afresh.")
    return check_ranges(data.get("ranges"), tensors,
                        f"calibration cache {path}", "delete it (or pass another --cache path) and calibrate again")


# No activation of a trained ImageNet classifier comes near this (batch-normalised layers keep them in the tens
# or hundreds); a range reaching it makes the INT8 step so coarse that the tensor quantises to zeros.
MAX_ABS_RANGE = 1e6


def check_ranges(ranges: Any, tensors: Iterable[str] | None, where: str, fix: str) -> dict[str, tuple[float, float]]:
    """{tensor: (lo, hi)} with every bound finite, lo < hi and |bound| < MAX_ABS_RANGE, and (given `tensors`) a
    range for each of them; else a ScarletError naming `where` and saying `fix`. An inverted, NaN, zero-width or
    absurdly wide range quantises a tensor to garbage (one value, or zeros) and the model to 0 % top-1 without
    any error."""
    if not isinstance(ranges, dict):
        raise ScarletError(f"{where} has no 'ranges' table ({{tensor: [lo, hi]}}); {fix}.")
    out, bad = {}, []
    for name, v in ranges.items():
        ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in v)
        if ok and all(math.isfinite(b) and abs(b) < MAX_ABS_RANGE for b in v) and v[0] < v[1]:
            out[name] = (float(v[0]), float(v[1]))
        else:
            bad.append(f"{name}: {v!r}")
    if bad:
        raise ScarletError(f"{where} has {len(bad)} invalid ranges (not two finite numbers with lo < hi within +-{MAX_ABS_RANGE:g}; e.g. "
                           f"{'; '.join(bad[:2])}); {fix}.")
    missing = sorted(set(tensors) - set(out)) if tensors is not None else []
    if missing:
        raise ScarletError(f"{where} lacks ranges for {len(missing)} of the model's activation tensors (e.g. "
                           f"{', '.join(missing[:3])}); {fix}.")
    return out


def trt_version() -> str:
    try:
        import tensorrt  # noqa: F401

        return tensorrt.__version__
    except Exception:  # not installed here (CPU machines): the project's target version
        return DEFAULT_TRT_VERSION


def trt_table_text(ranges: dict[str, tuple[float, float]], method: str, version: str | None = None) -> str:
    """TensorRT's calibration cache: a `TRT-<NV_TENSORRT_VERSION>-<Algorithm>` line, then
    `tensor: <scale as big-endian float32 hex>` per tensor, scale = amax / 127 (symmetric INT8).
    TensorRT only knew entropy and min/max calibrators; the other methods are labelled with
    EntropyCalibration2, the algorithm TensorRT's own INT8 path defaulted to."""
    major, minor, patch = (int(p) for p in (version or trt_version()).split(".")[:3])
    algo = "MinMaxCalibration" if method == "minmax" else "EntropyCalibration2"
    lines = [f"TRT-{major * 10000 + minor * 100 + patch}-{algo}"]
    for name in sorted(ranges):
        amax = max(abs(ranges[name][0]), abs(ranges[name][1]))
        lines.append(f"{name}: {struct.pack('>f', amax / 127.0).hex()}")
    return "\n".join(lines) + "\n"


def write_trt_table(path: str | os.PathLike, ranges: dict[str, tuple[float, float]], method: str) -> None:
    write_bytes_atomic(path, trt_table_text(ranges, method).encode())
