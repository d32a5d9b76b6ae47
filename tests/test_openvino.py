"""OpenVINO backends: the same ONNX as onnxruntime, skipped with the reason wherever they cannot run."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from scarlet_deploy.runtime.bench import plan as bplan
from scarlet_deploy.runtime.cli import main
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.host import cpu_isa
from scarlet_deploy.runtime.runners import openvino as ovr
from scarlet_deploy.runtime.runners.ort import OrtRunner
from scarlet_deploy.runtime.runners.registry import open_runner
from scarlet_deploy.runtime.verify import config as vcfg
from scarlet_deploy.runtime.verify import discover as vdisc
from scarlet_deploy.runtime.verify import run as vrun

LITE0 = "efficientnet_lite0"
ZEN4_FLAGS = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})
SKYLAKE_FLAGS = frozenset({"avx2", "avx512f", "avx512bw"})  # AVX-512 without VNNI or BF16

needs_openvino = pytest.mark.skipif(ovr.openvino_missing() is not None, reason="OpenVINO is not installed "
                                    "(pip install -c constraints.txt -e '.[openvino]'; make setup does)")


def test_bf16_runs_only_where_the_cpu_and_openvino_both_have_it():
    why = ovr.bf16_unsupported(cpu_isa(SKYLAKE_FLAGS), ["FP32", "INT8", "BF16"])  # OpenVINO would emulate it
    assert why and "avx512_bf16 or amx_bf16" in why and "ov-bf16 is skipped" in why
    assert ovr.bf16_unsupported(cpu_isa(ZEN4_FLAGS), ["FP32", "BF16", "INT8"]) is None
    assert ovr.bf16_unsupported(cpu_isa(frozenset({"amx_tile", "amx_bf16"})), ["BF16"]) is None  # AMX alone is enough
    assert ovr.bf16_unsupported(cpu_isa(ZEN4_FLAGS), None) is None  # before OpenVINO is asked: the flags decide
    why = ovr.bf16_unsupported(cpu_isa(ZEN4_FLAGS), ["FP32", "INT8"])
    assert why and "OPTIMIZATION_CAPABILITIES: FP32, INT8" in why
    assert "unknown: ov-bf16 is skipped" in ovr.bf16_unsupported(cpu_isa(None), ["BF16"])  # no /proc/cpuinfo


@needs_openvino
def test_a_cpu_without_bf16_skips_ov_bf16_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(ovr, "cpu_isa", lambda: cpu_isa(SKYLAKE_FLAGS))
    runtimes, notes = vdisc.available_runtimes(["ort", "ov", "ov-bf16"])
    assert runtimes == ["ort", "ov"]
    assert len(notes) == 1 and notes[0].startswith("backend ov-bf16 skipped: this CPU has no native bf16")

    (tmp_path / "scarlet_a.onnx").write_bytes(_tiny_onnx())
    cfg = bplan.BenchConfig(models=["scarlet_a"], backends=["ort", "ov", "ov-bf16"], build_dir=tmp_path, memory=False)
    plan = bplan.plan_model("scarlet_a", cfg)
    assert list(plan.artifacts) == ["ort", "ov"] and "no native bf16" in plan.skipped["ov-bf16"]


def test_without_openvino_every_ov_backend_is_skipped_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    runtimes, notes = vdisc.available_runtimes(["ort", "ov", "ov-bf16"])
    assert runtimes == ["ort"] and len(notes) == 2
    assert all("OpenVINO is not installed" in n and "scarlet-deploy[openvino]" in n for n in notes)

    (tmp_path / "scarlet_a.onnx").write_bytes(_tiny_onnx())
    cfg = bplan.BenchConfig(models=["scarlet_a"], backends=["ort", *ovr.OV_BACKENDS], build_dir=tmp_path, memory=False)
    plan = bplan.plan_model("scarlet_a", cfg)
    assert list(plan.artifacts) == ["ort"]
    assert set(plan.skipped) == set(ovr.OV_BACKENDS)
    assert all("OpenVINO is not installed" in why for why in plan.skipped.values())

    # asked for OpenVINO only: nothing is compared, which must not read as a PASS
    f = tmp_path / "scarlet_a.onnx"
    loaded = SimpleNamespace(name="scarlet_a", let=False, checkpoint_sha256="0" * 64)
    with pytest.raises(ScarletError, match="nothing to verify here: backend ov skipped: OpenVINO is not installed"):
        vdisc.resolve_backends(vcfg.VerifyConfig("scarlet_a", onnx=[f], backends=["ov"]), loaded)


def test_verify_names_a_runtime_it_does_not_know():
    with pytest.raises(ScarletError, match="unknown --backends ov-int8; choose from ort, ov, ov-bf16, ov-int8-bf16"):
        vdisc.available_runtimes(["ort", "ov-int8"])


def test_each_onnx_becomes_a_backend_of_each_runtime_gated_by_its_own_precision(tmp_path):
    files = [vdisc.Backend(f"m.{p}.onnx", "ort", tmp_path / f"m.{p}.onnx", p, None) for p in ("fp32", "int8")]
    notes: list[str] = []
    got = [(b.name, b.backend, b.precision) for r in ("ort", "ov", "ov-bf16") for b in vdisc.on_runtime(files, r, notes)]
    assert got == [("m.fp32.onnx", "ort", "fp32"), ("m.int8.onnx", "ort-int8", "int8"),
                   ("m.fp32.onnx on ov", "ov", "fp32"), ("m.int8.onnx on ov", "ov-int8", "int8"),
                   ("m.fp32.onnx on ov-bf16", "ov-bf16", "bf16")]
    assert notes == ["m.int8.onnx not run on ov-bf16: it is int8, and ov-bf16 lowers the float ops of an FP32 ONNX"]
    files[1].manifest = {"calibration_images": {"dir": str(tmp_path), "count": 200}}
    rows = [b for r in ("ort", "ov") for b in vdisc.on_runtime(files[1:], r, [])]
    assert [n.split(" was ")[0] for n in vdisc.calibration_overlap(rows, tmp_path)] == ["m.int8.onnx"]  # once per file
    t = vcfg.VerifyConfig("m").thresholds
    assert t.check("bf16", 0.985, 0.5) == (True, "agree >= 98.00%")
    assert t.check("bf16", 0.975, 0.0)[0] is False
    assert t.check("fp16", 0.985, 0.0)[0] is False  # fp16 keeps its own, stricter floor


def test_a_model_calibrated_for_openvino_is_verified_on_openvino_only(tmp_path):
    f = vdisc.Backend("m.int8-ov.onnx", "ort", tmp_path / "m.int8-ov.onnx", "int8", {"target": "ov"})
    notes: list[str] = []
    got = [b.backend for r in ("ort", "ov", "ov-bf16") for b in vdisc.on_runtime([f], r, notes)]
    assert got == ["ov-int8"]
    assert notes[0] == ("m.int8-ov.onnx not run on ort: it was calibrated for OpenVINO (--target ov); "
                        "it runs as ov-int8 and ov-int8-bf16")


def test_without_openvino_the_ov_target_is_refused_before_any_work_and_make_calib_leaves_it_out(monkeypatch):
    from scarlet_deploy.calib import model as cmodel
    from scarlet_deploy.calib import qdq

    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ScarletError, match="--target ov is judged on OpenVINO's own INT8 kernels: OpenVINO is not installed"):
        qdq.get_target("ov")
    with pytest.raises(ScarletError, match="--target ov is judged"):  # before images are read or the model exported
        cmodel.calibrate_model("scarlet_a", Path("/nonexistent"), None, ["ov"], None, None, cmodel.model_config())
    targets, note = cmodel.default_targets()
    assert targets == ["ort", "trt"] and note.startswith("target ov skipped: OpenVINO is not installed")


@pytest.mark.slow
@needs_openvino
def test_openvino_runs_exported_lite0_like_onnxruntime_on_real_images(lite0_onnx, eval_batch):
    x = eval_batch(LITE0, 48)
    ref = OrtRunner(lite0_onnx).load().infer(x)
    assert len(set(ref.argmax(1))) > 20  # real images, trained weights: top-1 varies
    scale = np.abs(ref).max()
    with open_runner("ov", lite0_onnx) as ov:
        head, tail = ov.infer(x[:40]), ov.infer(x[40:])  # two batch sizes, two compiled shapes
        assert sorted(ov.requests) == [1, 8, 40]  # batch 1 compiled at load, so a bad graph fails there
        ov.infer(x[:8])  # the batch-8 request runs again on other images
    out = np.concatenate([head, tail])
    assert out.shape == ref.shape and np.isfinite(out).all()
    assert (out.argmax(1) == ref.argmax(1)).all()
    assert np.abs(out - ref).max() / scale < 1e-4  # f32 kernels: rounding, not bf16


@pytest.mark.slow
@needs_openvino
def test_openvino_target_model_runs_int8_on_openvino_and_tracks_fp32(lite0_onnx, val_files, eval_batch, tmp_path):
    from scarlet_deploy.calib import evaluate, qdq, ranges, stats
    from scarlet_deploy.export.registry import get_spec
    from scarlet_deploy.runtime.data.preprocess import load_batch

    target = qdq.get_target("ov")
    calib_x = load_batch(val_files[3::16][:32], get_spec(LITE0).preprocess)
    out = tmp_path / "lite0.int8-ov.onnx"
    qdq.quantize(lite0_onnx, ranges.compute_ranges(stats.collect(lite0_onnx, calib_x, batch=8, threads=2), "minmax",
                                                   target.symmetric), target, out)
    x = eval_batch(LITE0, 48)
    ref = evaluate.logits(lite0_onnx, x, threads=2)
    on_ov = evaluate.logits(out, x, threads=2, runtime="ov")
    fake = evaluate.logits(out, x, threads=2, runtime="fake-quant")
    assert np.isfinite(on_ov).all()
    # OpenVINO runs the very arithmetic the Q/DQ pairs state, INT8 kernels and all ...
    assert evaluate.accuracy(on_ov, None, fake).logits_rmse < 0.05
    # ... and that arithmetic is INT8: not FP32's numbers, yet FP32's top-1 on nearly every image
    acc = evaluate.accuracy(on_ov, None, ref)
    assert 1e-3 < acc.logits_rmse < 0.3 and acc.agreement >= 90
    import openvino as ov

    compiled = ov.Core().compile_model(str(out), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    convs = [op for op in compiled.get_runtime_model().get_ordered_ops()
             if op.get_rt_info()["layerType"].astype(str) == "Convolution"]
    assert convs and all(op.get_rt_info()["runtimePrecision"].astype(str) == "u8" for op in convs)


@pytest.mark.slow
@needs_openvino
def test_calibrating_for_openvino_judges_and_times_the_model_on_openvino(lite0_onnx, val_dir, tmp_path, monkeypatch):
    import json

    from scarlet_deploy.calib.pipeline import CalibConfig, calibrate

    on_ov: set[str] = set()
    infer = ovr.OvRunner.infer
    monkeypatch.setattr(ovr.OvRunner, "infer", lambda self, x: on_ov.add(self.path) or infer(self, x))
    out = tmp_path / "lite0.int8-ov.onnx"
    _, res = calibrate(CalibConfig(onnx=lite0_onnx, images=val_dir, output=out, target="ov", num_images=8, num_select=8,
                                   num_eval=8, compare_methods=False, threads=2, layer_error_images=0, method="minmax",
                                   bench_rounds=1, report=str(tmp_path / "r")))
    assert res.manifest["target"] == "ov" and res.manifest["depthwise_padded_to_16_channels"] == []
    assert res.manifest["quantization"]["accuracy_measured_with"] == "OpenVINO CPU INT8 kernels"
    assert res.int8.images == 8 and res.int8.agreement is not None
    assert set(res.throughput) >= {"fp32", "int8"}
    # every candidate judged on OpenVINO (bias correction variants), the model and FP32 timed there
    assert len(on_ov) > 2 and str(out) in on_ov and str(lite0_onnx) in on_ov
    md = (tmp_path / "r.md").read_text()
    assert "Speed: batch 8 on OpenVINO (every row)" in md and "measured with OpenVINO CPU INT8 kernels" in md
    assert json.loads((tmp_path / "r.json").read_text())["targets"][0]["target"] == "ov"


@pytest.mark.slow
@needs_openvino
def test_verify_gates_ort_and_openvino_rows_on_the_same_images(tmp_path, val_dir, lite0_onnx, loaded_model):
    cfg = vcfg.VerifyConfig(LITE0, onnx=[lite0_onnx], backends=["ort", "ov"], val_dir=val_dir, limit=24, workers=0,
                            pipeline_parity=False, progress=False)
    r = vrun.verify(cfg, loaded_model(LITE0))
    assert [(b["name"], b["backend"], b["precision"]) for b in r.backends] == [
        (lite0_onnx.name, "ort", "fp32"), (f"{lite0_onnx.name} on ov", "ov", "fp32")]
    assert r.passed and all(b["top1_agreement"] == 1.0 and b["max_rel_error"] < 1e-4 for b in r.backends)


@pytest.mark.slow
@needs_openvino
def test_predict_on_openvino_names_the_same_classes(lite0_onnx, val_files, capsys):
    images = [str(f) for f in val_files[::125]]
    outs = []
    for backend in ("ort", "ov"):
        assert main(["predict", "--onnx", str(lite0_onnx), "--backend", backend, "--json", *images]) == 0
        outs.append(json.loads(capsys.readouterr().out)["predictions"])
    assert [[c[0] for c in p["top"]] for p in outs[0]] == [[c[0] for c in p["top"]] for p in outs[1]]


def _tiny_onnx() -> bytes:
    """A 1x1 convolution classifier on (N, 3, 8, 8): enough for planning, which reads the input size."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((10, 3, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"]), helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Flatten", ["p"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_doctor_says_which_ov_backends_run_here_and_why_not(monkeypatch):
    from scarlet_deploy.runtime import doctor

    monkeypatch.setitem(sys.modules, "openvino", None)
    assert "OpenVINO is not installed" in doctor._openvino()["error"]
    monkeypatch.undo()
    if ovr.openvino_missing():
        pytest.skip(ovr.openvino_missing())
    monkeypatch.setattr(ovr, "cpu_isa", lambda: cpu_isa(SKYLAKE_FLAGS))
    row = dict(doctor.rows(doctor.probe()))["openvino"]
    assert "ov: runs here" in row and "ov-int8: runs here" in row and "ov-bf16: this CPU has no native bf16" in row


