"""scarlet triton: repositories for a user's own Triton, every config parsed against Triton's ModelConfig schema."""
from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

from scarlet_deploy.runtime.cli import main
from scarlet_deploy.runtime.core.artifacts import write_manifest
from scarlet_deploy.runtime.serve.repository import (
    Batching,
    ServeRequest,
    write_serving_repository,
)

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="the serve extra (tritonclient) is not installed")
from google.protobuf import text_format  # noqa: E402


def parse(path) -> "model_config_pb2.ModelConfig":
    # Parse, not Merge: an unknown field or a wrong type is an error, as it is for tritonserver.
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_onnx_cpu_repository(lite0_onnx, tmp_path):
    assert main(["triton", "--onnx", str(lite0_onnx), "--model", "lite0", "-o", str(tmp_path), "--max-batch", "16"]) == 0
    d = tmp_path / "lite0"
    cfg = parse(d / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in cfg.input] == \
        [("input", "TYPE_FP32", [3, 224, 224])]
    assert [(o.name, list(o.dims), o.label_filename) for o in cfg.output] == [("logits", [1000], "labels.txt")]
    assert cfg.HasField("dynamic_batching")
    assert [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in cfg.instance_group] == ["KIND_CPU"]
    assert cfg.model_warmup[0].inputs["input"].zero_data
    labels = (d / "labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and labels[0] == "tench"
    assert (d / "1" / "model.onnx").read_bytes() == lite0_onnx.read_bytes()
    assert json.loads((d / "1" / "model.onnx.json").read_text())["model"] == "efficientnet_lite0"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary left beside the model"


def test_onnx_gpu_repository_and_no_overwrite(lite0_onnx, tmp_path, capsys):
    assert main(["triton", "--onnx", str(lite0_onnx), "--gpu", "-o", str(tmp_path)]) == 0
    cfg = parse(tmp_path / "efficientnet_lite0" / "config.pbtxt")
    assert [(model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind), list(g.gpus)) for g in cfg.instance_group] == \
        [("KIND_GPU", [0])]
    assert main(["triton", "--onnx", str(lite0_onnx), "-o", str(tmp_path)]) == 2
    assert "already exists" in " ".join(capsys.readouterr().err.split())


def test_plan_repository_caps_max_batch_at_the_profile(lite0_onnx, tmp_path):
    # Only the file layout and the config are under test here; no TensorRT runs. The plan's manifest is what
    # `scarlet engine` records, and the writer reads nothing else from the plan.
    plan = tmp_path / "lite0.fp16.plan"
    plan.write_bytes(b"placeholder: config writing never opens the engine")
    write_manifest(plan, {"kind": "tensorrt-plan", "model": "efficientnet_lite0",
                          "profile": {"input": "input", "min": [1, 3, 224, 224], "opt": [8, 3, 224, 224],
                                      "max": [16, 3, 224, 224]}})
    repo = tmp_path / "repo"
    assert main(["triton", "--onnx", str(lite0_onnx), "--engine", str(plan), "--model", "lite0_trt", "-o", str(repo),
                 "--max-batch", "64"]) == 0
    cfg = parse(repo / "lite0_trt" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 16
    assert [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in cfg.instance_group] == ["KIND_GPU"]
    assert (repo / "lite0_trt" / "1" / "model.plan").is_file() and (repo / "lite0_trt" / "1" / "model.plan.json").is_file()


def test_plan_without_profile_is_refused(lite0_onnx, tmp_path, capsys):
    plan = tmp_path / "x.plan"
    plan.write_bytes(b"placeholder")
    assert main(["triton", "--onnx", str(lite0_onnx), "--engine", str(plan), "-o", str(tmp_path / "r")]) == 2
    assert "has no manifest" in " ".join(capsys.readouterr().err.split()) and not (tmp_path / "r" / "efficientnet_lite0").exists()


def test_serving_repository_configs_parse(lite0_onnx, tmp_path):
    served = write_serving_repository(ServeRequest(lite0_onnx, "lite0", batching=Batching(8, 500, 2)), tmp_path, "[]")
    assert served["models"] == ["lite0", "lite0_image"]
    tensor, image = parse(tmp_path / "lite0" / "config.pbtxt"), parse(tmp_path / "lite0_image" / "config.pbtxt")
    assert tensor.backend == image.backend == "python"
    assert tensor.max_batch_size == image.max_batch_size == 8
    assert tensor.dynamic_batching.max_queue_delay_microseconds == 500 and tensor.instance_group[0].count == 2
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims), i.allow_ragged_batch)
            for i in image.input] == [("image", "TYPE_UINT8", [-1], True)]
    assert [o.name for o in image.output] == ["logits", "probabilities"]
    assert json.loads(tensor.parameters["scarlet"].string_value)["kind"] == "ort"


def test_fixed_batch_onnx_keeps_its_batch_dimension(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])), path)
    assert main(["triton", "--onnx", str(path), "-o", str(tmp_path / "r")]) == 0
    cfg = parse(tmp_path / "r" / "fixed" / "config.pbtxt")
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [1, 3, 8, 8] and list(cfg.output[0].dims) == [1, 3, 8, 8]


def test_openvino_repository_runs_the_onnx_on_tritons_openvino_backend(lite0_onnx, tmp_path, capsys):
    assert main(["triton", "--onnx", str(lite0_onnx), "--model", "lite0_ov", "--backend", "ov", "-o", str(tmp_path)]) == 0
    cfg = parse(tmp_path / "lite0_ov" / "config.pbtxt")
    assert (cfg.backend, cfg.platform, cfg.default_model_filename) == ("openvino", "", "model.onnx")
    assert [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in cfg.instance_group] == ["KIND_CPU"]
    assert (tmp_path / "lite0_ov" / "1" / "model.onnx").read_bytes() == lite0_onnx.read_bytes()
    assert main(["triton", "--onnx", str(lite0_onnx), "--backend", "ov", "--gpu", "-o", str(tmp_path / "g")]) == 2
    assert "OpenVINO backend: CPU instances" in " ".join(capsys.readouterr().err.split())


def test_serving_repository_puts_the_chosen_runtime_behind_both_models(lite0_onnx, tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    write_serving_repository(ServeRequest(lite0_onnx, "lite0", backend="ov", batching=Batching(8, 500, 1)), tmp_path, "[]")
    for name in ("lite0", "lite0_image"):
        cfg = parse(tmp_path / name / "config.pbtxt")
        assert json.loads(cfg.parameters["scarlet"].string_value)["kind"] == "ov"
