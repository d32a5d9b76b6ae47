"""scarlet bench: MAC counting, statistics, interleaving, reports. No test asserts a speed."""
from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from scarlet_deploy.runtime import measure
from scarlet_deploy.runtime.bench import memory as bmem
from scarlet_deploy.runtime.bench import plan as bplan
from scarlet_deploy.runtime.bench import plot as bplot
from scarlet_deploy.runtime.bench import readme as breadme
from scarlet_deploy.runtime.bench import report as breport
from scarlet_deploy.runtime.bench import run as brun
from scarlet_deploy.runtime.bench import tune as btune
from scarlet_deploy.runtime.core import host
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.flops import count_macs
from scarlet_deploy.runtime.runners.base import Runner
from scarlet_deploy.runtime.runners.openvino import ov_unavailable
from scarlet_deploy.runtime.runners.ort import OrtOptions

# ---------------------------------------------------------------- tiny models

def _tiny_graph(dynamic: bool = True) -> onnx.ModelProto:
    """Conv 3->4 (3x3, pad 1) on 8x8, depthwise 3x3 stride 2, flatten, Gemm 64->10, MatMul 10->5."""
    rng = np.random.default_rng(0)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(w(4, 3, 3, 3), "w1"), numpy_helper.from_array(w(4, 1, 3, 3), "w2"),
             numpy_helper.from_array(w(64, 10), "w3"), numpy_helper.from_array(w(10), "b3"),
             numpy_helper.from_array(w(10, 5), "w4")]
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], group=4),
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["g"]),
        helper.make_node("MatMul", ["g", "w4"], ["logits"]),
    ]
    n = "N" if dynamic else 1
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [n, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# by hand: each output element is one dot product over (Cin/groups * kernel) or K
TINY_MACS = {"Conv": 4 * 8 * 8 * (3 * 3 * 3) + 4 * 4 * 4 * (1 * 3 * 3), "Gemm": 64 * 10, "MatMul": 10 * 5}


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """build/ holding a tiny ONNX under a registry model name, as `make export` would lay it out."""
    import torch

    d = tmp_path_factory.mktemp("build")
    model = _TinyNet().eval()
    torch.onnx.export(model, torch.zeros(1, 3, 16, 16), str(d / "scarlet_a.onnx"), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return d


def _TinyNet():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


# ---------------------------------------------------------------- MACs

def test_macs_match_hand_count():
    r = count_macs(_tiny_graph())
    assert r.by_op == TINY_MACS
    assert r.macs == sum(TINY_MACS.values())
    assert r.flops == 2 * r.macs
    assert r.nodes == 4 and r.uncounted == []


def test_macs_are_per_image_whatever_the_batch(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(_tiny_graph(), path)
    assert count_macs(path, batch=4).macs == count_macs(path).macs == count_macs(_tiny_graph(dynamic=False)).macs


def test_macs_do_not_change_the_callers_model():
    m = _tiny_graph()
    count_macs(m)
    assert not m.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")


def test_macs_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ScarletError, match="does not exist"):
        count_macs(tmp_path / "nope.onnx")


@pytest.mark.parametrize("kind, op", [("fp32", "MatMul float32"), ("int8", "MatMulInteger uint8 x int8")])
def test_peak_runs_onnxruntime_gemm_kernels(kind, op):
    from scarlet_deploy.runtime.peak import measure_peak

    p = measure_peak(kind, seconds=0.01, n=128, threads=1)
    assert p.gops > 0 and p.threads == 1 and p.kind == kind
    assert f"onnxruntime {op} 128x128x128" in p.method


def test_share_of_peak_is_never_above_100_percent():
    from scarlet_deploy.runtime.peak import Peak, peak_kind, share_of_peak

    peak = Peak(50.0, "fp32", 8, 1, 0.1, "fake")
    assert share_of_peak(25.0, peak) == pytest.approx(50.0)
    assert share_of_peak(50.0, peak) == pytest.approx(100.0)
    assert share_of_peak(60.0, peak) is None  # faster than the "peak": the yardstick is wrong
    assert share_of_peak(1.0, None) is None
    assert [peak_kind(b) for b in ("torch", "ort", "ort-int8", "trt-fp16")] == ["fp32", "fp32", "int8", None]


def test_isa_names_what_the_cpu_reports():
    from scarlet_deploy.runtime.core.host import cpu_isa, has_vnni, isa_text

    avx2 = frozenset({"avx2", "fma"})
    assert isa_text(cpu_isa(avx2)) == "AVX2" and not has_vnni(avx2)
    zen = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})
    assert isa_text(cpu_isa(zen)) == "AVX2, AVX-512, VNNI, BF16" and has_vnni(zen)


