"""TensorRT 11 backend. CPU: flag parsing, timing-cache paths, manifest compatibility, precision checks and
clean failures without TensorRT/GPU. GPU (marked `gpu`): build, run and compare with onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from scarlet_deploy.export.fp16 import type_summary
from scarlet_deploy.export.trt_build import (
    BatchProfile,
    EngineConfig,
    check_precision,
    int8_onnx_path,
    read_timing_cache,
    rebuild_if_stale,
    stale_reasons,
    timing_cache_path,
    validate,
)
from scarlet_deploy.runtime import cli
from scarlet_deploy.runtime.core.artifacts import sha256_file, write_manifest
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.runners.trt import (
    PLAN_KIND,
    RuntimeInfo,
    TrtRunner,
    check_plan,
    plan_compatibility,
    require_gpu,
)

HERE = RuntimeInfo("11.4.0.106", "NVIDIA H100 80GB HBM3", "9.0")


def _gpu_missing() -> str | None:
    try:
        require_gpu()
    except ScarletError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------- --batch

@pytest.mark.parametrize("text, expect", [("1,8,32", (1, 8, 32)), ("4", (4, 4, 4)), (" 2, 2 ,16", (2, 2, 16))])
def test_batch_parse(text, expect):
    b = BatchProfile.parse(text)
    assert (b.min, b.opt, b.max) == expect


@pytest.mark.parametrize("text, message", [("8,1,32", "MIN <= OPT <= MAX"), ("1,64,32", "MIN <= OPT <= MAX"),
                                           ("0,1,2", ">= 1"), ("1,2", "three integers"), ("a,b,c", "integers")])
def test_batch_parse_rejects(text, message):
    with pytest.raises(ScarletError, match=message):
        BatchProfile.parse(text)


def test_batch_must_fit_a_fixed_batch_onnx():
    BatchProfile(4, 4, 4).fit_to(4)
    BatchProfile(1, 8, 32).fit_to(None)
    with pytest.raises(ScarletError, match="fixed batch of 1"):
        BatchProfile(1, 8, 32).fit_to(1)


# ----------------------------------------------------------------------------- timing cache

def test_timing_cache_path(tmp_path):
    plan = tmp_path / "build" / "m.fp16.plan"
    assert timing_cache_path(None, plan) == tmp_path / "build" / "timing.cache"
    assert timing_cache_path(tmp_path, plan) == tmp_path / "timing.cache"  # an existing directory
    assert timing_cache_path(tmp_path / "my.cache", plan) == tmp_path / "my.cache"
    assert read_timing_cache(tmp_path / "absent.cache") == b""  # first build: a new cache
    (tmp_path / "my.cache").write_bytes(b"\x01\x02")
    assert read_timing_cache(tmp_path / "my.cache") == b"\x01\x02"


# ----------------------------------------------------------------------------- manifest compatibility

def _manifest(**over):
    m = {"kind": PLAN_KIND, "precision": "fp16", "tensorrt": HERE.tensorrt,
         "gpu": {"name": HERE.gpu_name, "compute_capability": HERE.compute_capability},
         "version_compatible": False,
         "request": {"onnx": "build/m.onnx", "precision": "fp16", "batch": [1, 8, 32], "int8_onnx": None}}
    return m | over


def test_same_tensorrt_and_gpu_is_compatible():
    assert plan_compatibility(_manifest(), HERE) == []


def test_other_tensorrt_version_is_refused():
    reasons = plan_compatibility(_manifest(tensorrt="11.1.0.5"), HERE)
    assert len(reasons) == 1 and "11.1.0.5" in reasons[0] and HERE.tensorrt in reasons[0]


def test_other_gpu_is_refused():
    for gpu in ({"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"},
                {"name": "NVIDIA H200", "compute_capability": "9.0"}):  # same architecture, other model
        reasons = plan_compatibility(_manifest(gpu=gpu), HERE)
        assert len(reasons) == 1 and gpu["name"] in reasons[0] and HERE.gpu_name in reasons[0]


def test_version_compatible_plans_run_on_later_11x_only():
    vc = dict(version_compatible=True, tensorrt="11.1.0.5")
    assert plan_compatibility(_manifest(**vc), HERE) == []
    assert plan_compatibility(_manifest(**vc), RuntimeInfo("11.0.0.1", HERE.gpu_name, "9.0"))
    assert plan_compatibility(_manifest(**vc), RuntimeInfo("12.0.0.1", HERE.gpu_name, "9.0"))


def test_not_a_plan_manifest():
    assert "not a TensorRT plan manifest" in plan_compatibility({"kind": "onnx-fp16"}, HERE)[0]


def test_check_plan_refuses_with_rebuild_hint(tmp_path):
    plan = tmp_path / "m.fp16.plan"
    with pytest.raises(ScarletError, match="does not exist"):
        check_plan(plan, HERE)
    plan.write_bytes(b"serialized engine bytes")
    with pytest.raises(ScarletError, match="no manifest"):
        check_plan(plan, HERE)
    write_manifest(plan, _manifest(plan_sha256=sha256_file(plan)))
    assert check_plan(plan, HERE)["precision"] == "fp16"
    with pytest.raises(ScarletError, match=r"TensorRT 11\.4\.0\.106.*--rebuild") as e:
        check_plan(plan, RuntimeInfo("11.5.0.1", HERE.gpu_name, "9.0"))
    assert "scarlet engine --onnx build/m.onnx --precision fp16 --batch 1,8,32" in str(e.value)
    plan.write_bytes(b"another engine")
    with pytest.raises(ScarletError, match="does not match its manifest"):
        check_plan(plan, HERE)


def test_stale_reasons(tmp_path):
    plan = tmp_path / "m.fp16.plan"
    request = _manifest()["request"]
    assert stale_reasons(plan, request, HERE) == ["no plan with a manifest exists"]
    plan.write_bytes(b"engine")
    write_manifest(plan, _manifest(plan_sha256=sha256_file(plan)))
    assert stale_reasons(plan, request, HERE) == []
    assert stale_reasons(plan, request | {"batch": [1, 1, 8]}, HERE) == ["batch changed"]
    assert "TensorRT" in stale_reasons(plan, request, RuntimeInfo("11.5.0.1", HERE.gpu_name, "9.0"))[0]
    plan.write_bytes(b"other engine")
    assert stale_reasons(plan, request, HERE) == ["the plan file does not match its manifest"]


# ----------------------------------------------------------------------------- precision checks

def _qdq_model() -> onnx.ModelProto:
    """The smallest explicit-quantization graph: Q/DQ on a Conv's input and weight."""
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"]),
             helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
             helper.make_node("Conv", ["xd", "wd"], ["logits"])]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4, 8, 8])], [w, scale, zp])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def summaries(lite0_onnx, tmp_path_factory):
    from scarlet_deploy.export.fp16 import Fp16Config, convert_to_fp16

    fp16 = convert_to_fp16(Fp16Config(lite0_onnx, output=tmp_path_factory.mktemp("fp16") / "m.fp16.onnx", parity_images=0))
    return {"fp32": type_summary(onnx.load(str(lite0_onnx))),
            "fp16": type_summary(onnx.load(str(fp16.output))),
            "int8": type_summary(_qdq_model())}


