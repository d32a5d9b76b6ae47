"""Pad depthwise convolutions of a Q/DQ model to a multiple of 16 channels, exactly.

onnxruntime's fast symmetric INT8 depthwise kernel (MLAS ConvSym, requantisation fused) takes
only channel counts that are a multiple of 16 on x86 (`MlasConvSymPackWSize` in
onnxruntime/core/mlas/lib/convsym.cpp); any other count falls back to a generic kernel plus a
separate requantisation pass. SCARLET's 40 -> 120 channel blocks hit it: on SCARLET-A (batch 8,
2 threads, AVX-512 VNNI) mb_module.3's 7x7 depthwise QLinearConv took 1.28 ms against 0.31 ms for
mb_module.8's 7x7 with 240 channels on a quarter of the pixels.

The padding is exact: the layers that write the channel group get zero weights and bias for the
new channels, the depthwise convolutions zero filters, and the layers that read the group zero
weights on those inputs, so nothing in them reaches a real channel; the ops in between (HardSwish's
Add/Mul, the squeeze-excite gate, Q/DQ pairs) never mix channels. The logits are bit-identical,
run as float Q/DQ and on onnxruntime's integer kernels alike (seeded SCARLET-A, 8 images), and
mb_module.3's 7x7 went from ~1.3 to 0.68 ms per batch of 8 (`scarlet profile --nodes`, 2 threads,
AVX-512 VNNI).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scarlet_deploy.calib.qdq import edges

ALIGN = 16
# Ops that act on each channel alone (and Q/DQ of activations): a channel group passes through them
PER_CHANNEL_OPS = ("QuantizeLinear", "DequantizeLinear", "Add", "Mul", "Clip", "Relu", "HardSwish", "HardSigmoid",
                   "Sigmoid", "GlobalAveragePool")


@dataclass
class _Group:
    tensors: set[str] = field(default_factory=set)
    # convolutions, id() -> node: node names need not be unique or present in an ONNX a user brings
    writers: dict[int, Any] = field(default_factory=dict)  # convolutions whose output channels grow
    readers: dict[int, Any] = field(default_factory=dict)  # convolutions whose input channels grow
    depthwise: dict[int, Any] = field(default_factory=dict)


def _is_depthwise(node, weight_shape: tuple[int, ...] | None) -> bool:
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return weight_shape is not None and group > 1 and weight_shape[1] == 1 and weight_shape[0] == group


def pad_depthwise_channels(model, align: int = ALIGN) -> list[str]:
    """Pad, in place, every depthwise Conv whose channels are not a multiple of `align` and the
    layers around it; returns the names of the depthwise Convs padded. A channel group that
    reaches anything but per-channel ops and convolutions (a Reshape, a graph output, a
    per-channel constant) is left as it is."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers, consumers = edges(g)
    outputs = {o.name for o in g.output}

    def weight(conv) -> tuple[str, ...] | None:
        """(int8 weight, scale, zero point) initializers behind the Conv's weight DequantizeLinear."""
        dq = producers.get(conv.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or not all(i in inits for i in dq.input):
            return None
        return tuple(dq.input)

    def shape(conv) -> tuple[int, ...] | None:
        w = weight(conv)
        return tuple(inits[w[0]].dims) if w else None

    def constant(t: str) -> bool:  # a per-tensor constant (HardSwish's 3, a scale) broadcasts over any channels
        p = producers.get(t)
        src = t if p is None else (p.input[0] if p.op_type == "DequantizeLinear" else None)
        return src in inits and int(np.prod(inits[src].dims)) == 1

    def data_inputs(node) -> list[str]:  # a Q/DQ's scale and zero point, like any constant, are no channels
        ins = node.input[:1] if node.op_type in ("QuantizeLinear", "DequantizeLinear") else node.input
        return [i for i in ins if i and not constant(i)]

    def group_of(start) -> _Group | None:
        grp, todo = _Group(depthwise={id(start): start}), [start.input[0], start.output[0]]

        def meet_conv(conv, writes_group: bool) -> bool:
            """A Conv at the group's edge: a depthwise one joins and carries the group through."""
            if _is_depthwise(conv, shape(conv)):
                grp.depthwise[id(conv)] = conv
                todo.append(conv.input[0] if writes_group else conv.output[0])
            elif weight(conv) is not None:
                (grp.writers if writes_group else grp.readers)[id(conv)] = conv
            else:
                return False
            return True

        while todo:
            t = todo.pop()
            if t in grp.tensors:
                continue
            grp.tensors.add(t)
            p = producers.get(t)
            if t in outputs or p is None:
                return None
            if p.op_type == "Conv":
                if not meet_conv(p, writes_group=True):
                    return None
            elif p.op_type in PER_CHANNEL_OPS:
                todo += data_inputs(p)
            else:
                return None
            for c in consumers.get(t, []):
                if c.op_type == "Conv" and c.input[0] == t:
                    if not meet_conv(c, writes_group=False):
                        return None
                elif c.op_type in PER_CHANNEL_OPS:
                    todo += list(c.output) + data_inputs(c)
                else:
                    return None
        return grp

    def pad(name: str, axis: int, extra: int, value: float = 0) -> None:
        t = inits[name]
        if len(t.dims) <= axis or (axis == 0 and len(t.dims) == 1 and t.dims[0] == 1):
            return  # a per-tensor scale or zero point serves every channel
        a = numpy_helper.to_array(t)
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, extra)
        t.CopyFrom(numpy_helper.from_array(np.pad(a, widths, constant_values=np.array(value, a.dtype)), name))

    padded: list[str] = []
    done: set[int] = set()
    for n in list(g.node):
        if n.op_type != "Conv" or id(n) in done or not _is_depthwise(n, shape(n)) or shape(n)[0] % align == 0:
            continue
        grp = group_of(n)
        if grp is None:
            continue
        channels = shape(n)[0]
        writing = [*grp.writers.values(), *grp.depthwise.values()]  # their output channels grow
        readers = list(grp.readers.values())
        if any(shape(c)[0] != channels for c in writing) or any(shape(c)[1] != channels for c in readers):
            continue  # a broadcast operand of other width joined the group: not a plain channel run
        extra = -channels % align
        params = [weight(c) for c in writing + readers]
        params += [producers[c.input[2]].input for c in writing if len(c.input) > 2 and c.input[2] in producers]
        used = [i for p in params for i in p]
        if len(used) != len(set(used)):  # shared initializers would be padded twice
            continue
        for conv in writing:  # output channels: weights, scales, zero points, bias
            w, scale, zp = weight(conv)
            w_scale = numpy_helper.to_array(inits[scale]).reshape(-1)
            pad(w, 0, extra)
            pad(scale, 0, extra, float(w_scale[-1]))
            pad(zp, 0, extra)
            if len(conv.input) > 2 and conv.input[2]:
                b = producers.get(conv.input[2])
                names = list(b.input) if b is not None and b.op_type == "DequantizeLinear" else [conv.input[2]]
                for k, name in enumerate(names):
                    # onnxruntime fuses the layer only where bias scale = input scale x weight scale, channel by channel
                    last = float(numpy_helper.to_array(inits[name]).reshape(-1)[-1]) if k == 1 else 0
                    pad(name, 0, extra, last)
            if id(conv) in grp.depthwise:
                next(a for a in conv.attribute if a.name == "group").i = channels + extra
        for conv in readers:
            pad(weight(conv)[0], 1, extra)
        params_out = {c.input[k] for c in writing + readers for k in (1, 2) if len(c.input) > k}
        stale = [v for v in g.value_info if v.name in grp.tensors | params_out]  # shapes that said `channels`
        for v in stale:
            g.value_info.remove(v)
        done |= set(grp.depthwise)
        padded += sorted(c.name for c in grp.depthwise.values())
    return padded
