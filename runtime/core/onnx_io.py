"""An ONNX classifier's interface checked against the model a command assumes, before it runs.

A file that is not ONNX would surface as a protobuf DecodeError deep inside a command; a
10-class model or a 32x32 input would run and print ImageNet names for garbage, or fail inside
onnxruntime with a shape traceback. `check_classifier` turns each of them into one sentence.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from scarlet_deploy.runtime.core.errors import ScarletError

Dim = int | str  # a fixed size, or a symbolic (dynamic) one


@dataclass(frozen=True)
class ClassifierIO:
    input_name: str
    input_shape: tuple[Dim, ...]
    output_name: str
    output_shape: tuple[Dim, ...]


def _dims(value_info) -> tuple[Dim, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                 for d in value_info.type.tensor_type.shape.dim)


@lru_cache(maxsize=32)
def _read_io(path: str, ino: int, mtime_ns: int, size: int) -> tuple[list, list]:
    import onnx

    try:
        graph = onnx.load(path, load_external_data=False).graph
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, onnx's own errors, OSError: all mean "not readable ONNX"
        if isinstance(e, MemoryError):
            raise
        why = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise ScarletError(f"{path} is not a readable ONNX model ({type(e).__name__}: {why}); it is truncated, corrupt "
                           "or another kind of file. Re-create it with `scarlet export` (or the command that made it).") from None
    inits = {t.name for t in graph.initializer}
    return ([(v.name, _dims(v)) for v in graph.input if v.name not in inits],
            [(v.name, _dims(v)) for v in graph.output])


def read_io(path: str | os.PathLike) -> tuple[list[tuple[str, tuple[Dim, ...]]], list[tuple[str, tuple[Dim, ...]]]]:
    """(inputs, outputs) of the graph as (name, dims); a ScarletError when the file is missing or not ONNX."""
    path = str(path)
    if not os.path.isfile(path):
        raise ScarletError(f"ONNX model {path} does not exist (or is not a file); create it with `scarlet export` (or `make export`).")
    st = os.stat(path)
    return _read_io(os.path.realpath(path), st.st_ino, st.st_mtime_ns, st.st_size)


def check_classifier(path: str | os.PathLike, image_size: int = 224, num_classes: int = 1000,
                     model: str | None = None) -> ClassifierIO:
    """One (N, 3, image_size, image_size) input and one (N, num_classes) output, or a ScarletError
    naming the file and what it should be. Symbolic dimensions pass (they are checked by the runtime)."""
    inputs, outputs = read_io(path)
    who = model or "this command"
    redo = f"pass the ONNX exported for {model} (`scarlet export --model {model}`)" if model else \
        "pass an ONNX exported by `scarlet export`"
    if len(inputs) != 1 or len(outputs) != 1:
        raise ScarletError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; an image classifier has one image "
                           f"input and one logits output. {redo[0].upper() + redo[1:]}.")
    (iname, ishape), (oname, oshape) = inputs[0], outputs[0]
    want_in = ("N", 3, image_size, image_size)
    if len(ishape) != 4 or any(isinstance(g, int) and g != w for g, w in zip(ishape[1:], want_in[1:])):
        raise ScarletError(f"{path} takes input {iname} of shape {_fmt(ishape)}, but {who} feeds {_fmt(want_in)} images; "
                           f"{redo}.")
    if len(oshape) != 2 or (isinstance(oshape[1], int) and oshape[1] != num_classes):
        classes = oshape[1] if len(oshape) == 2 else None
        what = f"{classes} classes" if classes is not None else f"shape {_fmt(oshape)}"
        raise ScarletError(f"{path} outputs {what}, but {who} has {num_classes} (ImageNet-1k) classes, so its labels "
                           f"and accuracy would be meaningless; {redo}.")
    return ClassifierIO(iname, ishape, oname, oshape)


def _fmt(shape: tuple[Dim, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


QUANTISED_OPS = ("QuantizeLinear", "DequantizeLinear", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear")


def graph_precision(path: str | os.PathLike) -> str:
    """What the graph computes in, read from its nodes and weights: int8 (Q/DQ or QLinear/Integer
    operators), fp16 (float16 weights), else fp32. A ScarletError when the file is not ONNX."""
    import onnx

    read_io(path)  # missing or not ONNX: one sentence
    g = onnx.load(str(path), load_external_data=False).graph
    if any(n.op_type in QUANTISED_OPS or n.op_type.startswith("QLinear") for n in g.node):
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in g.initializer) or \
            any(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in g.input):
        return "fp16"
    return "fp32"
