"""The served models' dynamic batching, in process: Triton hands `execute` several requests at once, and each must
get its own rows back. Runs the real backend classes over a real onnxruntime runner; only Triton's stub API
(`triton_python_backend_utils`, which exists inside the Triton stub alone) is stood in for, with the DLPack
hand-over the real stub uses. The slow tests in test_serve.py check the same through a running server.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from scarlet_deploy.export.registry import get_spec
from scarlet_deploy.runtime.core.logits import softmax
from scarlet_deploy.runtime.data.preprocess import deploy
from scarlet_deploy.runtime.runners.ort import OrtRunner
from scarlet_deploy.runtime.serve import backend

MODEL = "efficientnet_lite0"


class _Capsule:
    """What np.from_dlpack reads: the capsule a response tensor was made from (the stub keeps the capsule)."""

    def __init__(self, capsule):
        self.capsule = capsule

    def __dlpack__(self, **_):
        return self.capsule

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU


def _stub_api() -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, capsule):
            self.name, self.array = name, np.from_dlpack(_Capsule(capsule)).copy()

        @classmethod
        def from_dlpack(cls, name, capsule):
            return cls(name, capsule)

    class TritonError:
        def __init__(self, message):
            self.message = message

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.outputs = {t.name: t.array for t in output_tensors or ()}
            self.error = error

    pb.Tensor, pb.TritonError, pb.InferenceResponse = Tensor, TritonError, InferenceResponse
    pb.get_input_tensor_by_name = lambda request, name: request[name]
    return pb


def _onnx(path: Path) -> Path:
    """(N, 3, 224, 224) -> 1000 logits from a 4x4 grid of mean colours: each image's row is its own."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("AveragePool", ["input"], ["p"], kernel_shape=[56, 56], strides=[56, 56]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "W", "b"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "grid", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
                              [numpy_helper.from_array(rng.standard_normal((1000, 48)).astype(np.float32), "W"),
                               numpy_helper.from_array(rng.standard_normal(1000).astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture
def served(tmp_path, monkeypatch):
    """served(cls): an initialised TensorModel or ImageModel over onnxruntime, as `scarlet serve` configures it."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _stub_api())
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # initialize replaces it
    path = _onnx(tmp_path / "grid.onnx")
    pre = get_spec(MODEL).preprocess
    params = {"kind": "ort", "artifact": str(path), "threads": 1, "numpy_version": np.__version__,
              "preprocess": {"resize": pre.resize, "crop": pre.crop, "mean": list(pre.mean), "std": list(pre.std)}}
    args = {"model_config": json.dumps({"parameters": {"scarlet": {"string_value": json.dumps(params)}}})}
    models = []

    def make(cls):
        m = cls()
        m.initialize(args)
        models.append(m)
        return m

    yield make, OrtRunner(path).load()
    for m in models:
        m.finalize()


def test_each_request_of_a_dynamic_batch_gets_its_own_rows(served):
    make, alone = served
    model = make(backend.TensorModel)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((n, 3, 224, 224)).astype(np.float32) for n in (1, 3, 2, 1)]
    responses = model.execute([{"input": x} for x in xs])
    assert len(responses) == len(xs) and not any(r.error for r in responses)
    for r, x in zip(responses, xs):
        np.testing.assert_allclose(r.outputs["logits"], alone.infer(x), rtol=1e-5, atol=1e-5)
    firsts = [r.outputs["logits"][0] for r in responses]
    assert all(not np.allclose(firsts[0], f) for f in firsts[1:]), "different inputs, different rows"


def test_image_requests_batched_with_a_bad_one_each_get_their_own_answer(served, val_files):
    make, alone = served
    model = make(backend.ImageModel)
    files = val_files[::100][:4]
    pre = get_spec(MODEL).preprocess
    payloads = [np.frombuffer(f.read_bytes(), np.uint8)[None] for f in files]
    payloads.insert(2, np.frombuffer(b"\xff\xd8\xff\xe0 not a jpeg", np.uint8)[None])  # fails alone, mid-batch
    responses = model.execute([{"image": p} for p in payloads])
    assert len(responses) == 5 and responses[2].error is not None and "not a readable image" in responses[2].error.message
    good = [r for i, r in enumerate(responses) if i != 2]
    for r, f in zip(good, files):
        assert r.error is None
        want = alone.infer(deploy(f, pre)[None])
        np.testing.assert_allclose(r.outputs["logits"], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r.outputs["probabilities"], softmax(want), rtol=1e-5, atol=1e-7)
    assert not np.allclose(good[0].outputs["logits"], good[1].outputs["logits"]), "different images, different rows"


def test_a_batch_whose_model_gives_inf_answers_every_request_with_the_error(served, monkeypatch):
    make, _ = served
    model = make(backend.TensorModel)
    monkeypatch.setattr(model.runner, "infer", lambda x: np.full((len(x), 1000), np.inf, np.float32))
    responses = model.execute([{"input": np.zeros((1, 3, 224, 224), np.float32)} for _ in range(3)])
    assert all(r.error is not None and "NaN or Inf" in r.error.message for r in responses)
