"""One form for what either exporter writes, so that the file downstream reads does not depend on the exporter.

After onnxsim and the h-activation fusion, the TorchScript and dynamo exporters still differ in ways that
change nothing numerically but do change what calibration, FP16 conversion and the manifests see:
- dynamo decomposes AdaptiveAvgPool2d(1) into ReduceMean over H, W; TorchScript writes GlobalAveragePool,
  which calib/qdq and calib/channel_pad handle as pooling. ReduceMean(axes = H, W, keepdims) over a 4-D
  tensor becomes GlobalAveragePool (the same sum / count, so the same float result).
- TorchScript keeps scalar constants as Constant nodes, dynamo's optimizer as initializers: all become
  initializers (the Constant node is no operator of the network, yet it shows in the op histogram).
- dynamo writes each node's Python stack trace (with the checkout's absolute paths), module path and FX
  node as metadata, and value_info with its own dimension names: none of it is needed to run the model,
  and the stack traces would make the bytes depend on where the checkout lives. Doc strings and metadata
  are dropped (onnxsim's record of its own settings too: the manifest has the tool versions), and value_info
  is left to the strict shape inference that follows.
"""
from __future__ import annotations

from collections import Counter

import onnx
from onnx import numpy_helper

from scarlet_deploy.export.fuse import drop_unused


def canonicalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Counter]:
    """A rewritten copy of `model` and how many nodes each rewrite changed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    done: Counter = Counter()
    done["Constant->initializer"] = _constants_to_initializers(out.graph)
    done["ReduceMean->GlobalAveragePool"] = _global_average_pools(out)
    drop_unused(out)
    _strip_metadata(out)
    return out, +done


def _constants_to_initializers(graph: onnx.GraphProto) -> int:
    taken = {i.name for i in graph.initializer}
    keep, moved = [], 0
    for n in graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value" \
                and n.output[0] not in taken and not n.domain:
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            graph.initializer.append(t)
            moved += 1
        else:
            keep.append(n)
    del graph.node[:]
    graph.node.extend(keep)
    return moved


def _global_average_pools(model: onnx.ModelProto) -> int:
    graph = model.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in onnx.shape_inference.infer_shapes(model).graph.value_info if v.type.tensor_type.HasField("shape")}
    ranks.update({v.name: len(v.type.tensor_type.shape.dim) for v in graph.input})
    inits = {i.name: i for i in graph.initializer}
    rewritten = 0
    for n in graph.node:
        if n.op_type != "ReduceMean" or n.domain or ranks.get(n.input[0]) != 4:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if len(n.input) > 1 and n.input[1]:
            if n.input[1] not in inits:
                continue  # axes computed at run time
            axes = numpy_helper.to_array(inits[n.input[1]]).tolist()
        else:
            axes = attrs.get("axes")
        if axes is None or sorted(a % 4 for a in axes) != [2, 3] or attrs.get("keepdims", 1) != 1:
            continue
        n.op_type = "GlobalAveragePool"
        del n.input[1:]
        del n.attribute[:]
        rewritten += 1
    return rewritten


def _strip_metadata(model: onnx.ModelProto) -> None:
    model.doc_string = ""
    del model.metadata_props[:]
    g = model.graph
    g.doc_string = ""
    del g.metadata_props[:]
    del g.value_info[:]
    for v in (*g.input, *g.output, *g.initializer):
        v.doc_string = ""
        del v.metadata_props[:]
    for n in g.node:
        n.doc_string = ""
        del n.metadata_props[:]
