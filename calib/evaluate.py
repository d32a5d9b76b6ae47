"""Accuracy of a float or Q/DQ ONNX on labelled images, and a quick interleaved speed check."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Accuracy:
    images: int
    top1: float | None  # percent; None without labels
    top5: float | None
    agreement: float | None = None  # percent of images whose top-1 equals the float model's
    logits_rmse: float | None = None  # vs the float model, relative to the float logits' RMS
    # mean KL(softmax(float) || softmax(int8)), nats: continuous and low-variance where top-1 and
    # agreement move in steps of one image, so decisions are taken on it
    kl: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _runner(onnx_path: str | os.PathLike, runtime: str, threads: int | None):
    """The Runner for `runtime` (see logits)."""
    if runtime == "ov":
        from scarlet_deploy.runtime.runners.openvino import OvOptions, OvRunner

        return OvRunner(onnx_path, options=OvOptions(threads=threads))
    from scarlet_deploy.runtime.runners.ort import OrtOptions, OrtRunner

    return OrtRunner(onnx_path, options=OrtOptions(threads=threads, opt_level="disable" if runtime == "fake-quant" else "all"))


def logits(onnx_path: str | os.PathLike, images: np.ndarray, batch: int = 16, threads: int | None = None,
           runtime: str = "ort") -> np.ndarray:
    """Logits of the model on `runtime` (a key of qdq.EVALUATED_WITH): "ort", onnxruntime with its graph
    optimisations, so Q/DQ models run on its integer kernels; "fake-quant", onnxruntime with them off,
    so Q/DQ pairs run as float quantise-dequantise around float kernels (the arithmetic an
    explicit-quantization engine such as TensorRT emulates); "ov", OpenVINO's CPU plugin (its INT8
    kernels, float ops in f32)."""
    if runtime == "ov":
        batch = min(batch, len(images)) or 1  # OpenVINO compiles per batch size: one size, the rest padded
    with _runner(onnx_path, runtime, threads) as r:
        out = []
        for i in range(0, len(images), batch):
            x = images[i:i + batch]
            if runtime == "ov" and len(x) < batch:
                x = np.concatenate([x, np.zeros((batch - len(x), *x.shape[1:]), x.dtype)])
            out.append(r.infer(x)[:len(images[i:i + batch])])
    logits = np.concatenate(out)
    if not np.isfinite(logits).all():  # no decision or report may rank NaN: argmax and KL would still yield numbers
        from scarlet_deploy.runtime.core.errors import ScarletError

        bad = int((~np.isfinite(logits).all(axis=1)).sum())
        raise ScarletError(f"{onnx_path} gives NaN or Inf logits on {bad} of {len(logits)} images ({runtime}); "
                           "a quantised model must not: re-export the float model and calibrate again.")
    return logits


def accuracy(out: np.ndarray, labels: np.ndarray | None, reference: np.ndarray | None = None) -> Accuracy:
    top1 = top5 = agree = rmse = kl = None
    if labels is not None and np.all(labels >= 0):
        from scarlet_deploy.runtime.core.logits import top_k

        top = top_k(out)
        top1 = 100.0 * float(np.mean(top[:, 0] == labels))
        top5 = 100.0 * float(np.mean(np.any(top == labels[:, None], axis=1)))
    if reference is not None:
        agree = 100.0 * float(np.mean(out.argmax(1) == reference.argmax(1)))
        rmse = float(np.sqrt(np.mean((out - reference) ** 2)) / max(np.sqrt(np.mean(reference ** 2)), 1e-12))
        kl = float(np.mean(kl_per_image(out, reference))) if len(out) else None
    return Accuracy(len(out), top1, top5, agree, rmse, kl)


def kl_per_image(out: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(out)) per image, in float64 (float32 log-softmax loses the
    small differences that matter here)."""
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(reference), log_softmax(out)
    return np.sum(np.exp(lp) * (lp - lq), axis=1)


def side_by_side_throughput(paths: dict[str, str | os.PathLike], batch: int = 8, rounds: int = 10,
                            threads: int | None = None, seed: int = 0, runtime: str = "ort") -> dict[str, float]:
    """Images/s per model on `runtime` (ort, or ov: OpenVINO, float ops in f32), measured interleaved by
    the bench's own loop (rounds rotate the order, so load from other users of a shared machine hits
    every model alike); median call time."""
    from scarlet_deploy.runtime.measure import measure_interleaved, wall_timer

    x = np.random.default_rng(seed).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    runners = {k: _runner(p, runtime, threads).load() for k, p in paths.items()}
    try:
        times = measure_interleaved({k: wall_timer(r, x) for k, r in runners.items()}, repeats=rounds,
                                    seconds=0.0, warmup_s=0.0, min_calls=3)
    finally:
        for r in runners.values():
            r.close()
    return {k: batch / float(np.median([t for rnd in v for t in rnd])) for k, v in times.items()}
