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
    import time

    if _gpu_missing() is None:
        pytest.skip("TensorRT and a GPU are present")
    t0 = time.monotonic()
    rc = cli.main(["gpu-check", "--build-dir", str(tmp_path / "build"), "--report", str(tmp_path / "reports" / "gpu-check")])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "gpu-check cannot run TensorRT plans here" in err
    # whichever of them this machine lacks, each is named (TensorRT may be installed without a GPU)
    assert "TensorRT 11 is not installed" in err or "cuda-python >= 13 is not installed" in err or "no CUDA GPU visible" in err
    assert "Found: torch" in err
    assert time.monotonic() - t0 < 60, "the missing pieces must be named within seconds, before any work"
    assert not (tmp_path / "build").exists() and not (tmp_path / "reports").exists()


def test_gpu_check_is_a_command_that_splits_by_model_and_precision(capsys):
    with pytest.raises(SystemExit):
        cli.main(["gpu-check", "--help"])
    out = capsys.readouterr().out
    assert "--models" in out and "--precisions" in out and "--budget" in out


# ----------------------------------------------------------------------------- stale INT8 Q/DQ ONNX

def _int8_beside(onnx_path, tmp_path, **manifest):
    q = tmp_path / "m.int8-trt.onnx"
    onnx.save(_qdq_model(), q)
    write_manifest(q, {"target": "trt", "source_onnx_sha256": sha256_file(onnx_path)} | manifest)
    return q


def test_stale_int8_onnx_is_refused_before_tensorrt(lite0_onnx, tmp_path, capsys, monkeypatch):
    from scarlet_deploy.export import trt_build

    def tripwire(*a, **k):
        raise AssertionError("TensorRT was reached before the artifact checks")

    monkeypatch.setattr(trt_build, "require_gpu", tripwire)
    monkeypatch.setattr(trt_build, "import_tensorrt", tripwire)
    plan = tmp_path / "m.int8.plan"
    stale = _int8_beside(lite0_onnx, tmp_path, source_onnx_sha256="0" * 64)
    rc = cli.main(["engine", "--onnx", str(lite0_onnx), "--precision", "int8", "--int8-onnx", str(stale), "-o", str(plan)])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "is stale: it was calibrated from an ONNX with sha256 000000000000" in err
    assert "--target trt" in err and not plan.exists()
    for manifest, message in (({"target": "ort"}, "calibrated for target 'ort'"), (None, "has no manifest")):
        q = _int8_beside(lite0_onnx, tmp_path, **(manifest or {}))
        if manifest is None:
            q.with_name(q.name + ".json").unlink()
        with pytest.raises(ScarletError, match=message):
            validate(EngineConfig(lite0_onnx, "int8", plan, int8_onnx=q))
    current = _int8_beside(lite0_onnx, tmp_path)
    validate(EngineConfig(lite0_onnx, "int8", plan, int8_onnx=current))  # the current one passes
    with pytest.raises(ScarletError, match="--int8-high-precision 'bf16'"):
        validate(EngineConfig(lite0_onnx, "int8", plan, int8_onnx=current, int8_high_precision="bf16"))


def test_gpu_check_refuses_a_stale_int8_onnx(lite0_onnx, tmp_path):
    import shutil

    from scarlet_deploy.runtime import gpu_check

    build = tmp_path / "build"
    build.mkdir()
    onnx_path = build / "efficientnet_lite0.onnx"
    shutil.copy(lite0_onnx, onnx_path)
    _int8_beside(lite0_onnx, tmp_path, source_onnx_sha256="f" * 64).rename(build / "efficientnet_lite0.int8-trt.onnx")
    (tmp_path / "m.int8-trt.onnx.json").rename(build / "efficientnet_lite0.int8-trt.onnx.json")
    checker = gpu_check.Checker(gpu_check.CheckConfig(build, tmp_path / "r"), gpu_check.Deadline(60), [], None)
    with pytest.raises(ScarletError, match="is stale"):
        checker.int8_onnx("efficientnet_lite0", onnx_path)


# ----------------------------------------------------------------------------- gpu-check report and budget

def _writer(tmp_path, cells: int):
    from scarlet_deploy.runtime import gpu_check

    header = {"tensorrt": "11.4.0.106", "gpu": {"name": "NVIDIA H200", "compute_capability": "9.0"},
              "environment": {"date": "today"}, "images": 4, "reference": "PyTorch", "iters": 5}
    return gpu_check.ReportWriter(tmp_path / "reports" / "gpu-check", header, cells)


