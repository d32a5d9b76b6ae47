"""`scarlet deploy` end to end on trained Lite0 (small image sets, short timing), and `scarlet check` on its package."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.deploy import check as check_mod
from scarlet_deploy.runtime.deploy import golden
from scarlet_deploy.runtime.deploy.gates import Gates
from scarlet_deploy.runtime.deploy.run import DeployConfig, deploy
from scarlet_deploy.runtime.runners.openvino import openvino_missing

BACKENDS = ["ort"] if openvino_missing() else ["ort", "ov"]


def small(tmp: Path, work: Path, val_dir: Path, **kw) -> DeployConfig:
    args = dict(model="efficientnet_lite0", output=tmp / "pkg", images=val_dir, backends=BACKENDS, work_dir=work,
                report=tmp / "report", golden=8, num_calib=8, num_select=8, min_verify=32, max_verify=40,
                repeats=2, seconds=0.05, threads=2)
    return DeployConfig(**(args | kw))


@pytest.fixture(scope="module")
def work(tmp_path_factory, lite0_onnx) -> Path:
    """A work dir holding the session's Lite0 export, which deploy reuses (same weights, dynamic batch)."""
    from scarlet_deploy.runtime.core.artifacts import manifest_path

    w = tmp_path_factory.mktemp("deploy-work")
    (w / "efficientnet_lite0").mkdir()
    shutil.copy(lite0_onnx, w / "efficientnet_lite0" / "efficientnet_lite0.onnx")
    shutil.copy(manifest_path(lite0_onnx), w / "efficientnet_lite0" / "efficientnet_lite0.onnx.json")
    return w


@pytest.fixture(scope="module")
def package(tmp_path_factory, work, val_dir):
    tmp = tmp_path_factory.mktemp("deploy")
    res = deploy(small(tmp, work, val_dir))
    return res, tmp


def copy_of(package, tmp_path) -> Path:
    dst = tmp_path / "elsewhere" / "pkg"
    shutil.copytree(package[0].package, dst)
    return dst


@pytest.mark.slow
def test_deploy_writes_a_package_that_passes_its_check_anywhere(package, tmp_path):
    res, tmp = package
    assert res.chosen in BACKENDS
    assert all(r.status == "passed" for r in res.rows)
    assert res.rows[0].reused  # the session's export, not a new one
    for f in ("deploy.json", "REPORT.md", "README.md", "SHA256SUMS", golden.PIXELS, golden.REFERENCE, golden.DEPLOYED,
              golden.THRESHOLDS, golden.PREPROCESS, "triton/efficientnet_lite0/config.pbtxt"):
        assert (res.package / f).is_file(), f
    d = json.loads((res.package / "deploy.json").read_text())
    assert d["decision"]["chosen"] == res.chosen and d["package"]["backend"] == res.chosen
    assert d["images"]["verification"] == 40 and d["images"]["golden"] == 8
    assert (tmp / "report.json").is_file() and (tmp / "report.md").is_file()
    assert not [p for p in tmp.iterdir() if p.name.startswith(".pkg.")]  # no temporary left
    r = check_mod.check_package(copy_of(package, tmp_path))
    assert r.passed and r.images == 8 and r.drift_max_rel is not None and r.drift_max_rel <= 1e-5


