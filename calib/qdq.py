"""Q/DQ ONNX for a target, from a float ONNX and per-tensor ranges, through onnxruntime's quantize_static.

Ranges come from `ranges.py`; they reach quantize_static through its own calibration-cache
file (TensorsData JSON), so placement, per-channel weights and bias handling stay onnxruntime's.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from scarlet_deploy.runtime.core.host import cpu_flags, has_vnni

TARGETS = ("ort", "trt", "ov")
# What judges a target's accuracy (Target.evaluate_with), as the manifest and report say it
EVALUATED_WITH = {"ort": "onnxruntime CPU integer kernels", "fake-quant": "fake-quant (Q/DQ in float)",
                  "ov": "OpenVINO CPU INT8 kernels"}
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Target:
    name: str
    symmetric: bool  # activations symmetric (zero point 0)
    activation_type: str  # onnxruntime QuantType member name
    reduce_range: bool
    op_types: tuple[str, ...] | None  # None: everything onnxruntime knows how to quantize
    extra_options: dict[str, Any] = field(default_factory=dict)
    weight_type: str = "QInt8"
    # Bits of an activation's calibrated range that the inputs of GEMM-backed layers (every Conv
    # but depthwise, Gemm, MatMul) may use; 7 leaves UINT8 values <= 127 (see get_target).
    gemm_input_bits: int = 8
    # HardSwish as Add/Clip/Mul, which onnxruntime runs on integer kernels (see integer_hardswish)
    integer_hardswish: bool = False
    # depthwise layers padded to 16 channels, which onnxruntime's fast INT8 depthwise kernel needs (channel_pad.py)
    pad_depthwise: bool = False
    # What the accuracy is judged with: the runtime that runs the model. "ort": onnxruntime's CPU
    # integer kernels; "fake-quant": Q/DQ run as float quantise-dequantise, TensorRT's arithmetic
    # (on Lite0 the TensorRT Q/DQ model scores 88.3 % top-1 as fake-quant but 68 % through MLAS's
    # S8S8 kernels on an AVX2 CPU, which TensorRT never runs); "ov": OpenVINO's CPU INT8 kernels.
    evaluate_with: str = "ort"


TARGET_CONFIGS: dict[str, Target] = {
    # onnxruntime CPU: UINT8 activations x INT8 per-channel weights is the pair MLAS has fast
    # kernels for (measured on Lite0: 2.4x FP32; INT8 activations were slower and erratic).
    # The classifier keeps a float output: logits quantised to 8 bits would flip close top-1 calls.
    "ort": Target("ort", symmetric=False, activation_type="QUInt8", reduce_range=False, op_types=None,
                  # Clip/Relu stay explicit (onnxruntime still folds them into QLinearConv at load time):
                  # a layer kept in float reads the tensor in front of the Q, which must be activated.
                  extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"],
                                 "QDQKeepRemovableActivations": True},
                  integer_hardswish=True, pad_depthwise=True),
    # TensorRT explicit quantization: symmetric INT8, per-channel weights, Q/DQ on the inputs of
    # weighted layers (outputs stay float so TensorRT picks the fusion), float bias, and the
    # residual Add input that TensorRT fuses into the preceding convolution.
    "trt": Target("trt", symmetric=True, activation_type="QInt8", reduce_range=False,
                  op_types=("Conv", "Gemm", "MatMul", "Add"),
                  extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                 "OpTypesToExcludeOutputQuantization": ["Conv", "Gemm", "MatMul", "Add"]},
                  evaluate_with="fake-quant"),
    # OpenVINO CPU: Q/DQ on the inputs of weighted layers and Adds only, as NNCF places them. A layer's
    # output stays float up to the next layer's Q, so OpenVINO fuses HardSwish, ReLU, the bias and the
    # requantisation into the INT8 convolution as post-ops; the `ort` model's Q after every
    # convolution left each HardSwish a pass of its own (SCARLET-A, batch 8, 2 threads on AVX-512
    # VNNI: 31 % of OpenVINO's time; ~290 img/s on the `ort` model, ~405 on this one).
    # UINT8 activations with zero points, symmetric INT8 per-channel weights, INT32 bias. The weights
    # are symmetric without asking: onnxruntime 1.32 writes INT8 per-channel weights with zero point 0
    # whatever "WeightSymmetric" says (the output is byte-identical with True, False or unset), so the
    # option is not passed; tests/test_calib.py pins the zero points instead.
    "ov": Target("ov", symmetric=False, activation_type="QUInt8", reduce_range=False,
                 op_types=("Conv", "Gemm", "MatMul", "Add"),
                 extra_options={"OpTypesToExcludeOutputQuantization": ["Conv", "Gemm", "MatMul", "Add"]},
                 evaluate_with="ov"),
}


def host_has_vnni() -> bool:
    # Unknown flags (no /proc/cpuinfo): assume VNNI, i.e. keep 8-bit activations, the better-accuracy default.
    return cpu_flags() is None or has_vnni()


def int8_isa() -> str:
    """The instruction set INT8 speed depends on, for every speed claim to name."""
    flags = cpu_flags()
    if flags is None:
        return "unknown ISA"
    for flag, name in (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
                       ("avx512bw", "AVX-512 without VNNI"), ("avx2", "AVX2 without VNNI")):
        if flag in flags:
            return name
    return "no AVX2"


def get_target(name: str) -> Target:
    """The target's settings for this host. Without VNNI, MLAS multiplies UINT8 x INT8 pairs with
    vpmaddubsw into saturating 16-bit sums: 255 x 127 x 2 overflows, 127 x 127 x 2 does not.
    onnxruntime's advice is reduce_range (7-bit weights); giving the bit up on the activations
    that GEMM kernels read instead (guard_gemm_inputs) keeps 8-bit weights. Lite0, percentile
    ranges, every layer INT8, 300 held-out images, onnxruntime integer kernels on an AVX2-only
    EPYC, logits rel. RMSE vs FP32: 8-bit weights and activations 0.40 (88.7 % top-1 agreement:
    saturation), 7-bit weights 0.22 (94.0 %), 7-bit GEMM inputs 0.12 (96.3 %), at the same speed
    (1.51x vs 1.52x FP32, one interleaved run). UINT8 weights avoid saturation too but run 3x
    slower than FP32."""
    from scarlet_deploy.runtime.core.errors import ScarletError

    if name not in TARGET_CONFIGS:
        raise ScarletError(f"unknown --target {name!r}; choose one of: {', '.join(TARGETS)}.")
    t = TARGET_CONFIGS[name]
    if t.evaluate_with == "ov":
        from scarlet_deploy.runtime.runners.openvino import openvino_missing

        missing = openvino_missing()
        if missing:
            raise ScarletError(f"--target {name} is judged on OpenVINO's own INT8 kernels: {missing}.")
    if name == "ort" and not host_has_vnni():
        t = replace(t, gemm_input_bits=7)
    return t


Ranges = dict[str, tuple[float, float]]


def guard_gemm_inputs(model, ranges: Ranges, bits: int,
                      quantised: Callable[[str], bool] = lambda name: True) -> tuple[Ranges, list[str]]:
    """Keep the UINT8 values that GEMM-backed layers (every Conv but depthwise, Gemm, MatMul) read
    within `bits`: their input ranges are widened so the calibrated values land in [0, 2**bits - 1],
    zero point unchanged. Depthwise convolutions run on MLAS kernels that widen to 16 bits first
    and keep all 8 bits. An input that a Clip produces (ReLU6) cannot be widened: onnxruntime
    folds the Clip into the producer's output quantisation only when that range lies inside the
    clip, and an unfolded Clip breaks the layer's integer fusion (Lite0: 1.44x FP32 -> 1.09x).
    There a `Mul(x, 1)` is inserted that onnxruntime runs as a QLinearMul requantising 8 -> 7
    bits (no measurable cost on Lite0). Layers for which `quantised` is false are left alone.
    Edits `model` in place; returns the ranges to quantise with and the requantize nodes added."""
    import numpy as np
    from onnx import helper, numpy_helper

    if bits >= 8:
        return ranges, []
    g = model.graph
    dims = {t.name: list(t.dims) for t in g.initializer}
    producers = edges(g)[0]
    f = 255.0 / (2 ** bits - 1)

    def widened(name: str) -> tuple[float, float]:
        lo, hi = min(ranges[name][0], 0.0), max(ranges[name][1], 0.0)
        return lo, lo + (hi - lo) * f

    out, added, nodes, one = dict(ranges), [], [], "scarlet_requantize_one"
    for n in g.node:
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        depthwise = n.op_type == "Conv" and group > 1 and dims.get(n.input[1], [0, 0])[1] == 1
        x = n.input[0] if n.input else ""
        if n.op_type in WEIGHTED_OPS and not depthwise and x in ranges and quantised(n.name):
            src = producers.get(x)
            if src is not None and src.op_type == "Clip":
                req = f"{n.name}/requantize"
                nodes.append(helper.make_node("Mul", [x, one], [f"{x}/requantized"], name=req))
                n.input[0] = f"{x}/requantized"
                out[n.input[0]] = widened(x)
                added.append(req)
            else:
                out[x] = widened(x)
        nodes.append(n)
    if added:
        del g.node[:]
        g.node.extend(nodes)
        g.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
    return out, added


def integer_hardswish(model, ranges: Ranges, quantised: Callable[[str], bool] = lambda name: True
                      ) -> tuple[Ranges, list[str]]:
    """Rewrite HardSwish(x) as Mul(x, Clip(x + 3, 0, 6) x 1/6). onnxruntime
    has no integer HardSwish: between INT8 layers it ran DequantizeLinear, HardSigmoid, Mul and
    QuantizeLinear in float, half of SCARLET-A's INT8 time. The rewrite runs as QLinearAdd (the
    Clip folds into its output range) and QLinearMul; fold_scales() then turns the 1/6 into the
    gate's dequantisation scale. Ranges of the new tensors follow from the HardSwish's own: nothing is
    recalibrated. HardSwish nodes whose producer stays float are left alone. Edits `model` in
    place; returns the ranges and the names of the nodes added."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    producers = edges(g)[0]
    todo = [n for n in g.node if n.op_type == "HardSwish" and n.input[0] in ranges and n.output[0] in ranges
            and n.input[0] in producers and quantised(producers[n.input[0]].name)]
    if not todo:
        return ranges, []
    consts = {"hardswish_three": 3.0, "hardswish_zero": 0.0, "hardswish_six": 6.0, "hardswish_sixth": 1.0 / 6.0}
    g.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items())
    out, added, nodes, rewrite = dict(ranges), [], [], {id(n) for n in todo}
    for n in g.node:
        if id(n) not in rewrite:
            nodes.append(n)
            continue
        x, y, p = n.input[0], n.output[0], n.name or n.output[0]
        plus3, gate, sixth = f"{p}/plus3", f"{p}/gate", f"{p}/gate_sixth"
        nodes += [helper.make_node("Add", [x, "hardswish_three"], [plus3], name=f"{p}/add"),
                  helper.make_node("Clip", [plus3, "hardswish_zero", "hardswish_six"], [gate], name=f"{p}/clip"),
                  helper.make_node("Mul", [gate, "hardswish_sixth"], [sixth], name=f"{p}/scale"),
                  helper.make_node("Mul", [x, sixth], [y], name=f"{p}/mul")]
        lo, hi = ranges[x]
        out[plus3] = out[gate] = (max(0.0, lo + 3.0), min(6.0, hi + 3.0))  # inside [0, 6]: the Clip folds
        out[sixth] = (out[gate][0] / 6.0, out[gate][1] / 6.0)
        added += [f"{p}/{k}" for k in ("add", "clip", "mul", "scale")]
    del g.node[:]
    g.node.extend(nodes)
    return out, added


