"""The two served models, as Triton Python-backend models over our Runner (onnxruntime or a TensorRT plan).

This module runs inside Triton's `triton_python_backend_stub`, not in the `scarlet` process: the generated
model.py files (repository.py) put the launcher's import path in place and import these classes.

Tensors cross the stub boundary only through DLPack. The bundled stub's pybind11 predates numpy 2 and reads
numpy 2 dtype descriptors with the old layout: `Tensor.as_numpy()` returns wrong data and `Tensor(name, array)`
produces empty outputs, while `np.from_dlpack` and `Tensor.from_dlpack` are exact. For the same reason the
image input is UINT8 (the encoded file's bytes) rather than BYTES, whose (de)serialisation goes through numpy.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.logits import softmax
from scarlet_deploy.runtime.data.preprocess import Preprocess, UnreadableImage, deploy_bytes
from scarlet_deploy.runtime.runners.base import Runner
from scarlet_deploy.runtime.runners.ort import OrtOptions
from scarlet_deploy.runtime.runners.registry import open_runner

MAX_IMAGE_BYTES = 32 << 20  # beyond this a request is refused, not decoded


def _quiet_dlpack_deleter(unraisable, _default=sys.unraisablehook) -> None:
    # numpy's DLPack capsule deleter does not recognise the name the stub gives a consumed capsule and reports
    # it as unraisable after every output; the stub owns and frees the tensor, so that report is noise.
    if isinstance(unraisable.exc_value, ValueError) and "PyCapsule_GetPointer" in str(unraisable.exc_value):
        return
    _default(unraisable)


@dataclass(frozen=True)
class BackendConfig:
    """What `scarlet serve` passes each model in config.pbtxt `parameters` (key `scarlet`, JSON)."""

    kind: str  # ort | ov | ov-bf16 | trt: the runner over the artifact
    artifact: str
    threads: int | None
    preprocess: Preprocess | None = None
    numpy_version: str | None = None

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "BackendConfig":
        params = json.loads(args["model_config"])["parameters"]["scarlet"]["string_value"]
        d = json.loads(params)
        pre = d.pop("preprocess", None)
        return cls(preprocess=Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in pre.items()})
                   if pre else None, **d)


def _check_numpy(expected: str | None) -> None:
    # The stub imports numpy from its own interpreter's site-packages before our path is in place.
    if expected and np.__version__ != expected:
        raise ScarletError(f"Triton's Python stub loaded numpy {np.__version__} from {np.__file__}, but scarlet runs "
                           f"numpy {expected}; install numpy=={expected} for {sys.prefix}'s Python as well.")


class _Model:
    """Shared lifecycle: open the runner on initialize, batch every request of an execute call into one infer."""

    runner: Runner

    def initialize(self, args: dict[str, Any]) -> None:
        sys.unraisablehook = _quiet_dlpack_deleter
        self.cfg = BackendConfig.from_args(args)
        _check_numpy(self.cfg.numpy_version)
        self.runner = open_runner(self.cfg.kind, self.cfg.artifact, threads=self.cfg.threads,
                                  ort=OrtOptions(threads=self.cfg.threads)).load()

    def finalize(self) -> None:
        self.runner.close()

    def _logits(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """One runner call for the whole dynamic batch, split back per request."""
        sizes = [len(b) for b in batches]
        y = self.runner.infer(np.concatenate(batches) if len(batches) > 1 else batches[0])
        if not np.isfinite(y).all():
            raise ScarletError("the model produced NaN or Inf logits")
        return np.split(y, np.cumsum(sizes)[:-1])


class TensorModel(_Model):
    """NAME: `input` FP32 [N,3,H,W] -> `logits` FP32 [N,1000]. Triton has already checked dtype, dims and batch."""

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb

        xs = [np.from_dlpack(pb.get_input_tensor_by_name(r, "input")) for r in requests]
        try:
            outs = self._logits(xs)
        except Exception as e:  # one failed batch answers each of its requests with the error, the server lives on
            return [pb.InferenceResponse(error=pb.TritonError(str(e))) for _ in requests]
        return [pb.InferenceResponse(output_tensors=[pb.Tensor.from_dlpack("logits", np.ascontiguousarray(y).__dlpack__())])
                for y in outs]


class ImageModel(_Model):
    """NAME_image: `image` UINT8 [N,-1] (one encoded JPEG/PNG per row) -> `logits` and `probabilities` FP32 [N,1000].

    Decoded and preprocessed with `scarlet predict`'s deploy pipeline; both outputs carry the ImageNet labels,
    so Triton's classification extension (`class_count=5`) returns the top-5 names and probabilities.
    """

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb

        tensors: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for r in requests:
            data = np.from_dlpack(pb.get_input_tensor_by_name(r, "image"))
            try:
                if len(data) != 1:
                    raise UnreadableImage(f"send one encoded image per request row, got a batch of {len(data)}")
                if data.shape[1] > MAX_IMAGE_BYTES:
                    raise UnreadableImage(f"image of {data.shape[1]} bytes exceeds the {MAX_IMAGE_BYTES} byte limit")
                tensors.append(deploy_bytes(np.ascontiguousarray(data[0]), self.cfg.preprocess)[None])
                errors.append(None)
            except UnreadableImage as e:
                tensors.append(None)
                errors.append(str(e))
        good = [t for t in tensors if t is not None]
        try:
            outs = iter(self._logits(good)) if good else iter(())
        except Exception as e:
            return [pb.InferenceResponse(error=pb.TritonError(str(e))) for _ in requests]
        responses = []
        for err in errors:
            if err is not None:
                responses.append(pb.InferenceResponse(error=pb.TritonError(err)))
                continue
            y = next(outs)
            responses.append(pb.InferenceResponse(output_tensors=[
                pb.Tensor.from_dlpack("logits", np.ascontiguousarray(y).__dlpack__()),
                pb.Tensor.from_dlpack("probabilities", np.ascontiguousarray(softmax(y), np.float32).__dlpack__()),
            ]))
        return responses