# ---------------------------------------------------------------- statistics

def test_cell_stats_percentiles_throughput_spread():
    s = measure.CellStats.from_rounds([[0.1, 0.1], [0.2, 0.2]], batch=2)
    assert s.calls == 4
    assert s.p50_ms == pytest.approx(150.0)
    assert s.p90_ms == pytest.approx(200.0) and s.p99_ms == pytest.approx(200.0)
    assert s.mean_ms == pytest.approx(150.0)
    assert s.throughput_rounds == pytest.approx([20.0, 10.0])  # 2 images per 0.1 s, per 0.2 s
    assert s.throughput == pytest.approx(15.0)
    assert s.spread_pct == pytest.approx(100 * 10 / 15)


def test_percentiles_interpolate():
    s = measure.CellStats.from_rounds([[i / 1000 for i in range(1, 101)]], batch=1)  # 1..100 ms
    assert s.p50_ms == pytest.approx(50.5)
    assert s.p90_ms == pytest.approx(90.1)
    assert s.p99_ms == pytest.approx(99.01)


def test_cell_stats_rejects_empty_round():
    with pytest.raises(ValueError):
        measure.CellStats.from_rounds([[0.1], []], batch=1)


def test_paired_ratio_is_round_by_round():
    r = measure.paired_ratio([10, 20, 30], [5, 5, 10])  # 2x, 4x, 3x
    assert (r.median, r.low, r.high) == (3.0, 2.0, 4.0)
    assert r.text() == "3.00 (2.00-4.00)"
    with pytest.raises(ValueError):
        measure.paired_ratio([1, 2], [1])


def test_round_orders_rotate_every_backend_through_every_position():
    orders = measure.round_orders(["a", "b", "c"], 3)
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]


def test_measure_interleaved_excludes_warmup_and_interleaves():
    log = []

    def fake(name):
        def call():
            log.append(name)
            return [0.001]
        return call

    rounds = btune.measure_interleaved({"a": fake("a"), "b": fake("b")}, repeats=2, seconds=1e-9, warmup_s=0,
                                       min_calls=3)
    assert log == ["a"] * 2 + ["b"] * 2 + ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3  # warm-up, then A B, B A
    assert {k: [len(r) for r in v] for k, v in rounds.items()} == {"a": [3, 3], "b": [3, 3]}


def test_config_rejects_bad_input():
    with pytest.raises(ScarletError, match="unknown backend"):
        bplan.BenchConfig(models=["scarlet_a"], backends=["tensorflow"])
    with pytest.raises(ScarletError, match="unknown model"):
        bplan.BenchConfig(models=["resnet50"])
    with pytest.raises(ScarletError, match="batch"):
        bplan.BenchConfig(models=["scarlet_a"], batches=[0])


# ---------------------------------------------------------------- a whole run on a tiny model