def _report(tmp_path) -> dict:
    import json

    return json.loads((tmp_path / "reports" / "gpu-check.json").read_text())


def test_gpu_check_writes_each_row_before_a_time_out(tmp_path):
    """A lent machine kills the command at its time limit: every row finished before stays on disk."""
    from scarlet_deploy.runtime import gpu_check

    cells = [("scarlet_a", "fp32"), ("scarlet_a", "fp16"), ("scarlet_a", "int8")]
    writer = _writer(tmp_path, len(cells))

    def work(model, precision):
        if precision == "fp16":
            assert [r["precision"] for r in _report(tmp_path)["rows"]] == ["fp32"], "row 1 is on disk before row 2 starts"
            raise KeyboardInterrupt  # the machine's time limit stops the process here
        return gpu_check.Row(model, precision, "ok", build_s=1.0, parity={"top1_agreement": 1.0})

    with pytest.raises(KeyboardInterrupt):
        gpu_check.run_rows(cells, work, gpu_check.Deadline(540), writer)
    data = _report(tmp_path)
    assert [(r["precision"], r["status"]) for r in data["rows"]] == [("fp32", "ok")] and data["complete"] is False
    md = (tmp_path / "reports" / "gpu-check.md").read_text()
    assert "| scarlet_a | fp32 | ok |" in md and "Partial: 1 of 3 rows" in md


def test_gpu_check_budget_is_checked_inside_the_work(tmp_path):
    from scarlet_deploy.runtime import gpu_check

    now = [0.0]
    deadline = gpu_check.Deadline(100, clock=lambda: now[0])
    cells = [("scarlet_a", "fp32"), ("scarlet_a", "fp16"), ("scarlet_a", "int8"), ("scarlet_b", "fp32")]
    writer = _writer(tmp_path, len(cells))

    def work(model, precision):
        now[0] += 60  # each row's build takes a minute
        deadline.check(f"timing {model} {precision}")  # as Checker does between its steps
        if precision == "int8":
            raise ScarletError("TensorRT could not build it")
        return gpu_check.Row(model, precision, "ok")

    rows = gpu_check.run_rows(cells, work, deadline, writer)
    assert [r.status for r in rows] == [
        "ok", "skipped: over the 100 s budget before timing scarlet_a fp16",
        "skipped: over the 100 s budget before scarlet_a int8", "skipped: over the 100 s budget before scarlet_b fp32"]
    assert [r["status"] for r in _report(tmp_path)["rows"]] == [r.status for r in rows]
    assert writer.finish(seconds=120.0)["complete"] and "Took 120.0 s." in (tmp_path / "reports" / "gpu-check.md").read_text()


def test_gpu_check_stops_a_calibration_at_the_deadline(tmp_path, val_dir):
    """A calibration cannot be interrupted from inside gpu-check: its child process is stopped at the
    deadline, and leaves nothing behind."""
    import time

    from scarlet_deploy.runtime import gpu_check
    from scarlet_deploy.runtime.core.errors import OutOfTime

    cfg = gpu_check.CheckConfig(tmp_path / "build", tmp_path / "reports" / "gpu-check", val_dir)
    t0 = time.monotonic()
    with pytest.raises(OutOfTime, match="while calibrating scarlet_a"):
        gpu_check.calibrate_within("scarlet_a", cfg, gpu_check.Deadline(3))
    assert time.monotonic() - t0 < 3 + gpu_check.STOP_GRACE_S + 5
    # The FP32 export it starts from may finish first (a whole artifact of its own); the Q/DQ model may not exist.
    left = [p.name for p in tmp_path.rglob("*") if ".int8" in p.name or p.name.endswith(".part")]
    assert not left, f"a stopped calibration leaves no artifact, whole or partial: {left}"


def test_a_failed_row_does_not_stop_the_others(tmp_path):
    from scarlet_deploy.runtime import gpu_check

    cells = [("scarlet_a", "int8"), ("scarlet_a", "fp16")]

    def work(model, precision):
        if precision == "int8":
            raise ScarletError("TensorRT could not build it.")
        return gpu_check.Row(model, precision, "ok")

    rows = gpu_check.run_rows(cells, work, gpu_check.Deadline(540), _writer(tmp_path, 2))
    assert [r.status for r in rows] == ["FAILED: TensorRT could not build it", "ok"]


# ----------------------------------------------------------------------------- TensorRT errors per operation