@pytest.mark.parametrize("graph", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("requested", ["fp32", "fp16", "int8"])
def test_precision_must_match_the_graph(summaries, graph, requested):
    if graph == requested:
        check_precision(summaries[graph], requested, "ONNX m")
    else:
        with pytest.raises(ScarletError, match=f"does not match --precision {requested}"):
            check_precision(summaries[graph], requested, "ONNX m")


def test_fp16_with_half_io_is_refused(summaries):
    with pytest.raises(ScarletError, match="float32 I/O"):
        check_precision(summaries["fp16"] | {"io_float32": 0}, "fp16", "ONNX m")


# ----------------------------------------------------------------------------- CPU-side validation and errors

def test_validate_before_tensorrt(lite0_onnx, tmp_path):
    plan = tmp_path / "m.plan"
    validate(EngineConfig(lite0_onnx, "fp32", plan))
    with pytest.raises(ScarletError, match="INT8 needs the TensorRT Q/DQ ONNX .*--target trt"):
        validate(EngineConfig(lite0_onnx, "int8", plan))
    with pytest.raises(ScarletError, match="--int8-onnx applies to --precision int8 only"):
        validate(EngineConfig(lite0_onnx, "fp16", plan, int8_onnx=tmp_path / "q.onnx"))
    with pytest.raises(ScarletError, match="positive"):
        validate(EngineConfig(lite0_onnx, "fp32", plan, workspace_gb=0))
    with pytest.raises(ScarletError, match="does not exist"):
        validate(EngineConfig(tmp_path / "none.onnx", "fp32", plan))
    assert int8_onnx_path("build/m.onnx").as_posix() == "build/m.int8-trt.onnx"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_command_without_gpu_fails_cleanly(lite0_onnx, tmp_path, capsys, precision):
    missing = _gpu_missing()
    if missing is None:
        pytest.skip("TensorRT and a GPU are present: the no-GPU error path cannot be exercised here")
    plan = tmp_path / "m.plan"
    rc = cli.main(["engine", "--onnx", str(lite0_onnx), "--precision", precision, "-o", str(plan)])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2
    assert "TensorRT 11 is not installed" in err or "no CUDA GPU visible" in err
    assert not plan.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_engine_command_rejects_bad_batch_first(lite0_onnx, tmp_path, capsys):
    rc = cli.main(["engine", "--onnx", str(lite0_onnx), "--precision", "fp32", "--batch", "8,1,4", "-o", str(tmp_path / "m.plan")])
    assert rc == 2 and "MIN <= OPT <= MAX" in capsys.readouterr().err


def test_runner_without_gpu_names_what_is_missing(tmp_path):
    missing = _gpu_missing()
    if missing is None:
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(ScarletError) as e:
        TrtRunner(tmp_path / "m.plan").load()
    assert "TensorRT 11 is not installed: pip install .[tensorrt] on a machine with an NVIDIA GPU" in str(e.value) \
        or "no CUDA GPU visible" in str(e.value)


def test_gpu_check_stops_at_once_without_gpu(tmp_path, capsys):
    from scarlet_deploy.runtime import gpu_check

    if _gpu_missing() is None:
        pytest.skip("TensorRT and a GPU are present")
    rc = gpu_check.main(["--build-dir", str(tmp_path / "build"), "--report", str(tmp_path / "reports" / "gpu-check")])
    assert rc == 2 and ("TensorRT 11 is not installed" in capsys.readouterr().err)
    assert not (tmp_path / "build").exists() and not (tmp_path / "reports").exists()


# ----------------------------------------------------------------------------- GPU

@pytest.fixture(scope="module")
def gpu():
    missing = _gpu_missing()
    if missing:
        pytest.skip(f"needs TensorRT 11 and an NVIDIA GPU: {missing}")


@pytest.mark.gpu
@pytest.mark.parametrize("precision, top1, rel", [("fp32", 1.0, 1e-3), ("fp16", 15 / 16, 3e-2)])
def test_engine_builds_runs_and_matches_onnxruntime(gpu, lite0_onnx, tmp_path, precision, top1, rel):
    from scarlet_deploy.export.fp16 import logit_agreement
    from scarlet_deploy.export.registry import get_spec
    from scarlet_deploy.export.trt_build import build_engine
    from scarlet_deploy.runtime.data.images import fixed_images
    from scarlet_deploy.runtime.data.preprocess import load_batch
    from scarlet_deploy.runtime.runners.ort import OrtRunner

    plan = tmp_path / f"m.{precision}.plan"
    cfg = EngineConfig(lite0_onnx, precision, plan, batch=BatchProfile(1, 4, 8), timing_cache=tmp_path / "t.cache")
    r = build_engine(cfg)
    assert not r.reused and plan.is_file() and (tmp_path / "t.cache").is_file()
    m = r.manifest
    assert m["precision"] == precision and m["tf32"] is False and m["plan_sha256"] == sha256_file(plan)
    assert (m["network"]["float16"] > 0) == (precision == "fp16")
    assert build_engine(cfg).reused  # unchanged inputs: the plan is current

    paths = fixed_images(16)
    x = load_batch(paths, get_spec("efficientnet_lite0").preprocess) if paths else \
        np.random.default_rng(0).standard_normal((16, 3, 224, 224), dtype=np.float32)
    with TrtRunner(plan) as trt_runner, OrtRunner(lite0_onnx) as ort_runner:
        got = trt_runner.infer(x)  # 16 > max batch 8: runs in chunks
        assert got.shape == (16, 1000) and got.dtype == np.float32
        agree = logit_agreement(ort_runner.infer(x), got)
        assert agree["top1_agreement"] >= top1 and agree["rel_err_max"] < rel, agree
        times = trt_runner.time(batch=4, iters=20, warmup=5, include_copies=True, cuda_graph=True)
        assert len(times) == 20 and all(t > 0 for t in times)
        assert len(trt_runner.time(batch=1, iters=5, warmup=1)) == 5


@pytest.mark.gpu
def test_runner_refuses_a_plan_from_another_tensorrt(gpu, lite0_onnx, tmp_path):
    from scarlet_deploy.export.trt_build import build_engine

    plan = tmp_path / "m.fp32.plan"
    r = build_engine(EngineConfig(lite0_onnx, "fp32", plan, batch=BatchProfile(1, 1, 2)))
    write_manifest(plan, r.manifest | {"tensorrt": "11.0.0.0"})
    with pytest.raises(ScarletError, match="built with TensorRT 11.0.0.0"):
        TrtRunner(plan).load()
    assert rebuild_if_stale(plan)["tensorrt"] != "11.0.0.0"  # rebuilt on request
    with TrtRunner(plan) as runner:
        assert runner.manifest["tensorrt"] != "11.0.0.0"


def test_gpu_check_images_labels_and_markdown(val_dir):
    from scarlet_deploy.runtime import gpu_check

    files, labels = gpu_check._images(val_dir, 10)
    assert len(files) == 10 and labels is not None and labels.shape == (10,)
    row = gpu_check.Row("scarlet_a", "fp16", "ok", "build/scarlet_a.fp16.plan", 41.5,
                        {"top1_agreement": 0.99, "rel_err_max": 0.01}, 0.7,
                        {"b1": {"median_ms": 0.5, "images_per_s": 2000.0}, "b8": {"median_ms": 1.0, "images_per_s": 8000.0}})
    data = {"tensorrt": "11.4.0.106", "gpu": {"name": "NVIDIA H100", "compute_capability": "9.0"},
            "environment": {"date": "today"}, "images": 10, "reference": "PyTorch", "iters": 5, "seconds": 1.0,
            "rows": [row.__dict__, gpu_check.Row("scarlet_a", "int8", "skipped: no calib").__dict__]}
    md = gpu_check.markdown(data)
    assert "| scarlet_a | fp16 | ok | 41.5 | 0.99 | 0.01 | 0.7 | 0.5 | 1 | - | 8000 |" in md
    assert "| scarlet_a | int8 | skipped: no calib |" in md
