"""Activation statistics on onnxruntime: per tensor min, max and a histogram of |x|.

Why not onnxruntime.quantization's calibrators: their HistogramCalibrater builds a two-sided
histogram whose range moves as batches arrive, and the entropy search it feeds uses 128
quantised bins over that two-sided range, so for ReLU/ReLU6 outputs (half the histogram empty)
it degenerates towards min/max; percentile and entropy are not comparable on the same
statistics either. Here one pass records min/max, a second pass a fixed-range |x| histogram
(TensorRT's layout: 2048 bins from 0 to max|x|), and every method in `ranges.py` reads
the same statistics, so the report can compare them fairly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

NUM_BINS = 2048


@dataclass
class TensorStats:
    lo: float
    hi: float
    hist: np.ndarray  # counts of |x| over NUM_BINS equal bins in [0, absmax]
    zeros: int = 0  # exact zeros (ReLU outputs): they quantise without error

    @property
    def absmax(self) -> float:
        return max(abs(self.lo), abs(self.hi))


def activation_tensors(model) -> list[str]:
    """Every float tensor a node reads or writes that is not a weight: the candidates for Q/DQ."""
    import onnx

    inits = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    typed = {v.name: v.type.tensor_type.elem_type for v in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    names: list[str] = []
    seen = set()
    for n in model.graph.node:
        for t in list(n.input) + list(n.output):
            if not t or t in seen or t in inits or t in consts:
                continue
            seen.add(t)
            if typed.get(t) == onnx.TensorProto.FLOAT:
                names.append(t)
    return names


def activation_names(onnx_path: str | os.PathLike) -> list[str]:
    """The tensors `collect` records (and a calibration cache must hold a range for), without running the model."""
    import onnx

    return activation_tensors(onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path))))


def _augmented_session(onnx_path: str | os.PathLike, threads: int | None):
    """The model with every activation tensor added as a graph output."""
    import tempfile

    import onnx

    from scarlet_deploy.runtime.runners.ort import OrtOptions, make_session

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    names = activation_tensors(model)
    outputs = {o.name for o in model.graph.output}
    for t in names:
        if t not in outputs:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    with tempfile.TemporaryDirectory(prefix="scarlet-calib-") as d:
        path = os.path.join(d, "augmented.onnx")
        onnx.save(model, path)
        # Graph optimisations would fuse away the very tensors being observed.
        sess = make_session(path, OrtOptions(threads=threads, opt_level="disable"))
    return sess, names


def collect(onnx_path: str | os.PathLike, images: np.ndarray, batch: int = 8,
            threads: int | None = None) -> dict[str, TensorStats]:
    """Statistics of every activation tensor over `images` (N, 3, H, W) float32."""
    from tqdm import tqdm

    sess, names = _augmented_session(onnx_path, threads)
    inp = sess.get_inputs()[0].name
    out_names = [o.name for o in sess.get_outputs()]
    want = [out_names.index(t) for t in names]
    batches = [images[i:i + batch] for i in range(0, len(images), batch)]

    lo = np.full(len(names), np.inf)
    hi = np.full(len(names), -np.inf)
    for x in tqdm(batches, desc="calibration pass 1/2 (range)", unit="batch", leave=False):
        outs = sess.run(None, {inp: x})
        for j, k in enumerate(want):
            lo[j] = min(lo[j], float(outs[k].min()))
            hi[j] = max(hi[j], float(outs[k].max()))

    absmax = np.maximum(np.abs(lo), np.abs(hi))
    hists = np.zeros((len(names), NUM_BINS), np.int64)
    zeros = np.zeros(len(names), np.int64)
    for x in tqdm(batches, desc="calibration pass 2/2 (histogram)", unit="batch", leave=False):
        outs = sess.run(None, {inp: x})
        for j, k in enumerate(want):
            if absmax[j] > 0:
                a = np.abs(outs[k].ravel())
                idx = np.minimum((a * (NUM_BINS / absmax[j])).astype(np.int64), NUM_BINS - 1)
                hists[j] += np.bincount(idx, minlength=NUM_BINS)
                zeros[j] += a.size - np.count_nonzero(a)
    return {t: TensorStats(float(lo[j]), float(hi[j]), hists[j], int(zeros[j])) for j, t in enumerate(names)}