def test_tensorrt_errors_are_collected_per_operation():
    import threading

    from scarlet_deploy.runtime.runners.trt import ErrorLog

    log = ErrorLog()
    with log.capture() as parse:
        log.error("parse: unsupported node")
    with log.capture() as build:
        pass
    assert parse == ["parse: unsupported node"] and build == [], "a later operation never repeats an earlier error"
    log.error("logged while nothing runs")
    with log.capture() as outer, log.capture() as inner:
        t = threading.Thread(target=log.error, args=("from a TensorRT worker thread",))
        t.start()
        t.join()
    assert outer == inner == ["from a TensorRT worker thread"]
    assert parse == ["parse: unsupported node"] and build == [], "a finished operation receives nothing more"


# ----------------------------------------------------------------------------- doctor

def test_doctor_reports_this_machine_in_seconds_and_exits_0(tmp_path, capsys):
    import json
    import time

    from scarlet_deploy.runtime.core.host import cpu_isa

    t0 = time.monotonic()
    assert cli.main(["doctor", "--build-dir", str(tmp_path / "build"), "--json", str(tmp_path / "d.json")]) == 0
    assert time.monotonic() - t0 < 60
    out = capsys.readouterr().out
    for item in ("python", "packages", "cpu isa", "onnxruntime", "torch", "tensorrt", "cuda-python", "gpu", "memory",
                 "disk", "tensorrt plans"):
        assert f"{item}:" in out, item
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["cpu"]["isa"] == cpu_isa() and "CPUExecutionProvider" in d["onnxruntime"]["providers"]
    assert d["packages"]["onnxruntime"] and d["disk"]["free_gb"] > 0 and d["memory"]["available_gb"] > 0
    assert d["tensorrt_ready"] == (_gpu_missing() is None)
    assert not (tmp_path / "build").exists()


def test_cpu_isa_reads_the_flags(tmp_path):
    from scarlet_deploy.runtime.core.host import cpu_flags, cpu_isa, isa_text

    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_vnni amx_tile amx_int8\n")
    isa = cpu_isa(cpu_flags(str(info)))
    assert isa["AVX2"] and isa["AVX-512"] and isa["VNNI"] and isa["AMX"] and isa["AMX-INT8"]
    assert not isa["BF16"] and not isa["AMX-BF16"]
    assert isa_text(isa) == "AVX2, AVX-512, VNNI, AMX, AMX-INT8"
    assert cpu_isa(cpu_flags(str(tmp_path / "absent"))) is None and isa_text(None).startswith("unknown")


# ----------------------------------------------------------------------------- GPU

@pytest.fixture(scope="session")  # session, like the model fixtures, so it skips before they are built
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


@pytest.mark.gpu
def test_a_build_past_its_deadline_is_cancelled_and_writes_nothing(gpu, lite0_onnx, tmp_path):
    import time

    from scarlet_deploy.export.trt_build import build_engine
    from scarlet_deploy.runtime.core.errors import OutOfTime

    plan = tmp_path / "m.fp32.plan"
    with pytest.raises(OutOfTime, match="cancelled"):  # TensorRT asks the progress monitor after each step
        build_engine(EngineConfig(lite0_onnx, "fp32", plan, batch=BatchProfile(1, 1, 2)), deadline=time.monotonic())
    assert not plan.exists() and not list(tmp_path.glob("m.fp32.plan*"))


@pytest.mark.gpu
def test_a_failed_graph_capture_is_cleaned_up(gpu, lite0_onnx, tmp_path, monkeypatch):
    from scarlet_deploy.export.trt_build import build_engine

    plan = tmp_path / "m.fp32.plan"
    build_engine(EngineConfig(lite0_onnx, "fp32", plan, batch=BatchProfile(1, 1, 2)))
    with TrtRunner(plan) as runner:
        enqueue = runner._enqueue
        cudart = runner._cudart

        def illegal_during_capture(batch, copies):
            # Synchronising a capturing stream is a CUDA error that invalidates the capture.
            err, = cudart.cudaStreamSynchronize(runner._stream)
            if err != cudart.cudaError_t.cudaSuccess:
                raise ScarletError(f"CUDA error {cudart.cudaGetErrorName(err)[1].decode()}")
            return enqueue(batch, copies)

        monkeypatch.setattr(runner, "_enqueue", illegal_during_capture)
        with pytest.raises(ScarletError, match="cannot be captured in a CUDA graph"):
            runner._capture(1, include_copies=False)
        monkeypatch.setattr(runner, "_enqueue", enqueue)
        # capture ended and the graph gone: the stream works, and captures again
        assert runner.infer(np.zeros((2, 3, 224, 224), np.float32)).shape == (2, 1000)
        assert len(runner.time(batch=1, iters=3, warmup=1, cuda_graph=True)) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("high", ["fp16", "fp32"])
