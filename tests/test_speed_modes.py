"""Throughput mode, bf16 float parts of INT8 models, a peak per precision: decisions on CPU flags, not on this CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from scarlet_deploy.runtime.core.host import cpu_isa
from scarlet_deploy.runtime.measure import BATCHES_PER_STREAM, CellStats, throughput_timer
from scarlet_deploy.runtime.runners import openvino as ovr
from scarlet_deploy.runtime.runners.base import Runner
from scarlet_deploy.runtime.runners.ort import OrtOptions, OrtRunner
from scarlet_deploy.runtime.verify import config as vcfg
from scarlet_deploy.runtime.verify import discover as vdisc

SAPPHIRE_RAPIDS = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"})
ICE_LAKE = frozenset({"avx2", "avx512f", "avx512_vnni"})  # VNNI, no BF16
HASWELL = frozenset({"avx2", "fma"})

needs_openvino = pytest.mark.skipif(ovr.openvino_missing() is not None, reason="OpenVINO is not installed")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10)).eval()
    path = tmp_path_factory.mktemp("m") / "tiny.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, 16, 16), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return path


def _batches(n: int, batch: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((batch, 3, 16, 16), dtype=np.float32) for _ in range(n)]


# ---------------------------------------------------------------- throughput mode

def test_ort_throughput_mode_splits_the_threads_into_streams_and_keeps_each_batch_in_place(tiny_onnx):
    xs = _batches(7)
    with OrtRunner(tiny_onnx, options=OrtOptions(threads=2)) as r:
        assert r.streams(2) == 2 and r.describe()["throughput"] == {"streams": 2, "threads_per_stream": 1}
        many = r.infer_many(xs)
        assert len(many) == len(xs)
        for x, y in zip(xs, many):  # same logits as latency mode, in the order given
            np.testing.assert_allclose(y, r.infer(x), rtol=1e-5, atol=1e-5)
    assert OrtRunner(tiny_onnx, options=OrtOptions(threads=4, threads_per_stream=2)).streams(8) == 2
    assert OrtRunner(tiny_onnx, options=OrtOptions(threads=1)).streams(8) == 1  # one core: latency mode


@needs_openvino
@pytest.mark.parametrize("backend", ["ov", "ov-bf16"])
def test_openvino_throughput_mode_is_an_async_queue_with_the_streams_openvino_asks_for(tiny_onnx, backend):
    if ovr.ov_unavailable(backend):
        pytest.skip(ovr.ov_unavailable(backend))
    xs = _batches(5) + _batches(2, batch=3)  # two batch sizes: two compiled models, order kept
    with ovr.OvRunner(tiny_onnx, options=ovr.OvOptions.for_backend(backend, threads=2)) as r:
        import openvino.properties as props

        streams = r.streams(2)
        assert streams >= 1 and len(r.queues[2]) == streams  # one request per stream OpenVINO asks for
        compiled_for = r.queues[2][0].get_compiled_model()
        assert str(compiled_for.get_property(props.hint.performance_mode)) == "THROUGHPUT"
        assert streams == compiled_for.get_property(props.optimal_number_of_infer_requests)
        many = r.infer_many(xs)
        tol = 1e-5 if backend == "ov" else 5e-2
        for x, y in zip(xs, many):
            assert y.shape == (x.shape[0], 10)
            np.testing.assert_allclose(y, r.infer(x), rtol=tol, atol=tol)


class _TwoStreams(Runner):
    """Pretends to run two batches at once: infer_many takes one batch's time for two."""

    def __init__(self):
        self.calls: list[int] = []

    def infer(self, x):
        return np.zeros((x.shape[0], 10), np.float32)

    def streams(self, batch):
        return 2

    def infer_many(self, batches):
        self.calls.append(len(batches))
        return [self.infer(x) for x in batches]


def test_throughput_timer_runs_batches_per_stream_and_its_rate_is_images_over_wall_time():
    r = _TwoStreams()
    x = np.zeros((8, 3, 4, 4), np.float32)
    lat = throughput_timer(r, x)()
    assert r.calls == [2 * BATCHES_PER_STREAM] and len(lat) == 2 * BATCHES_PER_STREAM
    stats = CellStats.from_rounds([lat], batch=8)
    assert stats.throughput == pytest.approx(8 * 2 * BATCHES_PER_STREAM / sum(lat))


# ---------------------------------------------------------------- bf16 float parts of INT8 models

def test_bf16_float_parts_run_only_where_the_cpu_has_bf16():
    for backend in ("ov-bf16", "ov-int8-bf16"):
        assert ovr.bf16_unsupported(cpu_isa(SAPPHIRE_RAPIDS), ["BF16", "INT8"], backend) is None
        why = ovr.bf16_unsupported(cpu_isa(ICE_LAKE), ["INT8"], backend)
        assert why and f"{backend} is skipped" in why and "avx512_bf16 or amx_bf16" in why
    assert ovr.OvOptions.for_backend("ov-int8-bf16").precision == "bf16"
    assert ovr.OvOptions.for_backend("ov-int8").precision == "f32"  # ov-int8's parity stays the quantisation alone


