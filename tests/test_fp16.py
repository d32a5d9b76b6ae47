"""FP16 ONNX: valid, float32 I/O, reductions in float32, and close to FP32 on real images (onnxruntime CPU)."""
from __future__ import annotations

import onnx
import pytest

from scarlet_deploy.export.fp16 import (
    FLOAT,
    FLOAT16,
    Fp16Config,
    check_fp16_model,
    convert_to_fp16,
    fp16_path,
    logit_agreement,
    ort_parity,
    type_summary,
)
from scarlet_deploy.export.registry import get_spec
from scarlet_deploy.runtime.core.artifacts import read_manifest
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.data.images import fixed_images
from scarlet_deploy.runtime.data.preprocess import load_batch

PARITY_IMAGES = 16


@pytest.fixture(scope="module")
def lite0_fp16(lite0_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "lite0.fp16.onnx"
    return lite0_onnx, convert_to_fp16(Fp16Config(lite0_onnx, output=out, parity_images=0))


def _elem_types(model) -> dict[str, int]:
    g = onnx.shape_inference.infer_shapes(model).graph
    return {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}


def test_fp16_path():
    assert fp16_path("build/m.onnx").as_posix() == "build/m.fp16.onnx"


def test_fp16_onnx_is_valid_keeps_io_and_reductions_float32(lite0_fp16):
    _, report = lite0_fp16
    model = onnx.load(str(report.output))
    summary = check_fp16_model(model)  # checker + strict shape inference; raises on failure
    assert summary["float16"] > 100 and summary["io_float32"] == 1 and summary["qdq_nodes"] == 0
    assert [i.type.tensor_type.elem_type for i in (*model.graph.input, *model.graph.output)] == [FLOAT, FLOAT]
    types = _elem_types(model)
    reductions = [n for n in model.graph.node if n.op_type in ("ReduceMean", "GlobalAveragePool")]
    assert reductions, "Lite0 pools with a reduction"
    for n in reductions:
        assert types[n.input[0]] == FLOAT and types[n.output[0]] == FLOAT, n.name
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert all(types[n.output[0]] == FLOAT16 for n in convs)
    assert report.kept_fp32 == {"ReduceMean": 1} or report.kept_fp32.get("GlobalAveragePool") == 1


def test_fp16_manifest_and_reuse(lite0_fp16):
    src, report = lite0_fp16
    m = read_manifest(report.output, required=True)
    assert m["kind"] == "onnx-fp16" and m["model"] == "efficientnet_lite0" and m["keep_io_types"] is True
    assert m["source_manifest"]["model"] == "efficientnet_lite0"
    again = convert_to_fp16(Fp16Config(src, output=report.output, parity_images=0))
    assert again.reused and again.types == report.types


def test_fp16_refuses_non_float32_source(lite0_fp16, tmp_path):
    _, report = lite0_fp16
    with pytest.raises(ScarletError, match="not a float32 model"):
        convert_to_fp16(Fp16Config(report.output, output=tmp_path / "x.onnx", parity_images=0))
    with pytest.raises(ScarletError, match="does not exist"):
        convert_to_fp16(Fp16Config(tmp_path / "missing.onnx"))


def test_check_fp16_model_rejects_an_fp32_graph(lite0_onnx):
    with pytest.raises(ScarletError, match="no float16"):
        check_fp16_model(onnx.load(str(lite0_onnx)))
    assert type_summary(onnx.load(str(lite0_onnx)))["float16"] == 0


def test_logit_agreement_metric():
    import numpy as np

    a = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]])
    b = np.array([[1.0, 2.1, 0.0], [0.0, 3.3, 1.0]])
    r = logit_agreement(a, b)
    assert r["top1_agreement"] == 0.5 and r["rel_err_median"] == pytest.approx((0.05 + 1.1) / 2)


def test_lite0_fp16_matches_fp32_on_real_images(lite0_fp16):
    paths = fixed_images(PARITY_IMAGES)
    if not paths:
        pytest.skip("no real images: the shared ImageNet sample is absent (set SCARLET_VAL_DIR)")
    src, report = lite0_fp16
    x = load_batch(paths, get_spec("efficientnet_lite0").preprocess)
    r = ort_parity(src, report.output, x, threads=2)
    # FP16 rounds weights and activations (~1e-3 relative); 1 flip in 16 would be a near-tie.
    assert r["top1_agreement"] >= 15 / 16, r
    assert r["rel_err_max"] < 3e-2, r


@pytest.mark.slow
def test_scarlet_a_fp16_matches_fp32_on_real_images(scarlet_onnx, tmp_path):
    paths = fixed_images(PARITY_IMAGES)
    if not paths:
        pytest.skip("no real images: the shared ImageNet sample is absent (set SCARLET_VAL_DIR)")
    src = scarlet_onnx("scarlet_a", False)
    report = convert_to_fp16(Fp16Config(src, output=tmp_path / "a.fp16.onnx", parity_images=0))
    check_fp16_model(onnx.load(str(report.output)))
    r = ort_parity(src, report.output, load_batch(paths, get_spec("scarlet_a").preprocess), threads=2)
    assert r["top1_agreement"] >= 15 / 16, r
    assert r["rel_err_max"] < 3e-2, r
