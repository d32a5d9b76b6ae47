"""verify's gate end to end in a second: a small real PyTorch model and ONNX files derived from it, run by
`verify` on real images, so that what decides PASS/FAIL (agreement with PyTorch, non-finite logits, the
reference cache, resuming) is checked by the fast subset and not only by the Lite0 runs marked slow.

The model pools each image to a 4x4 grid of mean colours and maps those 48 numbers to 1000 classes: real
images give it different top-1 classes, and PyTorch and onnxruntime compute it alike.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from scarlet_deploy.export.checkpoint import LoadedModel
from scarlet_deploy.runtime.core.artifacts import manifest_path
from scarlet_deploy.runtime.runners.base import Runner
from scarlet_deploy.runtime.verify import config as vcfg
from scarlet_deploy.runtime.verify import run as vrun

MODEL = "efficientnet_lite0"  # a registry model: its 224x224 preprocessing and 1000 classes
IMAGES = 8
RNG = np.random.default_rng(0)
W = RNG.standard_normal((1000, 48)).astype(np.float32)
B = RNG.standard_normal(1000).astype(np.float32)


def _torch_model() -> torch.nn.Module:
    m = torch.nn.Sequential(torch.nn.AvgPool2d(56), torch.nn.Flatten(), torch.nn.Linear(48, 1000))
    with torch.no_grad():
        m[2].weight.copy_(torch.from_numpy(W))
        m[2].bias.copy_(torch.from_numpy(B))
    return m.eval()


def _onnx(path: Path, bias: np.ndarray = B, top: float | None = None, bottom: float | None = None,
          precision: str | None = None) -> Path:
    """The same model as ONNX; `top`/`bottom` replace each row's largest/smallest logit (an overflow to +-Inf),
    `precision` goes into a manifest beside it (an FP16/INT8 model is gated on agreement only)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("AveragePool", ["input"], ["p"], kernel_shape=[56, 56], strides=[56, 56]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "W", "b"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(bias.astype(np.float32), "b")]
    out = "y"
    for value, reduce in ((top, "ReduceMax"), (bottom, "ReduceMin")):
        if value is None:
            continue
        nodes += [helper.make_node(reduce, [out], [f"{reduce}.m"], axes=[1], keepdims=1),
                  helper.make_node("Equal", [out, f"{reduce}.m"], [f"{reduce}.at"]),
                  helper.make_node("Where", [f"{reduce}.at", f"{reduce}.v", out], [f"{reduce}.out"])]
        inits.append(numpy_helper.from_array(np.array(value, np.float32), f"{reduce}.v"))
        out = f"{reduce}.out"
    nodes.append(helper.make_node("Identity", [out], ["logits"]))
    graph = helper.make_graph(nodes, "grid", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    if precision:
        manifest_path(path).write_text(json.dumps({"model": MODEL, "precision": precision}))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory, val_dir) -> Path:
    root = tmp_path_factory.mktemp("val8")
    for d in sorted(d for d in val_dir.iterdir() if d.is_dir())[::60][:IMAGES]:
        f = sorted(d.iterdir())[0]
        (root / d.name).mkdir()
        os.symlink(f, root / d.name / f.name)
    return root


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return LoadedModel(_torch_model(), MODEL, False, True, "0" * 64, "test")


def _verify(loaded, folder, onnx, **kw) -> vrun.VerifyReport:
    cfg = vcfg.VerifyConfig(MODEL, onnx=list(onnx), val_dir=folder, workers=0, progress=False, threads=1,
                            pipeline_parity=False, **kw)
    return vrun.verify(cfg, loaded)


@pytest.fixture(scope="module")
def reference_top1(loaded, folder, tmp_path_factory) -> np.ndarray:
    from scarlet_deploy.export.registry import get_spec
    from scarlet_deploy.runtime.data.dataset import open_dataset
    from scarlet_deploy.runtime.data.preprocess import load_batch

    x = load_batch([it.path for it in open_dataset(folder).items], get_spec(MODEL).preprocess)
    with torch.inference_mode():
        top1 = loaded.model(torch.from_numpy(x)).numpy().argmax(1)
    assert len(set(top1.tolist())) >= 3, "the images must give the model different classes"
    return top1


def test_a_backend_that_picks_other_classes_fails_on_agreement_with_pytorch(tmp_path, loaded, folder, reference_top1):
    wrong = next(k for k in range(1000) if k not in reference_top1)
    bias = B.copy()
    bias[wrong] += 1000.0  # every image now says `wrong`, which PyTorch says for none
    good = _onnx(tmp_path / "good.onnx", precision="int8")
    bad = _onnx(tmp_path / "bad.onnx", bias, precision="int8")
    r = _verify(loaded, folder, [good, bad])
    ok, broken = r.backends
    assert ok["passed"] and ok["top1_agreement"] == 1.0 and not ok["disagreements"]
    assert not broken["passed"] and not r.passed
    assert broken["top1_agreement"] == 0.0 and broken["top5_overlap"] <= 0.8
    assert [d["backend"] for d in broken["disagreements"]] == [wrong] * IMAGES
    assert [d["pytorch"] for d in broken["disagreements"]] == reference_top1.tolist()


