"""verify: PyTorch vs ONNX parity on real images, and a release gate that fails when it must."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from scarlet_deploy.runtime.cli import main
from scarlet_deploy.runtime.core.artifacts import manifest_path, sha256_file
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.verify import compare as vcmp
from scarlet_deploy.runtime.verify import config as vcfg
from scarlet_deploy.runtime.verify import discover as vdisc
from scarlet_deploy.runtime.verify import report as vrep
from scarlet_deploy.runtime.verify import run as vrun

LITE0 = "efficientnet_lite0"


def _perturbed(src: Path, dst: Path, initializer: str, index: tuple, delta: float) -> Path:
    """`src` with one weight changed and its manifest kept (with the new file's sha256, which manifests are
    checked against): exactly what a broken export looks like."""
    m = onnx.load(str(src))
    init = next(i for i in m.graph.initializer if i.name == initializer)
    w = numpy_helper.to_array(init).copy()
    w[index] += delta
    init.CopyFrom(numpy_helper.from_array(w, initializer))
    onnx.save(m, str(dst))
    manifest = json.loads(manifest_path(src).read_text())
    manifest_path(dst).write_text(json.dumps({**manifest, "onnx_sha256": sha256_file(dst)}))
    return dst


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory, val_dir) -> Path:
    """12 real images spread over the sample (prepared layout) plus one corrupt file."""
    root = tmp_path_factory.mktemp("val")
    folders = sorted(d for d in val_dir.iterdir() if d.is_dir())
    for d in folders[:: len(folders) // 12][:12]:
        f = next(iter(sorted(d.iterdir())))
        (root / d.name).mkdir()
        os.symlink(f, root / d.name / f.name)
    (root / folders[0].name / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


@pytest.mark.slow
def test_fp32_onnx_matches_pytorch_and_a_changed_weight_fails(tmp_path, small_folder, lite0_onnx, loaded_model):
    bad = _perturbed(lite0_onnx, tmp_path / "lite0.bias.onnx", "_fc.bias", (417,), 1000.0)  # class 417 always wins
    cfg = vcfg.VerifyConfig(LITE0, onnx=[lite0_onnx, bad], val_dir=small_folder, workers=0, progress=False)
    r = vrun.verify(cfg, loaded_model(LITE0))
    good, broken = r.backends
    assert good["passed"] and good["precision"] == "fp32"
    assert good["top1_agreement"] == 1.0 and good["top5_overlap"] == 1.0 and not good["disagreements"]
    assert good["max_rel_error"] < 1e-4 and good["worst_cosine"] > 0.99999
    assert (good["top1"], good["top5"]) == (r.reference["top1"], r.reference["top5"]) and r.reference["images"] == 12
    assert r.reference["top1"] >= 0.75  # real trained weights on real images

    assert not broken["passed"] and not r.passed
    assert broken["top1_agreement"] < 0.1 and len(broken["disagreements"]) >= 11
    d = broken["disagreements"][0]
    assert d["backend"] == 417 and d["backend_name"] and d["pytorch_name"] and 0 < d["pytorch_prob"] <= 1

    assert [Path(s["path"]).name for s in r.skipped] == ["corrupt.JPEG"]
    assert r.pipeline and r.pipeline["name"] == lite0_onnx.name and r.pipeline["gated"] is False
    assert r.pipeline["top1_agreement"] >= 0.8  # OpenCV vs PIL resizing moves logits, rarely the class
    md = vrep.render_markdown(r)
    assert "FAIL" in md and "corrupt.JPEG" in md and "Pipeline parity" in md


@pytest.mark.slow
def test_cli_exits_nonzero_on_a_small_logit_error(tmp_path, val_dir, lite0_onnx):
    # One stem weight nudged: classes may survive, the logit-error gate must not.
    bad = _perturbed(lite0_onnx, tmp_path / "lite0.stem.onnx", "_conv_stem.weight", (0, 0, 1, 1), 0.5)
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = main(["verify", "--model", LITE0, "--onnx", str(bad), "--val-dir", str(val_dir), "--limit", "16",
               "--workers", "1", "--no-pipeline-parity", "--cache-dir", str(tmp_path), "--quiet", "--json", str(js),
               "--markdown", str(md)])
    assert rc == 1
    data = json.loads(js.read_text())
    b = data["backends"][0]
    assert data["passed"] is False and b["max_rel_error"] > 1e-3 and b["images"] == 16
    assert data["pipeline"] is None and data["environment"]["versions"]["onnxruntime"]
    assert data["dataset"]["classes_present"] == 16 and b["manifest"]["model"] == LITE0
    assert "**FAIL**" in md.read_text()


@pytest.mark.slow
def test_seeded_scarlet_passes(val_dir, scarlet_onnx, loaded_model):
    cfg = vcfg.VerifyConfig("scarlet_a", onnx=[scarlet_onnx("scarlet_a")], val_dir=val_dir, limit=16, workers=0,
                         pipeline_parity=False, progress=False)
    r = vrun.verify(cfg, loaded_model("scarlet_a"))
    b = r.backends[0]
    assert r.passed and r.model["pretrained"] is False and r.pipeline is None
    assert b["top1_agreement"] == 1.0 and b["max_rel_error"] < 1e-3 and b["images"] == 16


@pytest.mark.slow
def test_cli_on_sample_photos_passes_without_labels(tmp_path, monkeypatch, lite0_onnx, capsys):
    # No --val-dir and no shared sample: the photos installed packages ship, without labels.
    monkeypatch.setattr("scarlet_deploy.runtime.data.dataset.default_val_dir", lambda: None)
    js = tmp_path / "r.json"
    rc = main(["verify", "--model", LITE0, "--onnx", str(lite0_onnx), "--workers", "0", "--cache-dir", str(tmp_path),
               "--quiet", "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads(js.read_text())
    b = data["backends"][0]
    assert data["passed"] and data["dataset"]["layout"] == "photos" and data["dataset"]["classes_present"] is None
    assert b["top1_agreement"] == 1.0 and b["top1"] is None and data["reference"]["top1"] is None
    assert "photos at" in out and "n/a" in out


def test_backend_from_other_weights_or_model_is_refused(tmp_path):
    def art(name: str, manifest: dict) -> vdisc.Backend:
        (tmp_path / name).write_bytes(b"")
        manifest_path(tmp_path / name).write_text(json.dumps(manifest))
        return vdisc.describe_backend(tmp_path / name)

    fp32 = art("lite0.onnx", {"model": LITE0, "let": False, "checkpoint_sha256": "a" * 64, "precision": "fp32"})
    vdisc.check_weights(fp32, LITE0, False, "a" * 64)
    with pytest.raises(ScarletError, match="other weights"):
        vdisc.check_weights(fp32, LITE0, False, "b" * 64)
    with pytest.raises(ScarletError, match="not scarlet_a"):
        vdisc.check_weights(fp32, "scarlet_a", False, "a" * 64)
    # An INT8 model is judged by the export it was quantised from.
    int8 = art("lite0.int8.onnx", {"model": LITE0, "precision": "int8", "source_onnx": str(tmp_path / "lite0.onnx")})
    assert int8.precision == "int8"
    with pytest.raises(ScarletError, match="other weights"):
        vdisc.check_weights(int8, LITE0, False, "b" * 64)
    let = art("a-let.onnx", {"model": "scarlet_a", "let": True, "checkpoint_sha256": "s", "precision": "fp32"})
    with pytest.raises(ScarletError, match="--let"):
        vdisc.check_weights(let, "scarlet_a", False, "s")
    # Seeded weights differ with the images their BN statistics came from: another machine's export is refused.
    seeded = art("a.onnx", {"model": "scarlet_a", "let": False, "checkpoint_sha256": "seeded:" + "c" * 64,
                            "precision": "fp32"})
    vdisc.check_weights(seeded, "scarlet_a", False, "seeded:" + "c" * 64)
    with pytest.raises(ScarletError, match="other seeded weights"):
        vdisc.check_weights(seeded, "scarlet_a", False, "seeded:" + "d" * 64)


def test_seeded_weights_carry_a_fingerprint_of_their_tensors(loaded_model, scarlet_onnx):
    from scarlet_deploy.export.checkpoint import tensors_sha256
    from scarlet_deploy.runtime.core.artifacts import read_manifest

    loaded = loaded_model("scarlet_a")
    assert loaded.checkpoint_sha256 == "seeded:" + tensors_sha256(loaded.model.state_dict())
    assert read_manifest(scarlet_onnx("scarlet_a"))["checkpoint_sha256"] == loaded.checkpoint_sha256


def _tiny(path: Path, ops: list, inits: list) -> Path:
    g = helper.make_graph(ops, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])], inits)
    onnx.save(helper.make_model(g), str(path))
    return path


def test_precision_from_manifest_or_graph(tmp_path):
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    z = numpy_helper.from_array(np.array(0, np.int8), "z")
    qdq = _tiny(tmp_path / "q.onnx", [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                                      helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], [s, z])
    assert vdisc.detect_precision(qdq, None) == "int8"
    h = numpy_helper.from_array(np.ones(1, np.float16), "h")
    fp16 = _tiny(tmp_path / "h.onnx", [helper.make_node("Cast", ["h"], ["hc"], to=1),
                                       helper.make_node("Add", ["x", "hc"], ["y"])], [h])
    assert vdisc.detect_precision(fp16, None) == "fp16"
    plain = _tiny(tmp_path / "p.onnx", [helper.make_node("Identity", ["x"], ["y"])], [])
    assert vdisc.detect_precision(plain, None) == "fp32"
    assert vdisc.detect_precision(plain, {"precision": "int8"}) == "int8"
    assert vdisc.detect_precision(plain, {"kind": "onnx-fp16"}) == "fp16"


def test_thresholds_per_precision():
    t = vcmp.Thresholds()
    assert t.check("fp32", 1.0, 5e-4)[0] and not t.check("fp32", 1.0, 2e-3)[0] and not t.check("fp32", 0.998, 0)[0]
    assert t.check("int8", 0.96, 0.5)[0] and not t.check("int8", 0.94, 0)[0]
    assert t.check("fp16", 0.995, 0.5)[0] and not t.check("fp16", 0.98, 0)[0]


def test_auto_onnx_finds_this_models_artifacts_only(tmp_path):
    def art(name: str, manifest: dict | None) -> None:
        (tmp_path / name).write_bytes(b"")
        if manifest is not None:
            manifest_path(tmp_path / name).write_text(json.dumps(manifest))

    fp32 = {"model": "scarlet_a", "let": False, "checkpoint_sha256": "x", "precision": "fp32"}
    art("scarlet_a.onnx", fp32)
    art("scarlet_a-let.onnx", {**fp32, "let": True})
    art("scarlet_a.int8.onnx", {"model": "scarlet_a", "precision": "int8", "source_onnx": str(tmp_path / "scarlet_a.onnx")})
    art("scarlet_a.fp16.onnx", {"kind": "onnx-fp16", "model": "scarlet_a", "source_manifest": fp32})
    art("scarlet_a.int8-trt.onnx", {"model": "scarlet_a", "precision": "int8", "target": "trt"})
    art("scarlet_a.scratch.onnx", None)  # no manifest: not ours to judge
    art("scarlet_b.onnx", {**fp32, "model": "scarlet_b"})
    found, for_tensorrt = vdisc.discover_onnx(tmp_path, "scarlet_a", False)
    assert [p.name for p in found] == ["scarlet_a.fp16.onnx", "scarlet_a.int8.onnx", "scarlet_a.onnx"]
    assert [p.name for p in for_tensorrt] == ["scarlet_a.int8-trt.onnx"]
    assert [p.name for p in vdisc.discover_onnx(tmp_path, "scarlet_a", True)[0]] == ["scarlet_a-let.onnx"]


def test_nothing_to_verify_is_a_clear_error():
    with pytest.raises(ScarletError, match="nothing to verify"):
        vdisc.resolve_backends(vcfg.VerifyConfig(LITE0), loaded=None)


def test_engine_that_cannot_run_here_is_a_clear_error(tmp_path, loaded_model):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"not a plan")
    # No GPU/TensorRT: the runner says what to install; with them: the plan has no manifest. Either is clear.
    with pytest.raises(ScarletError):
        vrun.verify(vcfg.VerifyConfig(LITE0, engines=[plan], limit=1, workers=0, progress=False), loaded_model(LITE0))


def test_int8_calibrated_on_the_same_folder_is_flagged(tmp_path):
    b = vdisc.Backend("m.int8.onnx", "ort", tmp_path / "m.int8.onnx", "int8",
                  {"precision": "int8", "calibration_images": {"count": 128, "dir": str(tmp_path / "val")}})
    (tmp_path / "val").mkdir()
    assert "overlaps its calibration set" in vdisc.calibration_overlap([b], tmp_path / "val")[0]
    assert vdisc.calibration_overlap([b], tmp_path) == []
