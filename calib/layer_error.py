"""Where the INT8 logits error comes from: each weighted layer's output against the float model's.

For every Conv/Gemm in network order, the relative RMS error of its output in the Q/DQ model
(run as fake-quant, so every layer output can be read), the part of it a per-channel mean shift
explains (what bias correction can remove), and how much it grew over the layers feeding it (the
nearest weighted layers upstream, through activations, pools, residual adds and SE gates; the
largest of their errors): the layers where it grows most are where the error enters.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from scarlet_deploy.calib.bias import session
from scarlet_deploy.calib.qdq import WEIGHTED_OPS


@dataclass(frozen=True)
class LayerError:
    layer: str
    op_type: str
    rel_rmse: float  # RMS(int8 - float) / RMS(float) of the layer's output
    mean_part: float  # RMS over channels of the mean error, same scale
    growth: float  # rel_rmse minus the largest rel_rmse of the weighted layers feeding it
    rel_rmse_corrected: float | None = None  # the same after bias correction
    mean_part_corrected: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _outputs(path: str | os.PathLike, tensors: list[str], images: np.ndarray, batch: int, threads: int | None):
    """Yield, batch by batch, the named tensors of the model (graph optimisations off)."""
    import onnx


    model = onnx.load(str(path))
    have = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    sess = session(model.SerializeToString(), threads)
    feed = sess.get_inputs()[0].name
    for i in range(0, len(images), batch):
        yield sess.run(tensors, {feed: images[i:i + batch]})


def _rel(float_path, qdq_path, layers: list[tuple[str, str, str]], images: np.ndarray, batch: int,
         threads: int | None) -> list[tuple[float, float]]:
    """(relative RMS error, relative RMS of the per-channel mean error) per layer."""
    tensors = [t for _, _, t in layers]
    sq, ref, elements = np.zeros(len(tensors)), np.zeros(len(tensors)), np.zeros(len(tensors))
    channel_sum: list = [0.0] * len(tensors)
    for f_out, q_out in zip(_outputs(float_path, tensors, images, batch, threads),
                            _outputs(qdq_path, tensors, images, batch, threads)):
        for k, (f, q) in enumerate(zip(f_out, q_out)):
            f = f.astype(np.float64)
            d = q.astype(np.float64) - f
            sq[k] += np.sum(d ** 2)
            ref[k] += np.sum(f ** 2)
            elements[k] += f.size
            channel_sum[k] = channel_sum[k] + np.moveaxis(d, 1, 0).reshape(d.shape[1], -1).sum(axis=1)
    out = []
    for k in range(len(tensors)):
        per_channel = elements[k] / len(channel_sum[k])
        rms = max(np.sqrt(ref[k] / elements[k]), 1e-30)
        mean = channel_sum[k] / per_channel
        out.append((float(np.sqrt(sq[k] / max(ref[k], 1e-30))), float(np.sqrt(np.mean(mean ** 2)) / rms)))
    return out


def table(float_path: str | os.PathLike, qdq_path: str | os.PathLike, corrected_path: str | os.PathLike | None,
          images: np.ndarray, batch: int = 8, threads: int | None = None) -> list[dict]:
    """One row per weighted layer, network order (rows as dicts, for the JSON report)."""
    import onnx

    fm = onnx.load(str(float_path), load_external_data=False)
    qnames = {n.name for n in onnx.load(str(qdq_path), load_external_data=False).graph.node}
    layers = [(n.name, n.op_type, n.output[0]) for n in fm.graph.node if n.op_type in WEIGHTED_OPS and n.name in qnames]
    if not layers or not len(images):
        return []
    runs = [_rel(float_path, p, layers, images, batch, threads) for p in (qdq_path, corrected_path) if p]
    feeding = _feeding(fm.graph, {name for name, _, _ in layers})
    error = {name: runs[0][k][0] for k, (name, _, _) in enumerate(layers)}
    rows = []
    for k, (name, op, _) in enumerate(layers):
        rel, mean = runs[0][k]
        corr = runs[1][k] if len(runs) > 1 else (None, None)
        inherited = max((error[u] for u in feeding[name]), default=0.0)
        rows.append(LayerError(name, op, rel, mean, rel - inherited, *corr).as_dict())
    return rows


def _feeding(graph, weighted: set[str]) -> dict[str, set[str]]:
    """Weighted layer -> the nearest weighted layers upstream of its data input."""
    producers = {o: n for n in graph.node for o in n.output}
    out = {}
    for n in graph.node:
        if n.name not in weighted:
            continue
        found, stack, seen = set(), [n.input[0]], set()
        while stack:
            p = producers.get(stack.pop())
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if p.name in weighted:
                found.add(p.name)
            else:
                stack.extend(p.input)
        out[n.name] = found
    return out


def worst(rows: list[dict], top: int = 10) -> list[dict]:
    """The layers where the error grows most: where it enters the network."""
    return sorted(rows, key=lambda r: -r["growth"])[:top]
