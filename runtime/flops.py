"""Work per image: multiply-accumulates counted from an ONNX graph.

Counted: Conv (grouped and depthwise included), Gemm and MatMul, plus their quantized
forms (QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger) so an INT8 model reports
the same work as its FP32 source. Everything else (activations, adds, pooling, BN that
was not folded) is elementwise and below 1 % of the MACs of these classifiers, so it is
left out, as papers (and SCARLET-NAS's 365M MACs for A) count it.

Shapes come from onnx shape inference with the batch dimension pinned to 1;
hand-written because onnx ships no MAC counter and the third-party ones
(onnx-tool, onnx-opcounter) would be a new dependency for forty lines.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from math import prod
from typing import Any

from scarlet_deploy.runtime.core.errors import ScarletError

# op type -> index of its weight input (the kernel / the second matmul operand)
_CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
_MATMUL_B = {"MatMul": 1, "MatMulInteger": 1, "QLinearMatMul": 3}


@dataclass
class MacReport:
    macs: int  # multiply-accumulates per image
    by_op: dict[str, int] = field(default_factory=dict)
    nodes: int = 0  # how many nodes were counted
    uncounted: list[str] = field(default_factory=list)  # counted op types whose shapes were unknown

    @property
    def flops(self) -> int:
        """2 floating-point operations (a multiply and an add) per MAC."""
        return 2 * self.macs

    def to_dict(self) -> dict[str, Any]:
        return {"macs": self.macs, "gflops": self.flops / 1e9, "by_op": self.by_op, "nodes": self.nodes,
                "uncounted": self.uncounted}


def _pin_batch(model, batch: int) -> None:
    """Make every graph input's first dimension `batch` when it is symbolic, so shapes infer fully."""
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits or not inp.type.tensor_type.HasField("shape"):
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch


def _shapes(model) -> dict[str, list[int | None]]:
    out: dict[str, list[int | None]] = {}
    for t in model.graph.initializer:
        out[t.name] = list(t.dims)
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    for node in model.graph.node:  # Constant nodes carry weights too in some exports
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = list(a.t.dims)
    return out


def _known(shape: list[int | None] | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _node_macs(node, shapes: dict[str, list[int | None]]) -> int | None:
    """MACs of one node for the pinned batch, or None when a needed shape is unknown."""
    op = node.op_type
    if op in _CONV_WEIGHT:
        w, y = shapes.get(node.input[_CONV_WEIGHT[op]]), shapes.get(node.output[0])
        if not (_known(w) and _known(y)):
            return None
        # y: (N, Cout, *spatial); w: (Cout, Cin/groups, *kernel): each output element is
        # one dot product of length Cin/groups * prod(kernel).
        return prod(y) * prod(w[1:])
    if op == "Gemm":
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        if not (_known(a) and _known(b)):
            return None
        attrs = {x.name: x.i for x in node.attribute}
        m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
        n = b[0] if attrs.get("transB", 0) else b[1]
        return m * k * n
    if op in _MATMUL_B:
        a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not (_known(a) and _known(y)):
            return None
        # numpy matmul semantics: every output element is a length-K dot product, K = a's last dim.
        return prod(y) * a[-1]
    return 0


def count_macs(model_or_path: Any, batch: int = 1) -> MacReport:
    """Multiply-accumulates per image of an ONNX model (path or ModelProto)."""
    import onnx

    if isinstance(model_or_path, (str, os.PathLike)):
        if not os.path.exists(model_or_path):
            raise ScarletError(f"ONNX model {model_or_path} does not exist; export it first (`make export`).")
        model = onnx.load(str(model_or_path))
    else:
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)  # pinning the batch must not change the caller's model
    _pin_batch(model, batch)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # onnx raises InferenceError / ValidationError subclasses
        raise ScarletError(f"onnx shape inference failed on {model_or_path}: {e}; re-export the model.") from e
    shapes = _shapes(model)
    by_op: Counter[str] = Counter()
    counted, uncounted = 0, set()
    for node in model.graph.node:
        macs = _node_macs(node, shapes)
        if macs is None:
            uncounted.add(node.op_type)
        elif macs:
            by_op[node.op_type] += macs
            counted += 1
    total = sum(by_op.values())
    return MacReport(macs=total // batch, by_op={k: v // batch for k, v in by_op.items()}, nodes=counted,
                     uncounted=sorted(uncounted))
