"""Triton model repositories: the one `scarlet serve` runs, and the standard one `scarlet triton` writes.

Configs are protobuf text (config.pbtxt) for Triton's ModelConfig; tests parse every one against the
model_config_pb2 schema that tritonclient ships, so a field name or type we get wrong fails there.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scarlet_deploy.export.registry import get_spec
from scarlet_deploy.runtime.core.artifacts import read_manifest, write_bytes_atomic, write_json_atomic
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.data import classes
from scarlet_deploy.runtime.predict import model_for_onnx
from scarlet_deploy.runtime.runners.openvino import OV_BACKENDS, ov_unavailable

LABELS = "labels.txt"

# ONNX TensorProto element types -> Triton data types (only what an image classifier's I/O can be).
_ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 2: "TYPE_UINT8", 3: "TYPE_INT8", 6: "TYPE_INT32",
                   7: "TYPE_INT64", 16: "TYPE_BF16"}


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # Triton TYPE_*
    dims: tuple[int, ...]  # without the batch dimension when it is dynamic


@dataclass(frozen=True)
class ModelIO:
    """A classifier artifact's one input and one output, and whether its first dimension is a free batch."""

    input: Tensor
    output: Tensor
    dynamic_batch: bool

    @classmethod
    def from_onnx(cls, path: str | os.PathLike) -> "ModelIO":
        import onnx

        if not Path(path).is_file():
            raise ScarletError(f"ONNX model {path} does not exist; create it with `scarlet export` (or `make export`).")
        graph = onnx.load(str(path), load_external_data=False).graph
        inits = {i.name for i in graph.initializer}
        ins = [i for i in graph.input if i.name not in inits]
        if len(ins) != 1 or len(graph.output) != 1:
            raise ScarletError(f"{path} has inputs {[i.name for i in ins]} and outputs {[o.name for o in graph.output]}; "
                               "Triton configs are written for one image input and one logits output.")

        def tensor(v) -> tuple[Tensor, bool]:
            t = v.type.tensor_type
            if t.elem_type not in _ONNX_TO_TRITON:
                raise ScarletError(f"{path}: tensor {v.name} has ONNX element type {t.elem_type}, which has no Triton type here.")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            if any(d < 0 for d in dims[1:]):
                raise ScarletError(f"{path}: tensor {v.name} has dims {dims}; only the batch dimension may be dynamic.")
            dynamic = bool(dims) and dims[0] < 0
            # Triton's dims leave out the batch dimension only when it batches (max_batch_size > 0).
            return Tensor(v.name, _ONNX_TO_TRITON[t.elem_type], tuple(dims[1:] if dynamic else dims)), dynamic

        (inp, dyn_in), (out, dyn_out) = tensor(ins[0]), tensor(graph.output[0])
        if dyn_in != dyn_out:
            raise ScarletError(f"{path}: the input's and the output's batch dimensions disagree (dynamic vs fixed).")
        return cls(inp, out, dyn_in)


def plan_max_batch(plan: str | os.PathLike) -> int:
    """The largest batch the plan's (single) optimisation profile accepts, from the manifest `scarlet engine` wrote."""
    m = read_manifest(plan, required=True)
    try:
        return int(m["profile"]["max"][0])
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise ScarletError(f"{plan}'s manifest records no optimisation profile; rebuild it with `scarlet engine`.") from e


# ----------------------------------------------------------------------------- protobuf text

def _pbtxt(obj: Any, indent: int = 0) -> str:
    """Protobuf text format for nested dicts/lists of scalars (enum values are bare upper-case identifiers)."""
    pad = "  " * indent
    lines = []
    for key, value in obj.items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, dict):
                lines += [f"{pad}{key} {{", _pbtxt(v, indent + 1), f"{pad}}}"]
            else:
                lines.append(f"{pad}{key}: {_scalar(v)}")
    return "\n".join(line for line in lines if line)


class Enum(str):
    """A protobuf enum value (written unquoted)."""


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, Enum):
        return str(v)
    return json.dumps(str(v))


