"""`scarlet predict`: top-k ImageNet classes for a few images through an ONNX model."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from scarlet_deploy.runtime.core import cli_types
from scarlet_deploy.runtime.core.cli_types import int_range
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.logits import softmax, top_k
from scarlet_deploy.runtime.core.onnx_io import check_classifier
from scarlet_deploy.runtime.runners.registry import ONNX_RUNTIMES, open_runner


@dataclass
class Prediction:
    image: str
    top: list[tuple[int, str, float]]  # (class index, name, probability)


def model_for_onnx(onnx_path: str | Path, model: str | None = None) -> str:
    """The registry model an ONNX was exported from (its manifest says), unless given."""
    from scarlet_deploy.runtime.core.artifacts import read_manifest

    if model:
        return model
    manifest = read_manifest(onnx_path)
    if not manifest or "model" not in manifest:
        raise ScarletError(f"{onnx_path} has no manifest naming its model, so its preprocessing is unknown; pass --model NAME.")
    return manifest["model"]


def predict(onnx_path: str | Path, images: list[str], model: str | None = None, top: int = 5,
            pipeline: str = "deploy", backend: str = "ort", batch: int = 32) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Predictions for the readable images, and (path, reason) for the skipped ones; `backend`: one of ONNX_RUNTIMES."""
    from scarlet_deploy.export.registry import get_spec
    from scarlet_deploy.runtime.data import classes
    from scarlet_deploy.runtime.data.preprocess import PIPELINES, UnreadableImage

    spec = get_spec(model_for_onnx(onnx_path, model))
    if not 1 <= top <= spec.num_classes:
        raise ScarletError(f"--top {top}: choose between 1 and {spec.num_classes}.")
    check_classifier(onnx_path, spec.preprocess.crop, spec.num_classes, spec.name)
    out: list[Prediction] = []
    skipped: list[tuple[str, str]] = []
    runner = None
    try:
        # Images stream through in batches of `batch`: memory holds one batch of tensors (32 x 3 x 224 x 224 FP32,
        # 19 MB, plus the runtime's activations for it), whatever the number of images; one batch of all of them
        # once took 10 GB for 1000 images.
        for start in range(0, len(images), batch):
            tensors, kept = [], []
            for path in images[start:start + batch]:
                try:
                    tensors.append(PIPELINES[pipeline](path, spec.preprocess))
                    kept.append(path)
                except UnreadableImage as e:
                    skipped.append((path, str(e)))
                except OSError as e:
                    skipped.append((path, f"{path}: cannot be read ({e.strerror or e})"))
            if not tensors:
                continue
            if runner is None:
                runner = open_runner(backend, onnx_path).load()
            logits = runner.infer(np.stack(tensors))
            del tensors
            if not np.isfinite(logits).all():
                raise ScarletError(f"{onnx_path} produced NaN or infinite logits: its weights are not finite. Re-export it "
                                   "from a good checkpoint (`scarlet export` refuses non-finite weights).")
            probs = softmax(logits)
            for path, p, idx in zip(kept, probs, top_k(probs, top)):
                out.append(Prediction(path, [(int(i), classes.name(int(i)), float(p[i])) for i in idx]))
    finally:
        if runner is not None:
            runner.close()
    return out, skipped


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-5 ImageNet classes for images through an ONNX model")
    p.add_argument("--onnx", required=True, type=cli_types.input_file(".onnx", as_path=False))
    p.add_argument("--model", help="registry model name (default: from the ONNX manifest)")
    p.add_argument("--top", type=int_range(1, 1000), default=5, help="classes per image (1-1000, default 5)")
    p.add_argument("--backend", choices=ONNX_RUNTIMES, default="ort", help="runtime to run the ONNX on (default ort)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("images", nargs="+")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    preds, skipped = predict(args.onnx, args.images, args.model, args.top, backend=args.backend)
    if args.json:
        print(json.dumps({"predictions": [asdict(p) for p in preds],
                          "skipped": [{"image": i, "reason": r} for i, r in skipped]}, indent=2))
    else:
        for p in preds:
            print(p.image)
            for i, name, prob in p.top:
                print(f"  {prob:7.2%}  {name} ({i})")
        for _, reason in skipped:
            print(f"skipped {reason}", file=sys.stderr)
    return 0 if preds else 2