def edges(graph) -> tuple[dict[str, Any], dict[str, list]]:
    """Tensor name -> the node that writes it, and -> the nodes that read it."""
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producers, consumers


def fold_scales(model, names: list[str]) -> int:
    """Remove those of the named nodes that are `DQ -> Mul(constant c > 0) -> Q` steps from a Q/DQ
    model by dequantising the Mul's input with scale x c instead: exact, one integer pass less."""
    import numpy as np
    from onnx import numpy_helper

    g = model.graph
    producers, consumers = edges(g)
    inits = {t.name: t for t in g.initializer}
    folded, drop = 0, []
    for mul in [n for n in g.node if n.name in set(names) and n.op_type == "Mul"]:
        dq_in, const = producers.get(mul.input[0]), producers.get(mul.input[1])
        after = consumers.get(mul.output[0], [])
        if dq_in is None or dq_in.op_type != "DequantizeLinear" or len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        c = _constant_value(const, mul.input[1], inits)
        dq_out = consumers.get(after[0].output[0], [])
        if c is None or c <= 0 or not dq_out or any(d.op_type != "DequantizeLinear" for d in dq_out):
            continue
        scale = numpy_helper.to_array(inits[dq_in.input[1]]) * np.float32(c)
        g.initializer.append(numpy_helper.from_array(scale.astype(np.float32), f"{mul.name}/folded_scale"))
        for d in dq_out:
            d.input[:] = [dq_in.input[0], f"{mul.name}/folded_scale"] + list(dq_in.input[2:])
        drop += [mul, after[0]] + ([const] if const is not None and len(consumers[const.output[0]]) == 1 else [])
        if len(consumers[dq_in.output[0]]) == 1:
            drop.append(dq_in)
        folded += 1
    for n in drop:
        g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    return folded