def test_int8_engine_parses_builds_runs_and_matches(gpu, lite0_onnx, lite0_trt_qdq, tmp_path, high):
    from scarlet_deploy.export.fp16 import logit_agreement
    from scarlet_deploy.export.registry import get_spec
    from scarlet_deploy.export.trt_build import build_engine
    from scarlet_deploy.runtime.data.images import fixed_images
    from scarlet_deploy.runtime.data.preprocess import load_batch
    from scarlet_deploy.runtime.runners.ort import OrtOptions, OrtRunner

    paths = fixed_images(32)
    if not paths:
        pytest.skip("no real images: the shared ImageNet sample is absent (set SCARLET_VAL_DIR)")
    plan = tmp_path / f"m.int8-{high}.plan"
    cfg = EngineConfig(lite0_onnx, "int8", plan, int8_onnx=lite0_trt_qdq, batch=BatchProfile(1, 8, 16),
                       timing_cache=tmp_path / "t.cache", int8_high_precision=high)
    r = build_engine(cfg)  # parses the Q/DQ ONNX (the FP16-high-precision one by default) and builds
    net = r.manifest["network"]
    assert net["qdq_nodes"] > 0 and net["io_float32"] == 1
    assert (net["float16"] > 0) == (high == "fp16"), net
    assert r.manifest["request"]["int8_high_precision"] == high
    assert build_engine(cfg).reused
    x = load_batch(paths, get_spec("efficientnet_lite0").preprocess)
    fake_quant = OrtOptions(threads=2, opt_level="disable")  # Q/DQ as float quantise-dequantise
    with TrtRunner(plan) as runner, OrtRunner(lite0_trt_qdq, options=fake_quant) as qdq_ort, \
            OrtRunner(lite0_onnx) as fp32_ort:
        got = runner.infer(x)
        assert np.isfinite(got).all()
        vs_qdq = logit_agreement(qdq_ort.infer(x), got)
        vs_fp32 = logit_agreement(fp32_ort.infer(x), got)
        # INT8 kernels round differently from onnxruntime's float emulation: judged by top-1, with the
        # logit error bounded loosely (the emulation itself moves 2-8 % under FP16 rounding alone)
        assert vs_qdq["top1_agreement"] >= 0.875 and vs_qdq["rel_err_median"] < 0.1, vs_qdq
        assert vs_fp32["top1_agreement"] >= 0.85, vs_fp32
        assert len(runner.time(batch=8, iters=10, warmup=2, cuda_graph=True)) == 10


def test_gpu_check_images_labels_and_markdown(val_dir):
    from scarlet_deploy.runtime import gpu_check

    files, labels = gpu_check._images(val_dir, 10)
    assert len(files) == 10 and labels is not None and labels.shape == (10,)
    row = gpu_check.Row("scarlet_a", "fp16", "ok", "build/scarlet_a.fp16.plan", 41.5,
                        {"top1_agreement": 0.99, "rel_err_max": 0.01}, 0.7,
                        {"b1": {"median_ms": 0.5, "images_per_s": 2000.0}, "b8": {"median_ms": 1.0, "images_per_s": 8000.0}})
    data = {"tensorrt": "11.4.0.106", "gpu": {"name": "NVIDIA H100", "compute_capability": "9.0"},
            "environment": {"date": "today"}, "images": 10, "reference": "PyTorch", "iters": 5, "seconds": 1.0,
            "rows": [row.__dict__, gpu_check.Row("scarlet_a", "int8", "skipped: no calib").__dict__,
                     gpu_check.Row("scarlet_b", "fp32", "ok", timings={"b1": {"median_ms": 0.4, "cuda_graph": False}}).__dict__]}
    md = gpu_check.markdown(data)
    assert "Not capturable in a CUDA graph, timed as plain launches: scarlet_b fp32." in md
    assert "| scarlet_a | fp16 | ok | 41.5 | 0.99 | 0.01 | 0.7 | 0.5 | 1 | - | 8000 |" in md
    assert "| scarlet_a | int8 | skipped: no calib |" in md
