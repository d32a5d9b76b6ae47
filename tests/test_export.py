"""Export: exact folding, parity with PyTorch on real images, fused ops, determinism, atomicity."""
import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from scarlet_deploy.export.fold import fold
from scarlet_deploy.export.fuse import fuse_hard_activations, op_histogram
from scarlet_deploy.export.onnx_export import ExportConfig, export_model, to_onnx
from scarlet_deploy.export.scarlet import LET
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.runners.ort import OrtRunner

VARIANTS = [(n, let) for n in ("scarlet_a", "scarlet_b", "scarlet_c") for let in (False, True) if not (n == "scarlet_a" and let)]


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow
@pytest.mark.parametrize("name,let", VARIANTS)
def test_onnx_matches_pytorch_on_real_images(exported, loaded_model, eval_batch, name, let):
    x = eval_batch(name)
    with torch.inference_mode():
        ref = loaded_model(name, let).model(torch.from_numpy(x)).numpy()
    out = OrtRunner(exported(name, let).output).infer(x)
    assert np.abs(ref).max() > 1, "logits too small: the parity test could not fail"
    assert _rel_err(out, ref) < 1e-4
    assert (out.argmax(1) == ref.argmax(1)).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scarlet_b", "scarlet_c"])
def test_let_export_has_the_release_operator_counts(exported, name):
    let, plain = exported(name, True).manifest, exported(name, False).manifest
    assert let["ops"] == plain["ops"]
    assert let["lets"] and all(f["folded"] for f in let["lets"])
    cases = {f["case"] for f in let["lets"]}
    assert cases == ({"residual-chain"} if name == "scarlet_b" else {"producer"})


@pytest.mark.slow
def test_manifest_records_provenance_and_parity(exported):
    m = exported("scarlet_b", True).manifest
    assert m["model"] == "scarlet_b" and m["let"] and m["checkpoint_sha256"].startswith("seeded:")
    assert {"torch", "onnx", "onnxsim", "onnxruntime"} <= set(m["versions"])
    assert m["fused"] == {"HardSwish": m["ops"]["HardSwish"], "HardSigmoid": m["ops"]["HardSigmoid"]}
    assert not any(op in m["ops"] for op in ("BatchNormalization", "Div"))
    assert m["parity"]["max_rel_error"] < 1e-4 and m["parity"]["top1_agreement"] == 1.0


def test_folding_is_exact_through_residual_chains(loaded_model, eval_batch):
    lm = loaded_model("scarlet_b", True)
    folded, fates = fold(lm.model)
    x = torch.from_numpy(eval_batch("scarlet_b", 8))
    with torch.inference_mode():
        assert _rel_err(folded(x).numpy(), lm.model(x).numpy()) < 2e-5
    assert not any(isinstance(m, (nn.BatchNorm2d, LET)) for m in folded.modules())
    assert [f.through for f in fates] == [["mb_module.7"], ["mb_module.15"]]


def test_ill_conditioned_let_is_kept_as_a_conv(loaded_model, eval_batch):
    model = copy.deepcopy(loaded_model("scarlet_c", True).model)
    with torch.no_grad():
        w = model.mb_module[3].conv.weight
        w[0] = w[1] * (1 + 1e-7)  # two almost equal rows: condition number ~1e7
    folded, fates = fold(model)
    assert [f.folded for f in fates] == [False, True, True]
    assert fates[0].condition_number > 1e4
    x = torch.from_numpy(eval_batch("scarlet_c", 8))
    with torch.inference_mode():
        assert _rel_err(folded(x).numpy(), model(x).numpy()) < 2e-5


@pytest.mark.parametrize("exporter,opset", [("dynamo", 18), ("torchscript", 17)])
def test_hard_activations_are_fused_and_equal(exporter, opset):
    from scarlet_deploy.export.layers import HSigmoid, HSwish

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.act, self.gate = HSwish(), HSigmoid()

        def forward(self, x):
            y = self.act(self.conv(x))
            return y * self.gate(y.mean((2, 3), keepdim=True))

    m = Tiny().eval()
    model = to_onnx(m, opset, 2, exporter)
    fused, counts = fuse_hard_activations(model)
    assert counts == {"HardSwish": 1, "HardSigmoid": 1}
    assert "Div" not in op_histogram(fused) and "Clip" not in op_histogram(fused)
    onnx.checker.check_model(fused, full_check=True)
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32) * 4
    out = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.inference_mode():
        np.testing.assert_allclose(out, m(torch.from_numpy(x)).numpy(), atol=1e-5)


