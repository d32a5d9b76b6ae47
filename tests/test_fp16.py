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


def test_fp16_clamps_at_fp16_limits_and_counts_what_it_clamped(tmp_path):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    # 1e5 and -7e4 lie beyond FP16's largest finite value, 1e-9 below its smallest positive one,
    # 3e-6 is a subnormal FP16 holds with fewer bits, 2e4 and 5e-6 onnxconverter-common's own
    # defaults (1e4, 1e-7) would have clamped although FP16 holds them.
    c = np.array([1e5, -7e4, 1e-9, 3e-6, 0.0, 1.0, 2e4, 5e-5], np.float32)
    g = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                          [numpy_helper.from_array(c, "c")])
    src = tmp_path / "c.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), src)
    r = convert_to_fp16(Fp16Config(src, parity_images=0))
    got = numpy_helper.to_array(next(t for t in onnx.load(str(r.output)).graph.initializer if t.name == "c"))
    assert got.dtype == np.float16
    assert got[0] == 65504 and got[1] == -65504 and np.isfinite(got).all()
    assert got[2] == np.float16(2.0 ** -24) and got[4] == 0  # raised to the smallest positive, zero stays zero
    assert got[6] == 2e4 and abs(float(got[7]) - 5e-5) < 1e-7
    assert r.clamped == {"max_finite": 65504.0, "min_positive": 2.0 ** -24, "clamped_to_max": 2,
                         "raised_to_min_positive": 1, "subnormal": 2}
    assert read_manifest(r.output)["clamped"] == r.clamped


@pytest.fixture(scope="module")
def lite0_qdq16(lite0_trt_qdq, tmp_path_factory):
    from scarlet_deploy.export.fp16 import convert_qdq_to_fp16

    return convert_qdq_to_fp16(Fp16Config(lite0_trt_qdq, output=tmp_path_factory.mktemp("qdq16") / "m.int8-trt.fp16.onnx",
                                          parity_images=0))


def test_qdq_fp16_keeps_qdq_valid_and_the_int8_provenance(lite0_trt_qdq, lite0_qdq16):
    import numpy as np
    from onnx import numpy_helper

    from scarlet_deploy.export.fp16 import check_qdq_scales

    model = onnx.load(str(lite0_qdq16.output))
    t = check_fp16_model(model)
    src = type_summary(onnx.load(str(lite0_trt_qdq)))
    assert t["qdq_nodes"] == src["qdq_nodes"] > 0 and t["float16"] > 100 and t["io_float32"] == 1
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19  # FP16 Q/DQ scales
    assert check_qdq_scales(model) > 0
    inits = {i.name: i for i in model.graph.initializer}
    scales = [numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert all(s.dtype == np.float16 and (s > 0).all() for s in scales)
    types = _elem_types(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert all(types[n.output[0]] == FLOAT16 for n in convs), "what TensorRT runs after each INT8 conv is FP16"
    # Lite0 has near-dead channels whose INT8 weight scale FP16 cannot hold: raised, counted, still valid
    assert lite0_qdq16.clamped["raised_to_min_positive"] > 0
    m, qm = read_manifest(lite0_qdq16.output, required=True), read_manifest(lite0_trt_qdq, required=True)
    assert m["kind"] == "onnx-qdq-fp16" and m["high_precision"] == "fp16" and m["target"] == "trt"
    assert m["source_onnx_sha256"] == qm["source_onnx_sha256"]  # still checkable against the FP32 ONNX


def test_qdq_fp16_refuses_a_float_model(lite0_onnx, tmp_path):
    from scarlet_deploy.export.fp16 import convert_qdq_to_fp16

    with pytest.raises(ScarletError, match="not a float32 Q/DQ model"):
        convert_qdq_to_fp16(Fp16Config(lite0_onnx, output=tmp_path / "x.onnx", parity_images=0))


@pytest.mark.slow
def test_lite0_qdq_fp16_matches_the_fp32_high_precision_qdq_on_real_images(lite0_trt_qdq, lite0_qdq16):
    paths = fixed_images(32)
    if not paths:
        pytest.skip("no real images: the shared ImageNet sample is absent (set SCARLET_VAL_DIR)")
    x = load_batch(paths, get_spec("efficientnet_lite0").preprocess)
    # Fake-quant (what TensorRT's explicit quantization emulates). An INT8 model amplifies any
    # 1e-3 change in front of a quantizer into whole INT8 steps: rounding only the Q/DQ scales to
    # FP16 (arithmetic kept FP32) already moved Lite0's logits 2.3 % median, 7.5 % max on 64
    # images (a one-off check). `scarlet fp16 --onnx M.int8-trt.onnx --images 200` measured 98.5 %
    # top-1 agreement, 2.8 % median and 8.5 % max relative logit error, the same top-1 (89 %).
    r = ort_parity(lite0_trt_qdq, lite0_qdq16.output, x, threads=2, fake_quant=True)  # raises on NaN/Inf
    assert r["top1_agreement"] >= 29 / 32, r
    assert r["rel_err_median"] < 5e-2 and r["rel_err_max"] < 0.15, r


def test_check_qdq_scales_refuses_a_zero_or_infinite_scale():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from scarlet_deploy.export.fp16 import check_qdq_scales

    def model(scale: float):
        inits = [numpy_helper.from_array(np.array(scale, np.float16), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4])], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])

    assert check_qdq_scales(model(0.02)) == 1
    for bad in (0.0, float("inf")):
        with pytest.raises(ScarletError, match="not positive and finite"):
            check_qdq_scales(model(bad))