@pytest.mark.slow
def test_golden_images_reproduce_the_verification_inputs(package):
    """The package's stored pixels + preprocessing give exactly what PyTorch's reference was computed on."""
    res, _ = package
    x, ref, dep, thresholds = golden.load(res.package)
    from scarlet_deploy.export.checkpoint import load_model
    import torch

    with torch.inference_mode():
        again = load_model("efficientnet_lite0").model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(again, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    assert thresholds["backend"] == res.chosen


@pytest.mark.slow
def test_check_names_a_changed_artifact_byte(package, tmp_path):
    pkg = copy_of(package, tmp_path)
    art = pkg / json.loads((pkg / "deploy.json").read_text())["package"]["artifact"]
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 1
    art.write_bytes(bytes(data))
    with pytest.raises(ScarletError, match=art.name):
        check_mod.check_package(pkg)


@pytest.mark.slow
def test_check_names_a_replaced_golden_file(package, tmp_path):
    pkg = copy_of(package, tmp_path)
    np.save(pkg / golden.REFERENCE, np.zeros((8, 1000), np.float32))
    with pytest.raises(ScarletError, match="reference_logits.npy"):
        check_mod.check_package(pkg)
    pkg2 = copy_of(package, tmp_path / "b")
    (pkg2 / golden.THRESHOLDS).unlink()
    with pytest.raises(ScarletError, match="thresholds.json is missing"):
        check_mod.check_package(pkg2)


@pytest.mark.slow
def test_check_fails_on_drift_past_the_bound(package, tmp_path):
    """Deploy-time logits that this runtime no longer reproduces (as another CPU or runtime version would):
    the files are intact (sums rewritten), the drift is not."""
    pkg = copy_of(package, tmp_path)
    bound = json.loads((pkg / golden.THRESHOLDS).read_text())["drift_max_rel"]
    dep = np.load(pkg / golden.DEPLOYED)
    np.save(pkg / golden.DEPLOYED, dep + 2 * bound * np.abs(dep).max())
    check_mod.write_sums(pkg)
    r = check_mod.check_package(pkg)
    assert not r.passed and "drifted" in r.failed[0] and r.drift_max_rel > bound
    np.save(pkg / golden.DEPLOYED, dep + 0.5 * bound * np.abs(dep).max())
    check_mod.write_sums(pkg)
    assert check_mod.check_package(pkg).passed


@pytest.mark.slow
def test_check_cli_exit_codes(package, tmp_path, capsys):
    from scarlet_deploy.runtime.cli import main

    pkg = copy_of(package, tmp_path)
    assert main(["check", str(pkg)]) == 0
    assert "PASS" in capsys.readouterr().out
    (pkg / "README.md").write_text("edited\n")
    assert main(["check", str(pkg)]) == 2
    assert "README.md was changed" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "nowhere")]) == 2


def test_judge_fails_non_finite_outputs():
    res = check_mod.CheckResult("p", "here", "ort", "m.onnx")
    out = np.ones((4, 10), np.float32)
    out[1, 2] = np.inf
    check_mod.judge(res, out, np.ones((4, 10)), np.ones((4, 10)), {"min_agreement": 0, "drift_max_rel": 1e9})
    assert not res.passed and "non-finite" in res.failed[0]


@pytest.mark.slow
def test_rerun_reuses_artifacts_and_replaces_the_package(package, work, val_dir):
    res, tmp = package
    before = (res.package / "SHA256SUMS").read_text()
    again = deploy(small(tmp, work, val_dir, objective="latency"))
    assert again.package == res.package and all(r.reused for r in again.rows)
    assert json.loads((res.package / "deploy.json").read_text())["objective"] == "latency"
    assert (res.package / "SHA256SUMS").read_text() != before
    assert check_mod.check_package(res.package).passed
    assert not [p for p in tmp.iterdir() if p.name.startswith(".pkg.")]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["write_sums", "check_package"])