# dynamo's two exports take ~20 s; tests/test_exporters.py checks its determinism on a small network in the fast set.
@pytest.mark.parametrize("exporter", [pytest.param("dynamo", marks=pytest.mark.slow), "torchscript"])
def test_export_is_deterministic(tmp_path, loaded_model, exporter):
    lm = loaded_model("efficientnet_lite0")
    a = export_model(ExportConfig("efficientnet_lite0", tmp_path / "a.onnx", exporter=exporter), lm).output.read_bytes()
    b = export_model(ExportConfig("efficientnet_lite0", tmp_path / "b.onnx", exporter=exporter), lm).output.read_bytes()
    assert a == b


def test_failed_export_leaves_nothing(tmp_path, loaded_model, monkeypatch):
    import scarlet_deploy.export.onnx_export as ex

    real = ex.measure_parity

    def broken(*a, **k):
        p = real(*a, **k)
        p.max_rel_error = 1.0
        return p

    monkeypatch.setattr(ex, "measure_parity", broken)
    with pytest.raises(ScarletError, match="nothing was written"):
        # torchscript: the gate is the same after either exporter, and this one takes 2 s, not 10
        export_model(ExportConfig("efficientnet_lite0", tmp_path / "x.onnx", exporter="torchscript"),
                     loaded_model("efficientnet_lite0"))
    assert list(tmp_path.iterdir()) == []


def test_model_dynamo_cannot_trace_is_an_error_naming_the_other_exporter(tmp_path, loaded_model, monkeypatch):
    def fails(*a, **k):
        raise RuntimeError("Dynamic control flow is not supported\nlong trace")

    monkeypatch.setattr(torch.onnx, "export", fails)
    with pytest.raises(ScarletError, match=r"dynamo exporter could not export .*RuntimeError: Dynamic control flow "
                                           r"is not supported\).*--exporter torchscript"):
        export_model(ExportConfig("efficientnet_lite0", tmp_path / "x.onnx"), loaded_model("efficientnet_lite0"))
    assert list(tmp_path.iterdir()) == []


def test_fixed_batch_and_io_names(tmp_path, loaded_model):
    r = export_model(ExportConfig("efficientnet_lite0", tmp_path / "b4.onnx", batch=4), loaded_model("efficientnet_lite0"))
    g = onnx.load(r.output).graph
    dims = [d.dim_value for d in g.input[0].type.tensor_type.shape.dim]
    assert (g.input[0].name, g.output[0].name, dims) == ("input", "logits", [4, 3, 224, 224])


@pytest.mark.parametrize("kw,needle", [({"opset": 11}, "opset"), ({"batch": "zero"}, "--batch"),
                                       ({"opset": 17}, "too old for the dynamo exporter"),
                                       ({"opset": 21, "exporter": "torchscript"}, "at most 20"),
                                       ({"opset": 24}, "at most 23"), ({"exporter": "jit"}, "--exporter")])
def test_bad_export_options(tmp_path, kw, needle):
    with pytest.raises(ScarletError, match=needle):
        export_model(ExportConfig("efficientnet_lite0", tmp_path / "x.onnx", **kw))


def test_dynamic_batch_runs_any_size(lite0_onnx, eval_batch):
    x = eval_batch("efficientnet_lite0", 8)
    r = OrtRunner(lite0_onnx)
    np.testing.assert_allclose(r.infer(x[:3]), r.infer(x)[:3], atol=1e-4)


@pytest.mark.slow
def test_lite0_ort_top1_equals_pytorch_on_every_shared_image(lite0_onnx, lite0_reference):
    x, ref, _ = lite0_reference
    assert (OrtRunner(lite0_onnx).infer(x).argmax(1) == ref.argmax(1)).all()
