"""Replace spelled-out h-swish / h-sigmoid sub-graphs with ONNX HardSwish / HardSigmoid.

Written by hand because neither onnxsim nor onnxoptimizer fuses these patterns, and
onnxruntime's own fusion lives only inside a session, not in the file TensorRT and
other runtimes read. A pattern is replaced only when its constants are exactly those
of h-swish (x * clip(x + 3, 0, 6) / 6) and h-sigmoid (clip(x + 3, 0, 6) / 6), so the
result matches up to float rounding.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import onnx
from onnx import helper, numpy_helper


class _Graph:
    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.graph_outputs = {o.name for o in graph.output}

    def const(self, name: str, value: float) -> bool:
        v = self.consts.get(name)
        return v is not None and v.size == 1 and float(v.reshape(())) == value

    def private(self, name: str) -> bool:
        """Only one consumer and not a graph output: safe to delete its producer."""
        return len(self.consumers[name]) == 1 and name not in self.graph_outputs

    def node(self, name: str, op: str) -> onnx.NodeProto | None:
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op else None

    def clip_of_x_plus_3(self, name: str) -> tuple[str, list[onnx.NodeProto]] | None:
        """If `name` = clip(x + 3, 0, 6): (x, [add, clip])."""
        clip = self.node(name, "Clip")
        if clip is None or len(clip.input) != 3 or not (self.const(clip.input[1], 0.0) and self.const(clip.input[2], 6.0)):
            return None
        add = self.node(clip.input[0], "Add")
        if add is None or not self.private(add.output[0]):
            return None
        a, b = add.input
        x = a if self.const(b, 3.0) else b if self.const(a, 3.0) else None
        return (x, [add, clip]) if x is not None else None


def fuse_hard_activations(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Counter]:
    """Returns the rewritten model and how many of each op were fused."""
    g = _Graph(model.graph)
    replace: dict[int, onnx.NodeProto] = {}  # id(first node of pattern) -> fused node
    drop: set[int] = set()
    fused: Counter = Counter()
    for div in model.graph.node:
        if div.op_type != "Div" or not g.const(div.input[1], 6.0):
            continue
        src = div.input[0]
        hsig = g.clip_of_x_plus_3(src)
        if hsig and g.private(src):
            x, nodes = hsig
            new = helper.make_node("HardSigmoid", [x], [div.output[0]], name=f"{div.name or div.output[0]}/HardSigmoid",
                                   alpha=1.0 / 6.0, beta=0.5)
            fused["HardSigmoid"] += 1
        else:
            mul = g.node(src, "Mul")
            if mul is None or not g.private(src):
                continue
            match = None
            for clip_in, other in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
                m = g.clip_of_x_plus_3(clip_in)
                if m and m[0] == other and g.private(clip_in):
                    match = m
                    break
            if match is None:
                continue
            x, nodes = match[0], match[1] + [mul]
            new = helper.make_node("HardSwish", [x], [div.output[0]], name=f"{div.name or div.output[0]}/HardSwish")
            fused["HardSwish"] += 1
        replace[id(nodes[0])] = new
        drop.update(id(n) for n in nodes[1:] + [div])
    kept = []
    for n in model.graph.node:
        if id(n) in replace:
            kept.append(replace[id(n)])
        elif id(n) not in drop:
            kept.append(n)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    drop_unused(out)
    return out, fused


def drop_unused(model: onnx.ModelProto) -> None:
    """Remove initializers and Constant nodes nothing reads."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    nodes = [n for n in model.graph.node if not (n.op_type == "Constant" and n.output[0] not in used)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))