def _constant_value(producer, name: str, inits: dict) -> float | None:
    """The scalar a Mul input holds: an initializer, or a DequantizeLinear of initializers."""
    import numpy as np
    from onnx import numpy_helper

    def scalar(t: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[t]) if t in inits and int(np.prod(inits[t].dims)) == 1 else None

    if producer is None:
        v = scalar(name)
        return None if v is None else float(v.reshape(()))
    if producer.op_type != "DequantizeLinear":
        return None
    q, s = scalar(producer.input[0]), scalar(producer.input[1])
    zp = scalar(producer.input[2]) if len(producer.input) > 2 else np.zeros((), np.int32)
    if q is None or s is None or zp is None:
        return None
    return float((q.astype(np.int64) - zp.astype(np.int64)).reshape(()) * s.reshape(()))


@contextlib.contextmanager
def quiet_quantizer():
    # quantize_static logs a pre-processing hint on every call; the exported ONNX is already
    # simplified and shape-inferred, and the hint would repeat for every sensitivity probe.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize(model_path: str | os.PathLike, ranges: dict[str, tuple[float, float]], target: Target,
             output: str | os.PathLike, nodes_to_exclude: list[str] | None = None,
             nodes_to_quantize: list[str] | None = None) -> None:
    """Write the Q/DQ model for `target` to `output` (not atomically: callers pass a temporary)."""
    import numpy as np
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    skip = set(nodes_to_exclude or ())

    def quantised(name: str) -> bool:
        return name not in skip and (nodes_to_quantize is None or name in nodes_to_quantize)

    hardswish: list[str] = []
    requantize: list[str] = []
    if target.integer_hardswish or target.gemm_input_bits < 8:  # a rewrite may apply: read the graph
        source_model = onnx.load(str(model_path))
        if target.integer_hardswish:
            ranges, hardswish = integer_hardswish(source_model, ranges, quantised)
        ranges, requantize = guard_gemm_inputs(source_model, ranges, target.gemm_input_bits, quantised)
    if nodes_to_quantize is not None:
        nodes_to_quantize = list(nodes_to_quantize) + hardswish + requantize
    data = TensorsData(CalibrationMethod.MinMax, {
        k: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for k, (lo, hi) in ranges.items()})
    with tempfile.TemporaryDirectory(prefix="scarlet-q-") as d, quiet_quantizer():
        cache = Path(d) / "ranges.json"
        save_tensors_data(data, cache)
        source = Path(model_path)
        if hardswish or requantize:  # the graph changed; ranges alone travel in the cache file
            source = Path(d) / "source.onnx"
            onnx.save(source_model, source)
        quantize_static(
            str(source), str(output), None, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(target.op_types) if target.op_types else None,
            per_channel=True, reduce_range=target.reduce_range,
            activation_type=getattr(QuantType, target.activation_type), weight_type=getattr(QuantType, target.weight_type),
            nodes_to_quantize=nodes_to_quantize, nodes_to_exclude=nodes_to_exclude,
            calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=str(cache),
            extra_options=dict(target.extra_options))
    if target.name == "trt" or nodes_to_exclude or hardswish:
        model = onnx.load(str(output))
        fold_scales(model, hardswish)
        if target.name == "trt":
            _drop_qdq_before_fused_add(model)
        if nodes_to_exclude:
            _read_float_inputs(model, set(nodes_to_exclude))
        onnx.save(model, str(output))