@needs_openvino
@pytest.mark.parametrize("backend,precision", [("ov", "f32"), ("ov-int8", "f32"), ("calibrate --target ov", "f32"),
                                               ("ov-bf16", "bf16")])
def test_each_ov_backend_asks_openvino_for_its_precision_on_any_cpu(monkeypatch, tmp_path, backend, precision):
    """OpenVINO's CPU plugin picks bf16 by itself on CPUs with native bf16: `ov` must ask for f32 in the settings it
    compiles with, which no run on a CPU without bf16 can show. Read here from what reaches compile_model."""
    import openvino as ov
    import openvino.properties.hint as hints

    from scarlet_deploy.calib import evaluate

    seen = []

    class Core(ov.Core):
        def compile_model(self, model, device=None, config=None):
            seen.append((device, dict(config or {})))
            if config and config.get(hints.inference_precision) == ov.Type.bf16:
                config = {**config, hints.inference_precision: ov.Type.f32}  # compiles on a CPU without bf16 too
            return super().compile_model(model, device, config)

    monkeypatch.setattr(ovr, "_core", Core)
    monkeypatch.setattr(ovr, "cpu_isa", lambda: cpu_isa(ZEN4_FLAGS))  # a CPU where OpenVINO would pick bf16 itself
    monkeypatch.setattr(Core, "get_property", lambda self, *a: ["FP32", "BF16", "INT8"], raising=False)
    path = tmp_path / "m.onnx"
    path.write_bytes(_tiny_onnx())
    runner = evaluate._runner(path, "ov", 1) if backend.startswith("calibrate") else open_runner(backend, path, threads=1)
    with runner:
        y = runner.infer(np.ones((2, 3, 8, 8), np.float32))
    assert y.shape == (2, 10) and np.isfinite(y).all()
    assert seen and all(device == "CPU" for device, _ in seen)
    want = {"f32": ov.Type.f32, "bf16": ov.Type.bf16}[precision]
    assert all(config.get(hints.inference_precision) == want for _, config in seen), seen