def test_bf16_float_parts_take_only_the_openvino_int8_model_and_have_their_own_gate(tmp_path):
    fp32 = vdisc.Backend("m.onnx", "ort", tmp_path / "m.onnx", "fp32", None)
    ort_int8 = vdisc.Backend("m.int8.onnx", "ort", tmp_path / "m.int8.onnx", "int8", {"target": "ort"})
    ov_int8 = vdisc.Backend("m.int8-ov.onnx", "ort", tmp_path / "m.int8-ov.onnx", "int8", {"target": "ov"})
    notes: list[str] = []
    got = [(b.name, b.backend, b.precision) for b in vdisc.on_runtime([fp32, ort_int8, ov_int8], "ov-int8-bf16", notes)]
    assert got == [("m.int8-ov.onnx on ov-int8-bf16", "ov-int8-bf16", "int8-bf16")]
    assert len(notes) == 2 and all("it takes the INT8 model calibrated for OpenVINO" in n for n in notes)
    t = vcfg.VerifyConfig("m").thresholds
    assert t.check("int8-bf16", 0.96, 1.0) == (True, "agree >= 95.00%")
    strict = vcfg.Thresholds(int8_bf16_min_agreement=0.97)  # its own floor, apart from int8's
    assert strict.check("int8-bf16", 0.96, 0.0)[0] is False and strict.check("int8", 0.96, 0.0)[0] is True


# ---------------------------------------------------------------- a peak per precision

def test_every_precision_has_a_peak_kind_and_bf16_needs_native_bf16():
    from scarlet_deploy.runtime.peak import KINDS, peak_kind, peak_unavailable

    assert KINDS == ("fp32", "bf16", "int8")
    kinds = {b: peak_kind(b) for b in ("torch", "torch-compile", "ort", "ov", "ov-bf16", "torch-compile-bf16",
                                       "ort-int8", "ov-int8", "ov-int8-bf16", "trt-fp16")}
    assert kinds == {"torch": "fp32", "torch-compile": "fp32", "ort": "fp32", "ov": "fp32", "ov-bf16": "bf16",
                     "torch-compile-bf16": "bf16", "ort-int8": "int8", "ov-int8": "int8", "ov-int8-bf16": "int8",
                     "trt-fp16": None}
    assert peak_unavailable("bf16", cpu_isa(SAPPHIRE_RAPIDS)) is None
    assert "no native bf16" in peak_unavailable("bf16", cpu_isa(ICE_LAKE))
    assert "cannot be read" in peak_unavailable("bf16", None)
    assert peak_unavailable("fp32", cpu_isa(HASWELL)) is None and peak_unavailable("int8", cpu_isa(HASWELL)) is None


def test_bf16_peak_is_the_faster_bf16_gemm_and_names_it(monkeypatch):
    from scarlet_deploy.runtime import peak

    if peak.peak_unavailable("bf16"):
        assert peak.measure_peak("bf16", seconds=0.01, n=64) is None  # a CPU without bf16: no peak, not an error
        return
    p = peak.measure_peak("bf16", seconds=0.01, n=128, threads=1)
    assert p.kind == "bf16" and p.gops > 0 and p.method.startswith(("OpenVINO MatMul", "torch.mm")) and "128x128x128" in p.method
    monkeypatch.setattr(peak, "_bf16_methods", lambda n, t: [("slow", lambda: (lambda: __import__("time").sleep(0.002))),
                                                            ("fast", lambda: (lambda: None))])
    assert peak.measure_peak("bf16", seconds=0.01, n=128, threads=1).method.startswith("fast, best of")


# ---------------------------------------------------------------- torch.compile baselines

def test_torch_compile_needs_a_compiler_and_its_bf16_row_native_bf16():
    from scarlet_deploy.runtime.runners.pytorch import torch_compile_unavailable

    assert torch_compile_unavailable("torch-compile", cpu_isa(HASWELL), "/usr/bin/g++") is None
    assert "needs a C++ compiler" in torch_compile_unavailable("torch-compile", cpu_isa(SAPPHIRE_RAPIDS), None)
    assert torch_compile_unavailable("torch-compile-bf16", cpu_isa(SAPPHIRE_RAPIDS), "/usr/bin/g++") is None
    why = torch_compile_unavailable("torch-compile-bf16", cpu_isa(ICE_LAKE), "/usr/bin/g++")
    assert why and "no native bf16" in why and "torch-compile-bf16" in why


@pytest.mark.slow
@pytest.mark.parametrize("backend, tol", [("torch-compile", 1e-5), ("torch-compile-bf16", 5e-2)])
def test_torch_compile_runs_the_module_and_states_its_compile_time(backend, tol):
    from scarlet_deploy.runtime.runners.pytorch import torch_compile_unavailable
    from scarlet_deploy.runtime.runners.registry import open_runner

    if torch_compile_unavailable(backend):
        pytest.skip(torch_compile_unavailable(backend))
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    x = _batches(1)[0]
    ref = open_runner("torch", module=m).load().infer(x)
    with open_runner(backend, module=m, threads=1) as r:
        y = r.infer(x)
        np.testing.assert_allclose(y, ref, rtol=tol, atol=tol)
        np.testing.assert_allclose(r.infer(x), y)  # second call: no recompile, same result
        d = r.describe()
    assert list(d["compile_s"]) == ["2"] and d["compile_s"]["2"] > 0 and d["freezing"]


# ---------------------------------------------------------------- bulk work and serving use throughput mode

def test_bulk_inference_splits_a_batch_over_the_streams_and_keeps_the_order(tiny_onnx):
    x = np.concatenate(_batches(4, batch=4))
    with OrtRunner(tiny_onnx, options=OrtOptions(threads=2)) as r:
        calls = []
        many = r.infer_many
        r.infer_many = lambda parts: calls.append([len(p) for p in parts]) or many(parts)
        np.testing.assert_allclose(r.infer_bulk(x), r.infer(x), rtol=1e-5, atol=1e-5)
        assert calls == [[8, 8]]  # one part per stream


def test_serve_starts_one_instance_per_stream_on_a_cpu_and_one_on_a_gpu():
    from scarlet_deploy.runtime.serve.cli import default_instances

    assert default_instances(False, 4) == 4 and default_instances(False, 1) == 1
    assert default_instances(True, 16) == 1