def test_an_fp32_backend_with_the_right_classes_fails_on_a_small_logit_error(tmp_path, loaded, folder):
    shifted = _onnx(tmp_path / "shifted.onnx", B + 0.05)  # every logit 0.05 up: no class changes
    r = _verify(loaded, folder, [_onnx(tmp_path / "same.onnx"), shifted])
    same, off = r.backends
    assert same["precision"] == off["precision"] == "fp32"
    assert same["passed"] and same["max_abs_error"] < 1e-5
    assert off["top1_agreement"] == 1.0 and off["max_abs_error"] == pytest.approx(0.05, rel=1e-3)
    assert off["max_rel_error"] > 1e-3 and not off["passed"] and "rel err" in off["rule"]


@pytest.mark.parametrize("precision", ["fp16", "int8"])
@pytest.mark.parametrize("where", ["top", "bottom"])
def test_an_infinite_logit_fails_the_gate_even_where_the_class_is_right(tmp_path, loaded, folder, precision, where):
    # +Inf on each image's top logit, or -Inf on its lowest (FP16 overflow is how a deployed model gets there):
    # ranked as numbers, every class would still be PyTorch's and an agreement-only gate would pass.
    inf = _onnx(tmp_path / "inf.onnx", precision=precision, **{where: np.inf if where == "top" else -np.inf})
    r = _verify(loaded, folder, [inf])
    (row,) = r.backends
    assert row["nonfinite_images"] == IMAGES
    assert not row["passed"] and not r.passed and f"NaN/Inf logits on {IMAGES} images" in row["rule"]


def test_a_cached_reference_is_reused_only_by_the_same_torch(tmp_path, loaded, folder, monkeypatch):
    good = _onnx(tmp_path / "good.onnx")
    first = _verify(loaded, folder, [good], cache_dir=tmp_path / "cache")
    assert first.reference["source"] == "computed on cpu" and first.reference["cache"]
    assert _verify(loaded, folder, [good], cache_dir=tmp_path / "cache").reference["source"] == "cache"
    monkeypatch.setattr(torch, "__version__", "99.0.0")  # the same weights and images under another torch
    other = _verify(loaded, folder, [good], cache_dir=tmp_path / "cache")
    assert other.reference["source"] == "computed on cpu"
    assert len([p for p in (tmp_path / "cache" / "reference").iterdir() if not p.name.startswith(".")]) == 2


class _Interrupt(Runner):
    """A runner wrapper that raises KeyboardInterrupt (Ctrl-C) on its `at`-th batch; one stream, so bulk
    work reaches `infer` batch by batch as well."""

    def __init__(self, runner, at: int):
        self.runner, self.at, self.calls = runner, at, 0
        self.name, self.kind = runner.name, runner.kind

    def load(self):
        self.runner.load()
        return self

    def close(self):
        self.runner.close()

    def infer(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.runner.infer(x)


def test_a_run_interrupted_twice_and_resumed_twice_reports_every_image_once(tmp_path, loaded, folder, monkeypatch):
    good = _onnx(tmp_path / "good.onnx", precision="int8")
    kw = dict(cache_dir=tmp_path / "cache", batch=1, chunk_images=1, reference_cache=False)
    whole = _verify(loaded, folder, [good], **kw)
    real_open = vrun.open_runner
    for at in (3, 3):  # 2 chunks, then 2 more after the first resume
        monkeypatch.setattr(vrun, "open_runner", lambda *a, **k: _Interrupt(real_open(*a, **k), at))
        with pytest.raises(KeyboardInterrupt):
            _verify(loaded, folder, [good], resume=True, **kw)
    monkeypatch.setattr(vrun, "open_runner", real_open)
    (journal,) = (tmp_path / "cache" / "verify-resume").iterdir()
    chunks = sorted(journal.glob("chunk-*.npz"))
    positions = [int(p) for c in chunks for p in np.load(c)["pos"]]
    assert len(chunks) == 4 and sorted(positions) == [0, 1, 2, 3], "no chunk overwritten by the second session"
    done = _verify(loaded, folder, [good], resume=True, **kw)
    assert done.run["resumed_images"] == 4
    for key in ("top1_agreement", "top1", "top5", "max_abs_error", "worst_cosine", "images"):
        assert done.backends[0][key] == whole.backends[0][key]


def test_rows_with_plus_or_minus_inf_or_nan_are_counted_non_finite():
    from scarlet_deploy.runtime.verify.compare import backend_rows, compare, reference_rows

    ref = np.random.default_rng(2).standard_normal((4, 10)).astype(np.float32)
    out = ref.copy()
    out[0, ref[0].argmax()] = np.inf
    out[1, ref[1].argmin()] = -np.inf
    out[2, 3] = np.nan
    cols = {**reference_rows(ref), **backend_rows("b", ref, out)}
    assert cols["b.finite"].tolist() == [False, False, False, True]
    r = compare(cols, "b", np.full(4, -1), [f"{i}.JPEG" for i in range(4)], 0.0, classes=10)
    assert r["nonfinite_images"] == 3 and np.isfinite(r["max_abs_error"])
