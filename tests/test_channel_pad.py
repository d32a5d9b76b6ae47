"""Depthwise layers padded to 16 channels for onnxruntime's fast INT8 kernel compute what they did."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from scarlet_deploy.calib import qdq, ranges, stats
from scarlet_deploy.calib.channel_pad import pad_depthwise_channels
from scarlet_deploy.runtime.runners.ort import OrtOptions, OrtRunner


def _se_block(path: Path, hidden: int = 24) -> Path:
    """Conv 1x1 -> HardSwish -> depthwise 3x3 -> HardSwish -> squeeze-excite -> Conv 1x1 -> pool -> Gemm."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def w(name, *shape, scale=0.5):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1"),
        helper.make_node("HardSwish", ["c1"], ["a1"], name="act1"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="dw", group=hidden, pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c2"], ["a2"], name="act2"),
        helper.make_node("GlobalAveragePool", ["a2"], ["p"], name="pool"),
        helper.make_node("Conv", ["p", "ws", "bs"], ["s"], name="squeeze"),
        helper.make_node("Relu", ["s"], ["sr"], name="relu"),
        helper.make_node("Conv", ["sr", "we", "be"], ["e"], name="excite"),
        helper.make_node("HardSigmoid", ["e"], ["gate"], name="gate", alpha=1 / 6),
        helper.make_node("Mul", ["a2", "gate"], ["m"], name="se_mul"),
        helper.make_node("Conv", ["m", "w3", "b3"], ["c3"], name="conv3"),
        helper.make_node("GlobalAveragePool", ["c3"], ["q"], name="head_pool"),
        helper.make_node("Flatten", ["q"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "se", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [w("w1", hidden, 3, 1, 1), w("b1", hidden), w("w2", hidden, 1, 3, 3), w("b2", hidden),
         w("ws", 8, hidden, 1, 1), w("bs", 8), w("we", hidden, 8, 1, 1), w("be", hidden),
         w("w3", 16, hidden, 1, 1), w("b3", 16), w("wf", 10, 16), w("bf", 10)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def se_qdq(tmp_path_factory) -> tuple[Path, np.ndarray]:
    d = tmp_path_factory.mktemp("pad")
    src = _se_block(d / "se.onnx")
    x = np.random.default_rng(1).standard_normal((16, 3, 16, 16)).astype(np.float32)
    target = qdq.TARGET_CONFIGS["ort"]
    out = d / "se.int8.onnx"
    qdq.quantize(src, ranges.compute_ranges(stats.collect(src, x, batch=8, threads=1), "minmax", target.symmetric),
                 target, out)
    return out, x


def _logits(path: Path, x: np.ndarray, opt_level: str) -> np.ndarray:
    with OrtRunner(path, options=OrtOptions(threads=1, opt_level=opt_level)) as r:
        return r.infer(x)


def _fused_ops(path: Path, tmp: Path) -> list[str]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp / f"{path.stem}.optimized.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # portable: no NCHWc layouts
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sorted(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_padding_24_channels_to_32_leaves_the_qdq_arithmetic_bit_identical(se_qdq, tmp_path):
    src, x = se_qdq
    model = onnx.load(src)
    assert pad_depthwise_channels(model) == ["dw"]
    onnx.checker.check_model(model)
    nodes = {n.name: n for n in model.graph.node}
    assert next(a.i for a in nodes["dw"].attribute if a.name == "group") == 32
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    by_output = {o: n for n in model.graph.node for o in n.output}
    w = {name: inits[by_output[nodes[name].input[1]].input[0]] for name in ("conv1", "dw", "excite", "squeeze", "conv3")}
    assert w["conv1"].shape[0] == w["dw"].shape[0] == w["excite"].shape[0] == 32
    assert w["squeeze"].shape[1] == w["conv3"].shape[1] == 32
    assert not w["conv1"][24:].any() and not w["squeeze"][:, 24:].any() and not w["conv3"][:, 24:].any()
    out = tmp_path / "padded.onnx"
    onnx.save(model, out)
    ref = _logits(src, x, "disable")
    assert np.array_equal(_logits(out, x, "disable"), ref)  # Q/DQ run in float: the same function
    on_kernels = _logits(out, x, "all")  # onnxruntime's integer kernels
    assert np.isfinite(on_kernels).all() and np.array_equal(on_kernels, _logits(src, x, "all"))
    # ... every layer on them: onnxruntime fuses a Q/DQ Conv only where its bias scale = input x weight scale
    assert _fused_ops(out, tmp_path) == _fused_ops(src, tmp_path) and "Conv" not in _fused_ops(out, tmp_path)
    nameless = onnx.load(src)  # node names are optional in ONNX: the groups must not lean on them
    for node in nameless.graph.node:
        node.name = ""
    assert pad_depthwise_channels(nameless) == [""]
    assert [i.dims for i in nameless.graph.initializer] == [i.dims for i in model.graph.initializer]


def test_channels_that_leave_through_anything_but_a_convolution_are_not_padded(se_qdq):
    model = onnx.load(se_qdq[0])
    model.graph.output.append(onnx.helper.make_tensor_value_info("a2", onnx.TensorProto.FLOAT, None))
    assert pad_depthwise_channels(model) == []  # a graph output of 24 channels must stay 24
    assert len(onnx.load(se_qdq[0]).graph.initializer) == len(model.graph.initializer)