def _read_float_inputs(model, names: set[str]) -> None:
    """Make layers kept in float read the float tensor instead of its DequantizeLinear output.
    onnxruntime's WeightBiasQuantization pass turns any DQ -> Conv(float weights) -> Q sandwich back
    into a QLinearConv with per-tensor 8-bit weights (which saturate on AVX2), so without this an
    excluded layer ran in INT8 anyway and less accurately (Lite0: logits RMSE 0.21 -> 0.34)."""
    g = model.graph
    producers = edges(g)[0]
    for n in g.node:
        if n.name not in names:
            continue
        for k, t in enumerate(n.input):
            dq = producers.get(t)
            q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                n.input[k] = q.input[0]
    # Q/DQ pairs that no longer feed anything are left for onnxruntime to prune.


def _drop_qdq_before_fused_add(model) -> int:
    """TensorRT fuses `Conv -> Add(residual)` when only the residual input of the Add is quantized:
    remove the Q/DQ pair between a weighted layer's output and an Add that is its only consumer."""
    g = model.graph
    producers, consumers = edges(g)
    dropped = 0
    for add in [n for n in g.node if n.op_type == "Add"]:
        for k, t in enumerate(add.input):
            dq = producers.get(t)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            src = producers.get(q.input[0])
            if src is None or src.op_type not in WEIGHTED_OPS:
                continue
            if len(consumers.get(q.input[0], [])) != 1 or len(consumers.get(t, [])) != 1:
                continue
            add.input[k] = q.input[0]
            g.node.remove(dq)
            g.node.remove(q)
            dropped += 1
    return dropped