@pytest.fixture(scope="module")
def tiny_run(tiny_build, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(brun, "load_baseline", lambda name: SimpleNamespace(model=_TinyNet()))
    # torch.compile rows compile for tens of seconds: tests/test_speed_modes.py runs them (slow)
    backends = [b for b in bplan.BACKENDS if not b.startswith("torch-compile")]
    cfg = bplan.BenchConfig(models=["scarlet_a"], backends=backends, batches=[1, 2], threads=2, build_dir=tiny_build, repeats=2,
                            seconds=0.01, warmup_s=0, memory=False, peak_seconds=0.01,
                            reports_dir=tmp_path_factory.mktemp("reports"))
    from scarlet_deploy.runtime.peak import Peak

    # busy at the start, idle after the model: the best sample counts
    samples = {"fp32": iter([20.0, 50.0]), "bf16": iter([60.0, 70.0]), "int8": iter([30.0, 40.0])}
    mp.setattr(brun, "measure_peak",
               lambda kind, seconds, threads: Peak(next(samples[kind]), kind, 8, threads, seconds, "fake"))
    mp.setattr(brun, "peak_unavailable", lambda kind: None)  # every precision has a peak, whatever this CPU is
    try:
        yield brun.run_bench(cfg)
    finally:
        mp.undo()


def test_run_measures_every_available_backend_and_says_why_others_not(tiny_run):
    ov_here = {b for b in ("ov", "ov-bf16") if ov_unavailable(b) is None}  # OpenVINO and BF16 vary by machine
    got = {(r["backend"], r["batch"], r["mode"]) for r in tiny_run["results"]}
    assert got == {(b, n, m) for b in {"torch", "ort", *ov_here} for n in (1, 2) for m in ("latency", "throughput")}
    skipped = tiny_run["models"]["scarlet_a"]["skipped"]
    assert set(skipped) == {"ort-int8", "ov-int8", "ov-int8-bf16", "trt-fp32", "trt-fp16", "trt-int8",
                            *({"ov", "ov-bf16"} - ov_here)}
    assert "make calib MODEL=scarlet_a" in skipped["ort-int8"]
    assert all(why for why in skipped.values())


def test_run_rows_carry_ratios_work_and_sizes(tiny_run):
    macs = tiny_run["models"]["scarlet_a"]["macs"]["macs"]
    assert macs == 8 * 16 * 16 * 27 + 8 * 10
    for r in tiny_run["results"]:
        if r["mode"] == "latency" or r["streams"] == 1:
            assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        else:  # a throughput-mode call's per-batch averages are not latencies
            assert r["p50_ms"] is None and r["streams"] == 2  # 2 threads: one stream each (ORT), OpenVINO's choice
        assert len(r["throughput_rounds"]) == 2
        assert r["gops"] == pytest.approx(2 * macs * r["throughput"] / 1e9)
        peak = {"ov-bf16": ("bf16", 70.0)}.get(r["backend"], ("fp32", 50.0))  # each row: its own precision's peak
        assert r["peak_kind"] == peak[0] and r["pct_peak"] == pytest.approx(100 * r["gops"] / peak[1])
        assert r["size_mb"] > 0
        if r["backend"] == "torch":
            assert r["vs_torch"] == {"median": 1.0, "low": 1.0, "high": 1.0}
        lo, med, hi = r["vs_ort"]["low"], r["vs_ort"]["median"], r["vs_ort"]["high"]
        assert lo <= med <= hi
    assert tiny_run["peak"]["fp32"]["gops"] == 50.0 and tiny_run["peak"]["fp32"]["samples_gops"] == [20.0, 50.0]
    assert tiny_run["peak"]["int8"]["gops"] == 40.0 and tiny_run["peak_invalid"] == []
    assert tiny_run["peak"]["bf16"]["gops"] == 70.0 and tiny_run["peak_missing"] == {}
    json.dumps(tiny_run)  # the JSON report must serialise as is


def test_markdown_table_has_one_row_per_measurement(tiny_run):
    md = breport.render_markdown(tiny_run)
    lat, tput = md.split("Throughput mode (`infer_many`")
    for text, headers, mode in ((lat, breport.TABLE_HEADERS, "latency"), (tput, breport.THROUGHPUT_HEADERS, "throughput")):
        table = [ln for ln in text.splitlines() if ln.startswith("| ")]
        assert table[0] == "| " + " | ".join(headers) + " |"
        assert len(table) == 1 + sum(r["mode"] == mode for r in tiny_run["results"])
        assert all(ln.count("|") == len(headers) + 1 for ln in table)
    assert "| scarlet_a | ORT FP32 | 2 | 2 |" in tput and "| scarlet_a | PyTorch eager | 2 | 1 (= latency run) |" in tput
    assert tiny_run["environment"]["date"] in md and "Not measured:" in md
    assert "| scarlet_a | ORT FP32 | 2 |" in md
    assert "Machine peaks: FP32 50 GOP/s" in md and "INT8 40 GOP/s" in md
    assert f"CPU ISA: {tiny_run['environment']['machine']['isa']}" in md
    if tiny_run["settings"]["openvino"]:  # the OpenVINO settings a reader needs to reproduce its rows
        assert "OpenVINO (CPU): INFERENCE_NUM_THREADS 2, PERFORMANCE_HINT LATENCY, ENABLE_CPU_PINNING off" in md
        assert "PERFORMANCE_HINT THROUGHPUT and keeps optimal_number_of_infer_requests requests" in md


def test_a_backend_faster_than_its_peak_gets_no_share_and_a_note(tiny_run):
    data = {**tiny_run, "results": [{**r, "pct_peak": None} for r in tiny_run["results"]],
            "peak_invalid": ["scarlet_a ort"]}
    md = breport.render_markdown(data)
    assert "No % peak for scarlet_a ort: they ran faster than the measured peak" in md
    rows = [ln.rstrip(" |").split(" | ") for ln in md.splitlines() if ln.startswith("| scarlet_a")]
    assert rows and all(cells[(breport.TABLE_HEADERS if len(cells) == len(breport.TABLE_HEADERS)
                               else breport.THROUGHPUT_HEADERS).index("% peak")] == "-" for cells in rows)


def test_plot_writes_a_png(tiny_run, tmp_path):
    out = tmp_path / "bench.png"
    bplot.plot(tiny_run, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_adds_accuracy_panel_when_verify_results_exist(tiny_run, tmp_path):
    data = json.loads(json.dumps(tiny_run))
    data["models"]["scarlet_a"]["accuracy"] = {"torch": 0.75, "ort": 0.75}
    bplot.plot(data, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 0


def test_memory_probe_reports_peak_growth_per_batch(tiny_build):
    cfg = bplan.BenchConfig(models=["scarlet_a"], batches=[1, 4], threads=1, build_dir=tiny_build)
    art = bplan.Artifact("ort", tiny_build / "scarlet_a.onnx", 0.0)
    m = bmem.measure_memory("scarlet_a", "ort", art, cfg, size=16)
    assert set(m["peak_mb"]) == {"1", "4"}, m
    assert 0 <= m["peak_mb"]["1"] <= m["peak_mb"]["4"] < 500


@pytest.mark.parametrize("backend", ["ort", "ov"])
def test_memory_probe_finds_a_build_dir_given_relative_to_where_bench_runs(tiny_build, monkeypatch, backend):
    why_not = ov_unavailable(backend) if backend == "ov" else None
    if why_not:
        pytest.skip(why_not)
    monkeypatch.chdir(tiny_build.parent)  # `make bench` passes --build-dir build
    cfg = bplan.BenchConfig(models=["scarlet_a"], batches=[1, 4], threads=1, build_dir=tiny_build.name)
    art = bplan.Artifact(backend, cfg.build_dir / "scarlet_a.onnx", 0.0)
    m = bmem.measure_memory("scarlet_a", backend, art, cfg, size=16)
    assert set(m.get("peak_mb", {})) == {"1", "4"}, m


def test_tune_tries_the_grid_and_names_a_winner(tiny_build):
    cfg = bplan.BenchConfig(models=["scarlet_a"], threads=1, build_dir=tiny_build)
    t = btune.tune_ort(tiny_build / "scarlet_a.onnx", 1, cfg, repeats=1, seconds=0.001, warmup_s=0)
    assert len(t["grid"]) == len(btune.tune_grid(1))  # the default (1 thread, all, sequential, arena) is in it
    assert t["best"] == t["grid"][0]["options"] and t["winner"] in (t["best"], t["default"])
    assert OrtOptions(**t["winner"]) in btune.tune_grid(1)
    assert t["gain_over_default"] >= 1.0


def test_cli_bad_backend_exits_2(capsys):
    from scarlet_deploy.runtime.cli import main

    assert main(["bench", "--models", "scarlet_a", "--backends", "ort,nope"]) == 2
    assert "unknown backend" in capsys.readouterr().err


def test_summary_states_the_target_ratios(tiny_run):
    lines = breport.summary_lines(tiny_run)
    assert len(lines) == 1 and lines[0].startswith("- scarlet_a: ORT FP32 / PyTorch ")
    assert "at batch 2" in lines[0] and "batch-1 latency PyTorch / ORT FP32" in lines[0]


def test_tune_keeps_the_default_unless_a_setting_clearly_wins(tiny_build, monkeypatch):
    cfg = bplan.BenchConfig(models=["scarlet_a"], threads=1, build_dir=tiny_build)
    # every setting equally fast: the default must stay
    monkeypatch.setattr(btune, "measure_interleaved",
                        lambda calls, *a, **k: {name: [[0.01, 0.01]] for name in calls})
    t = btune.tune_ort(tiny_build / "scarlet_a.onnx", 1, cfg, repeats=1, seconds=0.001, warmup_s=0)
    assert t["winner"] == t["default"] == {"threads": 1, "opt_level": "all", "execution_mode": "sequential",
                                           "memory_arena": True, "threads_per_stream": None}
    assert t["gain_over_default"] == pytest.approx(1.0)


def test_tune_adopts_a_setting_that_clearly_wins(tiny_build, monkeypatch):
    cfg = bplan.BenchConfig(models=["scarlet_a"], threads=1, build_dir=tiny_build)
    monkeypatch.setattr(btune, "measure_interleaved",
                        lambda calls, *a, **k: {n: [[0.005 if n == "option3" else 0.01]] for n in calls})
    t = btune.tune_ort(tiny_build / "scarlet_a.onnx", 1, cfg, repeats=1, seconds=0.001, warmup_s=0)
    assert t["winner"] == t["best"] != t["default"] and t["gain_over_default"] == pytest.approx(2.0)


class _SmallProfileRunner(Runner):
    """A backend that only runs batch 1 (like a fixed-batch export or a narrow engine profile)."""

    kind = "fake"

    def infer(self, x):
        if len(x) > 1:
            raise ScarletError("batch 2 is outside the plan's profile [1, 1]")
        return np.zeros((len(x), 10), np.float32)


def test_a_backend_that_cannot_run_a_batch_is_skipped_with_the_reason(tiny_build, monkeypatch):
    from tqdm import tqdm

    cfg = bplan.BenchConfig(models=["scarlet_a"], backends=["ort"], batches=[1, 2], threads=1, build_dir=tiny_build,
                            repeats=1, seconds=0.001, warmup_s=0, memory=False)
    plan = bplan.plan_model("scarlet_a", cfg)
    monkeypatch.setattr(brun, "open_runner", lambda *a, **k: _SmallProfileRunner())
    with tqdm(disable=True) as bar:
        rows, entry = brun.bench_model(plan, None, cfg, bar)
    assert [(r["backend"], r["batch"], r["mode"]) for r in rows] == [("ort", 1, "latency"), ("ort", 1, "throughput")]
    assert entry["skipped"]["ort"].startswith("batch 2: batch 2 is outside")


def test_accuracy_comes_from_a_calib_report_of_the_same_onnx_only(tiny_build, tmp_path):
    from scarlet_deploy.runtime.core.artifacts import sha256_file

    int8 = tiny_build / "scarlet_a.int8.onnx"
    plan = bplan.ModelPlan("scarlet_a", tiny_build / "scarlet_a.onnx", 16, {"ort-int8": bplan.Artifact("ort-int8", int8, 0)}, {})
    report = {"source_onnx_sha256": sha256_file(plan.onnx), "fp32": {"top1": 76.0},
              "targets": [{"target": "ort", "output": str(int8), "int8": {"top1": 75.5}},
                          {"target": "trt", "output": "x.int8-trt.onnx", "int8": {"top1": 70.0}}]}
    (tmp_path / "calib-scarlet_a.json").write_text(json.dumps(report))
    assert brun.known_accuracy(plan, tmp_path) == {"ort": 76.0, "ort-int8": 75.5}
    report["source_onnx_sha256"] = "0" * 64  # made from another export: ignored
    (tmp_path / "calib-scarlet_a.json").write_text(json.dumps(report))
    assert brun.known_accuracy(plan, tmp_path) == {}


def test_failed_calibration_is_a_stated_skip(tiny_build, monkeypatch):
    def fail(model, target, cfg):
        raise ScarletError("no images to calibrate with")

    monkeypatch.setattr(bplan, "calibrate_int8", fail)
    cfg = bplan.BenchConfig(models=["scarlet_a"], backends=["ort", "ort-int8"], build_dir=tiny_build, calibrate=True)
    plan = bplan.plan_model("scarlet_a", cfg)
    assert list(plan.artifacts) == ["ort"]
    assert plan.skipped == {"ort-int8": "calibration failed: no images to calibrate with"}


def test_each_int8_backend_runs_the_model_calibrated_for_its_runtime(tiny_build, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    shutil.copy(tiny_build / "scarlet_a.onnx", tmp_path / "scarlet_a.onnx")
    shutil.copy(tiny_build / "scarlet_a.onnx", tmp_path / "scarlet_a.int8.onnx")  # stands in for make calib's
    asked = []
    monkeypatch.setattr(bplan, "calibrate_int8", lambda model, target, cfg: asked.append(target))
    cfg = bplan.BenchConfig(models=["scarlet_a"], backends=["ort-int8", "ov-int8"], build_dir=tmp_path, calibrate=True)
    plan = bplan.plan_model("scarlet_a", cfg)
    assert asked == ["ov"]  # build/scarlet_a.int8.onnx is there; the OpenVINO one is not
    assert plan.artifacts["ort-int8"].path.name == "scarlet_a.int8.onnx"
    assert "scarlet_a.int8-ov.onnx" in plan.skipped["ov-int8"] and '--targets ov' in plan.skipped["ov-int8"]


def test_readme_section_is_replaced_between_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{breadme.README_BEGIN}\nold table\n{breadme.README_END}\nafter\n")
    breadme.update_readme(readme, "## Performance\n| a |\n")
    assert readme.read_text() == f"# x\n{breadme.README_BEGIN}\n## Performance\n| a |\n{breadme.README_END}\nafter\n"
    readme.write_text("# no markers\n")
    with pytest.raises(ScarletError, match="no performance section"):
        breadme.update_readme(readme, "t")
    assert readme.read_text() == "# no markers\n"


def test_engine_names_must_say_model_and_precision(tmp_path):
    plan = tmp_path / "scarlet_a.fp16.plan"
    plan.write_bytes(b"x")
    cfg = bplan.BenchConfig(models=["scarlet_a"], engines=[plan])
    assert bplan._engine_for("scarlet_a", "fp16", cfg) == plan
    assert bplan._engine_for("scarlet_a", "int8", cfg) == cfg.build_dir / "scarlet_a.int8.plan"
    for bad in ("engine.plan", "scarlet_a.bf16.plan", "resnet.fp16.plan"):
        (tmp_path / bad).write_bytes(b"x")
        with pytest.raises(ScarletError, match="name it"):
            bplan.BenchConfig(models=["scarlet_a"], engines=[tmp_path / bad])
    with pytest.raises(ScarletError, match="does not exist"):
        bplan.BenchConfig(models=["scarlet_a"], engines=[tmp_path / "scarlet_a.int8.plan"])


@pytest.mark.slow
def test_macs_of_the_real_exports(lite0_onnx, scarlet_onnx):
    # SCARLET-A: the SCARLET-NAS paper's 365M MACs. Lite0: 385M as counted here (a regression check;
    # BN/LET folding and fusions must not change the Conv/Gemm work).
    assert count_macs(scarlet_onnx("scarlet_a")).macs / 1e6 == pytest.approx(365, abs=1)
    lite0 = count_macs(lite0_onnx)
    assert lite0.macs / 1e6 == pytest.approx(385, abs=2) and lite0.uncounted == []


def test_skips_with_one_reason_are_one_line():
    data = {"models": {
        "scarlet_a": {"skipped": {"ort-int8": "no INT8 a", "trt-fp32": "no TensorRT", "trt-fp16": "no TensorRT"}},
        "scarlet_b": {"skipped": {"trt-fp32": "no TensorRT", "trt-fp16": "no TensorRT"}},
    }}
    assert breport.skipped_lines(data) == ["- ORT INT8 (scarlet_a): no INT8 a.",
                                         "- TensorRT FP32, TensorRT FP16 (scarlet_a, scarlet_b): no TensorRT."]


def test_accuracy_from_verify_rows_matched_by_file(tiny_build, tmp_path):
    onnx_path = tiny_build / "scarlet_a.onnx"
    plan = bplan.ModelPlan("scarlet_a", onnx_path, 16, {"torch": bplan.Artifact("torch", None, 0),
                                                        "ort": bplan.Artifact("ort", onnx_path, 0)}, {})
    verify = {"reference": {"name": "pytorch", "top1": 0.88},
              "backends": [{"name": "onnxruntime", "path": f"/elsewhere/{onnx_path.name}", "top1": 0.875},
                           {"name": "tensorrt", "path": "build/scarlet_a.fp16.plan", "top1": 0.5}]}
    (tmp_path / "verify-scarlet_a.json").write_text(json.dumps(verify))
    assert brun.known_accuracy(plan, tmp_path) == pytest.approx({"torch": 88.0, "ort": 87.5})


def test_machine_load_counts_other_processes_and_steal_and_warns(tmp_path):
    hz = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"

    def sample(user_s: float, steal_s: float, own_s: float) -> host.CpuTimes:
        stat.write_text(f"cpu  {user_s * hz:.0f} 0 0 1000 0 0 0 {steal_s * hz:.0f} 0 0\ncpu0 1 2 3\n")
        t = host.CpuTimes.now(str(stat))
        return host.CpuTimes(t.busy, t.steal, own_s)

    start, end = sample(100, 1, 10), sample(120, 1.5, 28)  # 20 CPU-s busy, 18 of them ours, over 10 s x 2 CPUs
    load = host.machine_load(start, end, wall_s=10, cpus=2)
    assert load == pytest.approx({"other_processes_pct": 10.0, "steal_pct": 2.5})
    assert "10.0 %" in host.load_text(load) and "suspect" in host.load_text(load)
    quiet = host.machine_load(start, sample(118, 1, 28), wall_s=10, cpus=2)
    assert quiet["other_processes_pct"] == 0 and "suspect" not in host.load_text(quiet)
    assert host.CpuTimes.now(str(tmp_path / "missing")) is None and host.machine_load(None, end, 10, 2) is None
    assert "not measured" in host.load_text(None)
    assert host.CpuTimes.now() is not None, "this test runs on Linux"


def test_profile_groups_kernel_time_by_operator_type(tiny_build, tmp_path, capsys):
    from scarlet_deploy.runtime import cli, profile

    ops = profile.profile(tiny_build / "scarlet_a.onnx", batch=2, runs=3, options=OrtOptions(threads=1))
    assert sum(o.share_pct for o in ops) == pytest.approx(100.0)
    assert [o.share_pct for o in ops] == sorted((o.share_pct for o in ops), reverse=True)
    assert {o.op_type for o in ops} >= {"Gemm"} and all(o.nodes >= 1 and o.ms_per_run >= 0 for o in ops)
    out = tmp_path / "p.json"
    assert cli.main(["profile", "--onnx", str(tiny_build / "scarlet_a.onnx"), "--batch", "2", "--runs", "2",
                     "--nodes", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| operator | nodes | share % | ms per run |" in text and "The 2 slowest nodes" in text
    report = json.loads(out.read_text())
    assert report["ops"] and len(report["nodes"]) == 2
    assert report["nodes"][0]["ms_per_run"] >= report["nodes"][1]["ms_per_run"]
    # the node table is the operator table's detail: each node's op is there, shares never exceed its op's
    shares = {o["op_type"]: o["share_pct"] for o in report["ops"]}
    assert all(n["share_pct"] <= shares[n["op_type"]] + 1e-9 for n in report["nodes"])
    assert cli.main(["profile", "--onnx", str(tmp_path / "missing.onnx")]) == 2
    assert "scarlet export" in capsys.readouterr().err


def test_a_row_without_a_peak_of_its_precision_gets_no_share_and_the_reason(tiny_build, tmp_path, monkeypatch):
    mp_samples = {"fp32": 50.0, "int8": 40.0}
    from scarlet_deploy.runtime.peak import Peak

    monkeypatch.setattr(brun, "load_baseline", lambda name: SimpleNamespace(model=_TinyNet()))
    monkeypatch.setattr(brun, "peak_unavailable", lambda k: "no BF16 peak: no native bf16" if k == "bf16" else None)
    monkeypatch.setattr(brun, "measure_peak", lambda kind, seconds, threads: Peak(mp_samples[kind], kind, 8, threads, seconds, "fake"))
    backends = ["ort"] + (["ov-bf16"] if ov_unavailable("ov-bf16") is None else [])
    cfg = bplan.BenchConfig(models=["scarlet_a"], backends=backends, batches=[1], modes=["latency"], threads=1,
                            build_dir=tiny_build, repeats=1, seconds=0.01, warmup_s=0, memory=False, peak_seconds=0.01,
                            reports_dir=tmp_path)
    data = brun.run_bench(cfg)
    assert set(data["peak"]) == {"fp32", "int8"} and data["peak_missing"] == {"bf16": "no BF16 peak: no native bf16"}
    assert {r["mode"] for r in data["results"]} == {"latency"}
    md = breport.render_markdown(data)
    assert "No BF16 peak: no native bf16." in md  # the reason beside the peaks
    for r in data["results"]:
        if r["backend"] == "ov-bf16":  # a bf16 row is never a share of the FP32 peak
            assert r["peak_kind"] == "bf16" and r["pct_peak"] is None
            assert "No % peak for scarlet_a OpenVINO BF16: no BF16 peak: no native bf16." in md
        else:
            assert r["pct_peak"] is not None


def test_one_stream_runners_throughput_row_is_their_latency_run_and_the_best_path_is_named(tiny_run):
    rows = {(r["backend"], r["batch"], r["mode"]): r for r in tiny_run["results"]}
    eager_lat, eager_tput = rows[("torch", 2, "latency")], rows[("torch", 2, "throughput")]
    assert eager_tput["streams"] == 1 and eager_tput["throughput_rounds"] == eager_lat["throughput_rounds"]
    assert rows[("ort", 2, "throughput")]["streams"] == 2
    assert tiny_run["models"]["scarlet_a"]["throughput_streams"]["ort"] == {"1": 2, "2": 2}
    lines = breport.speed_lines(tiny_run)
    best = max((r for r in tiny_run["results"] if r["batch"] == 2 and r["backend"] != "torch"), key=lambda r: r["throughput"])
    assert len(lines) == 1 and f"best throughput at batch 2: " in lines[0] and f"{best['throughput']:.0f} img/s" in lines[0]
    assert "ORT FP32's" in lines[0] and "best batch-1 p50" in lines[0]
