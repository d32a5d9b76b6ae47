"""The golden set of a deploy package: real images as the model receives them after decoding, and
the logits that PyTorch and the chosen artifact gave them when the package was made.

Pixels are stored decoded (uint8 RGB): JPEG decoders differ between libjpeg builds, and a check
that failed on a decoder change would blame the model. Everything after decoding (resize, crop,
normalisation) runs again wherever the package is checked, from the spec stored with them.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.data.preprocess import Preprocess, reference_pixels

DIR = "golden"
PIXELS = f"{DIR}/images.npz"
PREPROCESS = f"{DIR}/preprocess.json"
REFERENCE = f"{DIR}/reference_logits.npy"  # PyTorch
DEPLOYED = f"{DIR}/deploy_logits.npy"  # the chosen artifact, on the machine that made the package
THRESHOLDS = f"{DIR}/thresholds.json"
IMAGES = f"{DIR}/images.json"

# How far the chosen artifact's logits may move from their deploy-time values (max |now - then| over
# max |then|) before `scarlet check` fails: the same file on another runtime version or CPU. FP32
# kernels differ in summation order only (~1e-6 measured across runs); bf16/fp16 and INT8 kernels
# round differently per instruction set, so their bound is that of a precision step, well below what
# moves a top-1 on these models (agreement gates sit at 95-99 %).
DRIFT_BOUND = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 5e-2, "int8": 5e-2}


def batches(runner, x: np.ndarray, batch: int) -> np.ndarray:
    """Logits of `x` in fixed-size batches (the last one padded with zeros): a runtime that compiles per
    batch size (OpenVINO, TensorRT) then sees one shape, and deploy and check see the same ones."""
    out = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(runner.infer(chunk))[:batch - pad])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def write(root: Path, pixels: list[np.ndarray], names: list[str], labels: list[int], preprocess: Preprocess,
          reference: np.ndarray, deployed: np.ndarray, thresholds: dict[str, Any]) -> None:
    (root / DIR).mkdir(parents=True, exist_ok=True)
    np.savez_compressed(root / PIXELS, **{f"{i:04d}": p for i, p in enumerate(pixels)})
    (root / PREPROCESS).write_text(json.dumps({
        **asdict(preprocess),
        "pipeline": "decoded RGB uint8 -> shorter side to `resize` (PIL bilinear) -> centre crop `crop` -> /255 -> "
                    "(x - mean) / std -> NCHW float32 (scarlet_deploy.runtime.data.preprocess.reference_pixels)"},
        indent=2) + "\n")
    np.save(root / REFERENCE, reference.astype(np.float32))
    np.save(root / DEPLOYED, deployed.astype(np.float32))
    (root / THRESHOLDS).write_text(json.dumps(thresholds, indent=2) + "\n")
    (root / IMAGES).write_text(json.dumps([{"file": n, "label": int(lab)} for n, lab in zip(names, labels)], indent=1) + "\n")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ScarletError(f"{path} is unreadable ({e}): the package is damaged; make it again with `scarlet deploy`.") from e


def load(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(preprocessed images, reference logits, deploy-time logits, thresholds) from a package."""
    spec = _json(root / PREPROCESS)
    try:
        pre = Preprocess(int(spec["resize"]), int(spec["crop"]), tuple(map(float, spec["mean"])),
                         tuple(map(float, spec["std"])))
        with np.load(root / PIXELS, allow_pickle=False) as z:  # pickles could run code: never
            pixels = [z[k] for k in sorted(z.files)]
        ref = np.load(root / REFERENCE, allow_pickle=False)
        dep = np.load(root / DEPLOYED, allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ScarletError(f"the golden set in {root / DIR} is unreadable ({e}): the package is damaged; "
                           "make it again with `scarlet deploy`.") from e
    x = np.stack([reference_pixels(p, pre) for p in pixels]) if pixels else np.zeros((0, 3, pre.crop, pre.crop), np.float32)
    if not (len(x) == len(ref) == len(dep)) or not len(x):
        raise ScarletError(f"the golden set in {root / DIR} holds {len(x)} images, {len(ref)} reference and {len(dep)} "
                           "deploy-time logit rows: they must match. Make the package again with `scarlet deploy`.")
    return x, ref, dep, _json(root / THRESHOLDS)