ACTIVATIONS = ("Relu", "Clip")
# Other ops whose quantisation the search may undo (data movement such as Reshape/Flatten only
# follows its neighbours' Q/DQ and is not a layer of its own).
ARITHMETIC = ("Add", "Mul", "GlobalAveragePool", "AveragePool", "MaxPool", "Sigmoid", "Relu", "Clip",
              "LeakyRelu", "Concat", "Softmax")


def _target_ops(target: Target) -> set[str]:
    if target.op_types:
        return set(target.op_types)
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return set(QDQRegistry) | set(QLinearOpsRegistry)  # what quantize_static uses when given none


def layers(model_path: str | os.PathLike, target: Target) -> dict[str, list[str]]:
    """Layer name -> the nodes it stands for, for every node `target` quantises that the search may
    keep in float. A weighted layer includes a ReLU/Clip it alone feeds: onnxruntime folds that
    activation into the layer's output Q/DQ (its range becomes the layer's), so quantising or
    excluding one without the other measures the wrong thing (measured on Lite0: the stem conv
    alone looked 0.34 logits-RMSE sensitive, with its ReLU6 0.04)."""
    import onnx

    g = onnx.load(str(model_path), load_external_data=False).graph
    ops = _target_ops(target)
    consumers = edges(g)[1]
    out: dict[str, list[str]] = {}
    absorbed: set[str] = set()
    for n in g.node:
        if n.op_type in WEIGHTED_OPS and n.op_type in ops:
            nxt = consumers.get(n.output[0], [])
            act = [nxt[0].name] if len(nxt) == 1 and nxt[0].op_type in ACTIVATIONS else []
            out[n.name] = [n.name] + act
            absorbed.update(act)
    for n in g.node:
        if n.op_type in ARITHMETIC and n.op_type in ops and n.name not in absorbed:
            out[n.name] = [n.name]
    return out