def _io(t: Tensor, labels: bool = False, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": t.name, "data_type": Enum(t.data_type), "dims": list(t.dims)}
    if labels:
        d["label_filename"] = LABELS
    d.update(extra)
    return d


def _warmup(t: Tensor) -> dict[str, Any]:
    # One batch at load, so the first client does not pay for allocator and kernel set-up. Zeros, not
    # random_data: Triton fills FP32 from random bytes, which include NaN and Inf.
    return {"name": "zero_batch_1", "batch_size": 1,
            "inputs": {"key": t.name, "value": {"data_type": Enum(t.data_type), "dims": list(t.dims), "zero_data": True}}}


@dataclass(frozen=True)
class Batching:
    max_batch: int = 32
    max_queue_delay_us: int = 2000
    instances: int = 1


def model_config(name: str, io: ModelIO, *, batching: Batching, platform: str | None = None, backend: str | None = None,
                 instance_kind: str = "KIND_CPU", parameters: dict[str, str] | None = None,
                 inputs: list[dict[str, Any]] | None = None, outputs: list[dict[str, Any]] | None = None,
                 warmup: bool = True, default_model_filename: str | None = None) -> str:
    cfg: dict[str, Any] = {"name": name}
    if platform:
        cfg["platform"] = platform
    if backend:
        cfg["backend"] = backend
    if default_model_filename:
        cfg["default_model_filename"] = default_model_filename
    cfg["max_batch_size"] = batching.max_batch if io.dynamic_batch else 0
    cfg["input"] = inputs if inputs is not None else [_io(io.input)]
    cfg["output"] = outputs if outputs is not None else [_io(io.output, labels=True)]
    if io.dynamic_batch:
        cfg["dynamic_batching"] = {"max_queue_delay_microseconds": batching.max_queue_delay_us}
    group: dict[str, Any] = {"kind": Enum(instance_kind), "count": batching.instances}
    if instance_kind == "KIND_GPU":
        group["gpus"] = [0]
    cfg["instance_group"] = [group]
    if parameters:
        cfg["parameters"] = [{"key": k, "value": {"string_value": v}} for k, v in parameters.items()]
    if warmup:
        cfg["model_warmup"] = [_warmup(io.input)]
    return _pbtxt(cfg) + "\n"


def write_labels(model_dir: Path) -> None:
    # Triton's classification extension reads one label per line, line i naming class i.
    write_bytes_atomic(model_dir / LABELS, ("\n".join(classes.names()) + "\n").encode())


# ----------------------------------------------------------------------------- `scarlet triton`

# Which Triton backend runs an ONNX in a user's own Triton; `scarlet serve` runs both through our runners instead.
TRITON_ONNX_BACKENDS = ("ort", "ov")
SERVE_BACKENDS = ("ort", "ov", "ov-bf16", "ov-int8-bf16")


@dataclass(frozen=True)
class ExportRequest:
    onnx: Path
    out: Path
    name: str
    engine: Path | None = None
    instance_kind: str = "KIND_CPU"  # ONNX only; a plan always runs on a GPU
    batching: Batching = field(default_factory=Batching)
    backend: str = "ort"  # ONNX only: Triton's onnxruntime backend, or its openvino one (CPU)


def write_triton_repository(req: ExportRequest) -> Path:
    """REPO/NAME/{config.pbtxt, labels.txt, 1/model.onnx|model.plan, 1/model.*.json}: a repository for any Triton."""
    io = ModelIO.from_onnx(req.onnx)
    batching = req.batching
    if req.engine is not None:
        artifact, platform, kind = Path(req.engine), "tensorrt_plan", "KIND_GPU"
        if not artifact.is_file():
            raise ScarletError(f"TensorRT plan {artifact} does not exist; build it with `scarlet engine` (or `make engine`).")
        profile_max = plan_max_batch(artifact)
        if io.dynamic_batch and batching.max_batch > profile_max:
            batching = Batching(profile_max, batching.max_queue_delay_us, batching.instances)
        filename = "model.plan"
    else:
        artifact, platform, kind, filename = Path(req.onnx), "onnxruntime_onnx", req.instance_kind, "model.onnx"
    backend = None
    if req.backend not in TRITON_ONNX_BACKENDS:
        raise ScarletError(f"--backend {req.backend}: a repository runs an ONNX on one of {', '.join(TRITON_ONNX_BACKENDS)}.")
    if req.backend == "ov":
        if req.engine is not None or kind == "KIND_GPU":
            raise ScarletError("--backend ov is Triton's OpenVINO backend: CPU instances over the ONNX; drop --engine/--gpu.")
        # Triton's openvino backend reads ONNX as it is when told the file name (it defaults to model.xml).
        platform, backend = None, "openvino"
    model_dir = req.out / req.name
    if model_dir.exists():
        raise ScarletError(f"{model_dir} already exists; remove it or write the repository elsewhere with -o.")
    req.out.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: an interrupted write leaves no half repository.
    tmp = Path(tempfile.mkdtemp(prefix=f".{req.name}.", suffix=".part", dir=req.out))
    try:
        (tmp / "1").mkdir()
        shutil.copyfile(artifact, tmp / "1" / filename)
        manifest = read_manifest(artifact)
        if manifest is not None:
            write_json_atomic(tmp / "1" / f"{filename}.json", manifest)
        write_labels(tmp)
        text = model_config(req.name, io, batching=batching, platform=platform, backend=backend, instance_kind=kind,
                            default_model_filename=filename if backend else None)
        write_bytes_atomic(tmp / "config.pbtxt", text.encode())
        os.rename(tmp, model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir


# ----------------------------------------------------------------------------- `scarlet serve`

_SHIM = '''# Written by `scarlet serve`. Triton's Python stub runs an isolated interpreter that ignores PYTHONPATH,
# so the import path of the `scarlet` process that wrote this file is put in place here.
import site
import sys

_PATHS = {paths}
sys.path[:0] = _PATHS  # ahead of the stub interpreter's own site-packages
for _p in _PATHS:
    site.addsitedir(_p)  # runs the .pth files there, among them the editable install's import hook

from scarlet_deploy.runtime.serve.backend import {cls} as TritonPythonModel  # noqa: E402,F401
'''


@dataclass(frozen=True)
class ServeRequest:
    onnx: Path
    name: str
    engine: Path | None = None
    model: str | None = None  # registry model (preprocessing); default from the ONNX manifest
    threads: int | None = None
    batching: Batching = field(default_factory=Batching)
    backend: str = "ort"  # the runner over the ONNX: one of SERVE_BACKENDS (a plan always runs on trt)


def write_serving_repository(req: ServeRequest, root: Path, launcher_paths: str) -> dict[str, Any]:
    """root/{NAME, NAME_image}: Python-backend models over our Runner; returns what was served, for the banner."""
    io = ModelIO.from_onnx(req.onnx)
    if not io.dynamic_batch:
        raise ScarletError(f"{req.onnx} has a fixed batch dimension; serve a dynamic-batch export (`scarlet export` makes one).")
    if req.backend not in SERVE_BACKENDS:
        raise ScarletError(f"--backend {req.backend}: serve runs an ONNX on one of {', '.join(SERVE_BACKENDS)}.")
    why = ov_unavailable(req.backend) if req.backend in OV_BACKENDS else None
    if why:
        raise ScarletError(f"--backend {req.backend}: {why}.")
    kind, artifact, batching = req.backend, Path(req.onnx), req.batching
    if req.engine is not None:
        if req.backend != "ort":
            raise ScarletError(f"--engine serves a TensorRT plan; --backend {req.backend} applies to the ONNX only.")
        kind, artifact = "trt", Path(req.engine)
        if not artifact.is_file():
            raise ScarletError(f"TensorRT plan {artifact} does not exist; build it with `scarlet engine` (or `make engine`).")
        profile_max = plan_max_batch(artifact)
        if batching.max_batch > profile_max:
            raise ScarletError(f"--max-batch {batching.max_batch} exceeds the plan's profile maximum {profile_max}; "
                               f"lower it or rebuild the plan with a larger --batch.")
    registry_model = model_for_onnx(req.onnx, req.model)
    pre = get_spec(registry_model).preprocess
    common = {"kind": kind, "artifact": str(artifact.resolve()), "threads": req.threads,
              "numpy_version": np.__version__}
    image_io = ModelIO(Tensor("image", "TYPE_UINT8", (-1,)), io.output, True)
    models = {
        req.name: ("TensorModel", model_config(
            req.name, io, batching=batching, backend="python",
            parameters={"scarlet": json.dumps(common)},
            outputs=[_io(io.output, labels=True)])),
        f"{req.name}_image": ("ImageModel", model_config(
            f"{req.name}_image", image_io, batching=batching, backend="python",
            parameters={"scarlet": json.dumps({**common, "preprocess": asdict(pre)})},
            inputs=[_io(image_io.input, allow_ragged_batch=True)],
            outputs=[_io(io.output, labels=True), _io(Tensor("probabilities", io.output.data_type, io.output.dims), labels=True)],
            warmup=False)),  # a random byte string is no image: warm-up would fail the load
    }
    for name, (cls, text) in models.items():
        d = root / name
        (d / "1").mkdir(parents=True)
        (d / "config.pbtxt").write_text(text)
        (d / "1" / "model.py").write_text(_SHIM.format(paths=launcher_paths, cls=cls))
        write_labels(d)
    return {"models": list(models), "backend": kind, "artifact": str(artifact), "model": registry_model,
            "max_batch": batching.max_batch, "max_queue_delay_us": batching.max_queue_delay_us,
            "instances": batching.instances}