def test_interrupted_packaging_leaves_no_package(stage, work, val_dir, tmp_path, monkeypatch):
    from scarlet_deploy.runtime.deploy import package as package_mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(package_mod, stage, boom)
    with pytest.raises(KeyboardInterrupt):
        deploy(small(tmp_path, work, val_dir, backends=["ort"], golden=4, min_verify=8, max_verify=8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md", "report.png"]


@pytest.mark.slow
def test_interrupted_packaging_keeps_the_older_package(package, work, val_dir, tmp_path, monkeypatch):
    from scarlet_deploy.runtime.deploy import package as package_mod

    old = copy_of(package, tmp_path)
    sums = (old / "SHA256SUMS").read_text()
    monkeypatch.setattr(package_mod, "write_sums", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        deploy(small(tmp_path, work, val_dir, output=old, backends=["ort"], golden=4, min_verify=8, max_verify=8))
    assert (old / "SHA256SUMS").read_text() == sums and check_mod.check_package(old).passed
    assert not [p for p in old.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_no_candidate_passes_report_but_no_package(work, val_dir, tmp_path):
    res = deploy(small(tmp_path, work, val_dir, backends=["ort"], gates=Gates(fp32_max_rel_error=1e-12), golden=4,
                       min_verify=8, max_verify=8))
    assert res.chosen is None and res.package is None
    assert not (tmp_path / "pkg").exists()
    d = json.loads((tmp_path / "report.json").read_text())
    assert d["candidates"][0]["status"] == "failed" and "FP32 logits differ" in d["candidates"][0]["why"]
    assert "no candidate passed" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_unavailable_candidates_are_listed_with_why(package):
    res, _ = package
    d = json.loads((res.package / "deploy.json").read_text())
    assert [c["backend"] for c in d["candidates"]] == BACKENDS
    # every candidate, not only the ones asked for: TensorRT needs a GPU here
    from scarlet_deploy.runtime.deploy import candidates

    assert candidates.unavailable(candidates.get("trt-fp16"))


@pytest.mark.parametrize("case,match", [
    ("no-images", "not a folder"),
    ("too-few", "deploy needs at least"),
    ("inside-input", "inside --images"),
    ("holds-input", "lies inside -o"),
    ("not-a-package", "not a package written by"),
    ("unknown-backend", "unknown backend"),
])
def test_bad_input_is_one_paragraph_and_nothing_written(case, match, tmp_path, val_dir):
    work = tmp_path / "work"
    images = val_dir
    kw: dict = {}
    if case == "no-images":
        images = tmp_path / "missing"
    elif case == "too-few":
        images = tmp_path / "few"
        (images / "n01440764").mkdir(parents=True)
        for f in sorted(val_dir.glob("*/*.JPEG"))[:20]:
            shutil.copy(f, images / "n01440764" / f.name)
    elif case == "inside-input":
        images = tmp_path / "imgs"
        shutil.copytree(val_dir, images)
        kw["output"] = images / "pkg"
    elif case == "holds-input":
        kw["output"] = tmp_path
        kw["checkpoint"] = tmp_path / "ckpt.pth"
    elif case == "not-a-package":
        (tmp_path / "pkg").mkdir()
        (tmp_path / "pkg" / "mine.txt").write_text("keep me")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ScarletError, match=match):  # refused before the model is even loaded
        cfg = small(tmp_path, work, val_dir, images=images, **kw)
        if case == "unknown-backend":
            cfg = small(tmp_path, work, val_dir, backends=["ort", "tflite"])
        deploy(cfg)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_deploy_cli_exit_1_when_nothing_passes(monkeypatch, tmp_path, capsys):
    from scarlet_deploy.runtime.cli import main
    from scarlet_deploy.runtime.deploy import run

    seen = {}

    def fake(cfg):
        seen["cfg"] = cfg
        return run.DeployResult(None, [], {"objective": "throughput", "candidates": [], "decision": {"chosen": None},
                                           "environment": {"machine": {"cpu": "x", "isa": "y"}}, "model": cfg.model,
                                           "seconds": 0}, None, 0.0)

    monkeypatch.setattr(run, "deploy", fake)
    assert main(["deploy", "--model", "efficientnet_lite0", "--backends", "ort,ov", "-o", str(tmp_path / "p")]) == 1
    assert seen["cfg"].backends == ["ort", "ov"] and "no candidate passed" in capsys.readouterr().out
    assert main(["deploy", "--model", "efficientnet_lite0", "--backends", "ort,nope", "-o", str(tmp_path / "p")]) == 2


@pytest.mark.slow
def test_check_against_scarlet_serve_of_the_package(package, tmp_path, start_scarlet_serve):
    """`scarlet serve --package` (a real Triton on free loopback ports), then `scarlet check --server`
    over HTTP and gRPC; logits the server does not give, and a server that is not there, are caught."""
    import signal
    import subprocess

    from scarlet_deploy.runtime.serve.server import free_ports

    pkg = copy_of(package, tmp_path)
    proc, ports = start_scarlet_serve(["--package", str(pkg)], tmp_path / "triton.log")
    try:
        for url in (f"http://127.0.0.1:{ports.http}", f"grpc://127.0.0.1:{ports.grpc}"):
            r = check_mod.check_package(pkg, server=url)
            assert r.passed and r.where == url and r.drift_max_rel <= 1e-5, r.text()
        # the same golden set against logits the server does not give: drift is caught through the server too
        dep = np.load(pkg / golden.DEPLOYED)
        np.save(pkg / golden.DEPLOYED, dep * 1.5)
        check_mod.write_sums(pkg)
        assert not check_mod.check_package(pkg, server=f"http://127.0.0.1:{ports.http}").passed
        with pytest.raises(ScarletError, match="cannot check against Triton"):
            check_mod.check_package(pkg, server=f"http://127.0.0.1:{free_ports().http}")
    finally:
        proc.send_signal(signal.SIGTERM)  # scarlet serve stops Triton and its stubs itself
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
