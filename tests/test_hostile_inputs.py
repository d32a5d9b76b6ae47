"""Hostile inputs: every command refuses garbage with one paragraph and exit 2, never certifies it,
never overwrites an input, never hangs, never shows a traceback.

Each case builds its own bad file, runs the command in-process (a FIFO case in a subprocess, with a
timeout, since a regression there hangs) and checks: the exit status, a message naming the file and
the fix, no traceback, nothing written, every input byte-for-byte unchanged (sha256 before/after).
Models are tiny hand-built ONNX graphs wherever the command refuses before running anything.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scarlet_deploy.calib import cache as cache_mod
from scarlet_deploy.export.checkpoint import load_model
from scarlet_deploy.export.registry import get_spec
from scarlet_deploy.runtime.cli import main
from scarlet_deploy.runtime.core.artifacts import (
    manifest_path,
    read_manifest,
    sha256_file,
    write_json_atomic,
    write_manifest,
)
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.data import classes
from scarlet_deploy.runtime.data.dataset import open_dataset
from scarlet_deploy.runtime.data.images import MAX_PIXELS, UnreadableImage
from scarlet_deploy.runtime.data.preprocess import deploy, reference
from scarlet_deploy.runtime.verify.compare import Thresholds, backend_rows, compare, reference_rows

TENCH, TOILET_TISSUE = "n01440764", "n15075141"  # first and last of the sorted ImageNet-1k wnids


# ----------------------------------------------------------------------------- builders

def tiny_onnx(path: Path, classes_: int = 1000, size: int = 224, weight: float | None = None) -> Path:
    """GlobalAveragePool -> Flatten -> Gemm: a classifier interface with no real work (weight NaN: NaN logits)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((classes_, 3)).astype(np.float32)
    if weight is not None:
        w[:] = weight
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "W"], ["logits"], transB=1)], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes_])],
        [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def noise_image(seed: int, shape: tuple[int, int] = (64, 80)) -> np.ndarray:
    """A varied (non-flat), distinct image: calibrate refuses flat colours and repeats."""
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def png_header(path: Path, width: int, height: int) -> Path:
    """A few hundred bytes that declare width x height pixels: what a decompression bomb looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def b_state():
    torch.manual_seed(0)
    return get_spec("scarlet_b").create().state_dict()


@pytest.fixture(scope="module")
def files(tmp_path_factory, b_state) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile")
    f = {"dir": d}
    torch.save({"model_state": b_state}, f.setdefault("good_pth", d / "good.pth"))
    nan = {k: (torch.full_like(v, math.nan) if k == "classifier.weight" else v) for k, v in b_state.items()}
    torch.save({"model_state": nan}, f.setdefault("nan_pth", d / "nan.pth"))
    (f.setdefault("empty_pth", d / "empty.pth")).write_bytes(b"")
    (f.setdefault("garbage_onnx", d / "garbage.onnx")).write_bytes(b"\x00\x01not an onnx model" * 50)
    f["onnx"] = tiny_onnx(d / "tiny.onnx")
    f["c10"] = tiny_onnx(d / "c10.onnx", classes_=10)
    f["s32"] = tiny_onnx(d / "s32.onnx", size=32)
    f["nan_onnx"] = tiny_onnx(d / "nan.onnx", weight=math.nan)
    imgs = d / "images"
    for i, wnid in enumerate((TENCH, "n01443537", "n01484850", TOILET_TISSUE)):
        (imgs / wnid).mkdir(parents=True)
        Image.fromarray(noise_image(i)).save(imgs / wnid / f"{wnid}_{i}.png")
    f["images"] = imgs
    f["huge_png"] = png_header(d / "huge.png", 20000, 20000)
    f["big_png"] = png_header(d / "big.png", 10000, 10000)  # 100 M pixels: above the cap, below PIL's own refusal
    os.mkfifo(f.setdefault("fifo", d / "fifo.JPEG"))
    return f


def _sha(p: Path) -> str | None:
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


def run_cli(capsys, argv: list[str], inputs: list[Path] = (), not_written: list[Path] = ()) -> tuple[int, str]:
    """Run `scarlet argv` in-process; assert no traceback, inputs unchanged, nothing written. (rc, stderr)."""
    before = {p: _sha(Path(p)) for p in inputs}
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    for p in inputs:
        assert _sha(Path(p)) == before[p], f"{p} was modified"
        assert _sha(manifest_path(p)) == before.get(manifest_path(p), _sha(manifest_path(p)))
    for p in not_written:
        assert not Path(p).exists(), f"{p} was written"
    return rc, out.err


def assert_refused(rc: int, err: str, *needles: str) -> None:
    """Exit 2 with one paragraph (no blank line) that contains every needle (the file, the fix)."""
    assert rc == 2, err
    text = err.strip()
    assert text and "\n\n" not in text, err
    flat = " ".join(text.split())
    for n in needles:
        assert " ".join(str(n).split()) in flat, (n, err)


def assert_usage_error(rc: int, err: str, flag: str) -> None:
    assert rc == 2 and "usage:" in err and f"argument {flag}" in err, err


# ----------------------------------------------------------------------------- 1. non-finite numbers are failures

def test_nan_checkpoint_is_refused_before_export(files, capsys, tmp_path):
    out = tmp_path / "nan.onnx"
    rc, err = run_cli(capsys, ["export", "--model", "scarlet_b", "--checkpoint", files["nan_pth"], "-o", out],
                      [files["nan_pth"]], [out, manifest_path(out)])
    assert_refused(rc, err, str(files["nan_pth"]), "classifier.weight", "NaN or infinite")


@pytest.mark.slow
def test_export_parity_gate_fails_on_nan_logits(files, tmp_path):
    """The gate itself, with the loader's check bypassed: `nan > tol` is False, `not (nan <= tol)` is True."""
    from scarlet_deploy.export.onnx_export import ExportConfig, export_model

    loaded = load_model("scarlet_b", checkpoint=files["good_pth"])
    with torch.no_grad():
        loaded.model.classifier.weight.fill_(math.nan)
    out = tmp_path / "m.onnx"
    with pytest.raises(ScarletError, match="NaN or infinite logits"):
        export_model(ExportConfig("scarlet_b", out), loaded)
    assert not out.exists() and not manifest_path(out).exists()


def test_nonfinite_logits_fail_every_precision():
    ref = np.zeros((2, 1000), np.float32)
    ref[:, 0] = 5.0  # PyTorch says class 0, which is also argmax over an all-NaN row
    out = np.full((2, 1000), np.nan, np.float32)
    cols = {**reference_rows(ref), **backend_rows("b", ref, out)}
    d = compare(cols, "b", np.array([-1, -1]), ["0.png", "1.png"], 0.0)
    assert d["nonfinite_images"] == 2
    for precision in ("fp32", "fp16", "int8"):  # the comparisons themselves fail on NaN
        assert not Thresholds().check(precision, math.nan, math.nan)[0]
    with pytest.raises(ScarletError, match="finite"):
        Thresholds(fp32_max_rel_error=math.nan)


def test_verify_of_a_nan_model_fails_and_writes_strict_json(files, val_dir, tmp_path, capsys):
    """Before: max(0, nan) == 0, so max abs error 0, top-1 'agreed' on the tench (argmax of NaN is 0): PASS."""
    val = tmp_path / "val" / TENCH
    val.mkdir(parents=True)
    (val / "tench.JPEG").write_bytes(next((val_dir / TENCH).iterdir()).read_bytes())
    report = tmp_path / "verify.json"
    rc, _ = run_cli(capsys, ["verify", "--model", "efficientnet_lite0", "--onnx", files["nan_onnx"], "--val-dir", val.parent,
                             "--workers", "0", "--quiet", "--no-pipeline-parity", "--json", report], [files["nan_onnx"]])
    assert rc == 1
    data = json.loads(report.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in a JSON report"))
    row = data["backends"][0]
    assert data["passed"] is False and row["passed"] is False and row["nonfinite_images"] == 1


def test_reports_are_strict_json(tmp_path):
    write_json_atomic(tmp_path / "r.json", {"a": math.nan, "b": [math.inf, 1.0], "c": np.float32("nan"), "d": np.array([1.0, np.nan])})
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == \
        {"a": None, "b": [None, 1.0], "c": None, "d": [1.0, None]}


@pytest.mark.parametrize("argv,flag", [
    (["verify", "--model", "efficientnet_lite0", "--onnx", "m.onnx", "--fp32-max-rel-error", "nan"], "--fp32-max-rel-error"),
    (["verify", "--model", "efficientnet_lite0", "--onnx", "m.onnx", "--int8-min-agreement", "inf"], "--int8-min-agreement"),
    (["calibrate", "--onnx", "m.onnx", "--images", ".", "-o", "q.onnx", "--max-top1-drop", "nan"], "--max-top1-drop"),
    (["bench", "--seconds", "nan"], "--seconds"),
])
def test_nonfinite_thresholds_are_usage_errors(capsys, argv, flag):
    assert_usage_error(*run_cli(capsys, argv), flag)


# ----------------------------------------------------------------------------- 2. outputs never overwrite inputs

def _build_dir(files, tmp_path) -> Path:
    d = tmp_path / "build"
    d.mkdir()
    m = tiny_onnx(d / "efficientnet_lite0.onnx")
    write_manifest(m, {"model": "efficientnet_lite0", "onnx_sha256": sha256_file(m)})
    return d


@pytest.mark.parametrize("case", ["export-o=ckpt", "export-o=symlink", "calibrate-o=onnx", "calibrate-cache=onnx",
                                  "calibrate-report=manifest", "fp16-o=onnx", "fp16-o=manifest", "verify-json=onnx",
                                  "verify-markdown=auto-onnx", "bench-json=onnx", "profile-json=onnx", "engine-o=onnx"])
def test_an_output_never_replaces_an_input(files, tmp_path, capsys, case):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(files["onnx"].read_bytes())
    write_manifest(onnx, {"model": "efficientnet_lite0", "onnx_sha256": sha256_file(onnx)})
    ckpt = tmp_path / "b.pth"
    ckpt.write_bytes(files["good_pth"].read_bytes())
    link = tmp_path / "link.pth"
    link.symlink_to(ckpt)
    build = _build_dir(files, tmp_path)
    victim = build / "efficientnet_lite0.onnx"
    img = ["--images", files["images"], "--num-images", "2"]
    argv, inputs = {
        "export-o=ckpt": (["export", "--model", "scarlet_b", "--checkpoint", ckpt, "-o", ckpt], [ckpt]),
        "export-o=symlink": (["export", "--model", "scarlet_b", "--checkpoint", ckpt, "-o", link], [ckpt]),
        "calibrate-o=onnx": (["calibrate", "--onnx", onnx, *img, "-o", onnx], [onnx]),
        "calibrate-cache=onnx": (["calibrate", "--onnx", onnx, *img, "-o", tmp_path / "q.onnx", "--cache", onnx], [onnx]),
        "calibrate-report=manifest": (["calibrate", "--onnx", onnx, *img, "-o", tmp_path / "q.onnx", "--report", onnx], [onnx]),
        "fp16-o=onnx": (["fp16", "--onnx", onnx, "-o", onnx], [onnx]),
        "fp16-o=manifest": (["fp16", "--onnx", onnx, "-o", manifest_path(onnx)], [onnx]),
        "verify-json=onnx": (["verify", "--model", "efficientnet_lite0", "--onnx", onnx, "--json", onnx], [onnx]),
        "verify-markdown=auto-onnx": (["verify", "--model", "efficientnet_lite0", "--auto-onnx", build, "--markdown", victim], [victim]),
        "bench-json=onnx": (["bench", "--models", "efficientnet_lite0", "--build-dir", build, "--json", victim], [victim]),
        "profile-json=onnx": (["profile", "--onnx", onnx, "--json", onnx], [onnx]),
        "engine-o=onnx": (["engine", "--onnx", onnx, "--precision", "fp32", "-o", onnx], [onnx]),
    }[case]
    rc, err = run_cli(capsys, argv, inputs, [tmp_path / "q.onnx"])
    assert_refused(rc, err, "would overwrite the input", "Pass another output path")


@pytest.mark.parametrize("where", ["directory", "under-a-file", "unwritable"])
@pytest.mark.parametrize("command", ["export", "verify", "fp16", "calibrate"])
def test_unusable_output_paths_are_refused_before_the_work(files, tmp_path, capsys, where, command):
    out = {"directory": tmp_path, "under-a-file": files["good_pth"] / "out.onnx", "unwritable": Path("/proc/out.onnx")}[where]
    argv = {
        "export": ["export", "--model", "scarlet_b", "--checkpoint", files["good_pth"], "-o", out],
        "verify": ["verify", "--model", "efficientnet_lite0", "--onnx", files["onnx"], "--json", out],
        "fp16": ["fp16", "--onnx", files["onnx"], "-o", out],
        "calibrate": ["calibrate", "--onnx", files["onnx"], "--model", "efficientnet_lite0", "--images", files["images"],
                      "--num-images", "2", "-o", out],
    }[command]
    rc, err = run_cli(capsys, argv, [files["good_pth"], files["onnx"]])
    assert_refused(rc, err, str(out), {"directory": "is a directory", "under-a-file": "is a file, not a folder",
                                       "unwritable": "cannot be written"}[where])


def _special(tmp_path: Path, kind: str) -> Path:
    f = tmp_path / f"special-{kind}"
    if kind == "fifo":
        os.mkfifo(f)
    else:
        try:
            os.mknod(f, 0o666 | __import__("stat").S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
        except PermissionError:
            pytest.skip("creating a character device needs root")
    return f


@pytest.mark.parametrize("kind", ["fifo", "chardev"])
@pytest.mark.parametrize("command", ["profile", "fp16", "verify", "doctor"])
def test_special_files_as_outputs_are_refused_and_left_alone(files, tmp_path, capsys, kind, command):
    """Renaming over a device replaced it with a regular file (as root, `profile --json /dev/null`)."""
    target = _special(tmp_path, kind)
    argv = {"profile": ["profile", "--onnx", files["onnx"], "--batch", "1", "--runs", "1", "--json", target],
            "fp16": ["fp16", "--onnx", files["onnx"], "-o", target],
            "verify": ["verify", "--model", "efficientnet_lite0", "--onnx", files["onnx"], "--json", target],
            "doctor": ["doctor", "--json", target]}[command]
    before = os.stat(target)
    rc, err = run_cli(capsys, argv, [files["onnx"]], [Path(f"{target}.json")])
    assert_refused(rc, err, str(target), "not a regular file", "Pass the path of a regular file")
    after = os.stat(target)
    assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode, before.st_rdev)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_a_report_to_dev_stdout_is_written_through_not_renamed_over(files, tmp_path):
    """A subprocess with stdout redirected to a file: /dev/stdout is then that file, and stays /dev/stdout."""
    log = tmp_path / "out.txt"
    with open(log, "wb") as out:
        proc = subprocess.run([sys.executable, "-m", "scarlet_deploy.runtime.cli", "profile", "--onnx", str(files["onnx"]),
                               "--batch", "1", "--runs", "1", "--json", "/dev/stdout"], stdout=out, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    text = log.read_text()
    assert "| " in text.split("{", 1)[0]  # the printed table first, then the JSON appended after it
    assert json.loads("{" + text.split("{", 1)[1])["batch"] == 1
    assert os.path.islink("/dev/stdout") and not list(Path("/dev").glob(".stdout*"))


def test_dev_null_stays_a_device(files, capsys):
    rc, _ = run_cli(capsys, ["profile", "--onnx", files["onnx"], "--batch", "1", "--runs", "1", "--json", "/dev/null"])
    assert rc == 0 and Path("/dev/null").is_char_device() and not Path("/dev/null.json").exists()
    assert not list(Path("/dev").glob(".null*"))


def test_two_outputs_of_one_command_may_not_be_one_file(files, tmp_path, capsys):
    out = tmp_path / "r.txt"
    rc, err = run_cli(capsys, ["verify", "--model", "efficientnet_lite0", "--onnx", files["onnx"], "--json", out,
                               "--markdown", out], [files["onnx"]], [out])
    assert_refused(rc, err, f"--json and --markdown are both {out}", "Pass a different path to each")
    link = tmp_path / "link.md"
    link.symlink_to(tmp_path / "real.md")
    rc, err = run_cli(capsys, ["calibrate", "--onnx", files["onnx"], "--model", "efficientnet_lite0", "--images",
                               files["images"], "--num-images", "2", "-o", tmp_path / "q.onnx", "--cache", tmp_path / "real.md",
                               "--report", tmp_path / "link"], [files["onnx"]], [tmp_path / "q.onnx"])
    assert_refused(rc, err, "are both", "Pass a different path to each")


def test_an_output_inside_the_reference_cache_is_refused(files, tmp_path, capsys):
    meta = tmp_path / "cache" / "reference" / "efficientnet_lite0-abc" / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text('{"keep": "me"}')
    rc, err = run_cli(capsys, ["verify", "--model", "efficientnet_lite0", "--onnx", files["onnx"], "--cache-dir",
                               tmp_path / "cache", "--json", meta], [files["onnx"], meta])
    assert_refused(rc, err, str(meta), "lies inside the reference cache")


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "/abs", "", "-dash", "x" * 200])
def test_triton_model_names_must_be_plain_names(files, tmp_path, capsys, name):
    out = tmp_path / "repo"
    rc, err = run_cli(capsys, ["triton", "--onnx", files["onnx"], f"--model={name}", "-o", out], [files["onnx"]], [out])
    assert_refused(rc, err, "is not a plain name", "pass --model NAME")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 3. calibration caches are validated

@pytest.fixture()
def cache_file(tmp_path):
    prov = cache_mod.Provenance("efficientnet_lite0", "0" * 64, "minmax", "ort", 0, ("n01440764/a.png",))
    path = tmp_path / "c.json"
    cache_mod.save(path, prov, {"x": (-1.0, 2.0), "y": (0.0, 6.0)})
    return path, prov


@pytest.mark.parametrize("damage,needle", [
    ("binary", "unreadable"),
    ("inverted", "invalid ranges"),
    ("nan", "invalid ranges"),
    ("string", "invalid ranges"),
    ("missing", "lacks ranges for 1"),
    ("no-table", "no 'ranges' table"),
    ("images-not-a-list", "calibration images"),
])
def test_damaged_calibration_caches_are_refused(cache_file, damage, needle):
    path, prov = cache_file
    data = json.loads(path.read_text())
    if damage == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    else:
        {"inverted": lambda: data["ranges"].__setitem__("x", [2.0, -1.0]),
         "nan": lambda: data["ranges"].__setitem__("x", [math.nan, 1.0]),
         "string": lambda: data["ranges"].__setitem__("y", "0,6"),
         "missing": lambda: data["ranges"].pop("y"),
         "no-table": lambda: data.pop("ranges"),
         "images-not-a-list": lambda: data.__setitem__("images", 5)}[damage]()
        path.write_text(json.dumps(data))
    with pytest.raises(ScarletError, match=needle) as e:
        cache_mod.load(path, prov, ["x", "y"])
    assert str(path) in str(e.value) and ("delete it" in str(e.value) or "another --cache" in str(e.value))


def test_the_cli_refuses_a_binary_cache_before_loading_images(files, tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_bytes(bytes(range(256)) * 4)
    out = tmp_path / "q.onnx"
    rc, err = run_cli(capsys, ["calibrate", "--onnx", files["onnx"], "--model", "efficientnet_lite0", "--images", files["images"],
                               "--num-images", "2", "--cache", bad, "-o", out], [bad, files["onnx"]], [out])
    assert_refused(rc, err, str(bad), "delete it and calibrate again")


@pytest.mark.parametrize("bad", [[-1e30, 1e30], [0.0, 0.0], [3.0, 3.0], [0.0, 2e6]])
def test_absurd_and_zero_width_ranges_are_refused(cache_file, bad):
    """+-1e30 quantises a tensor to zeros and a zero width to one value: the model scores 0 % top-1."""
    path, prov = cache_file
    data = json.loads(path.read_text())
    data["ranges"]["x"] = bad
    path.write_text(json.dumps(data))
    with pytest.raises(ScarletError, match="invalid ranges") as e:
        cache_mod.load(path, prov, ["x", "y"])
    assert str(path) in str(e.value)


def _calibrate_argv(onnx: Path, imgs: Path, out: Path, report: Path | None = None) -> list:
    return ["calibrate", "--onnx", onnx, "--model", "efficientnet_lite0", "--images", imgs, "--num-images", "4",
            "--num-select", "2", "--method", "minmax", "--no-compare", "--no-baseline", "--bench-rounds", "0",
            "--threads", "1", "-o", out] + (["--report", report] if report else [])


@pytest.mark.parametrize("junk", ["black", "one_colour_each", "near_flat", "duplicates", "report_equals_calib"])
def test_junk_image_sets_are_refused_before_a_model_is_written(files, tmp_path, capsys, junk):
    """40 black images once gave a report saying INT8 beats the baseline with 100 % agreement, exit 0."""
    imgs = tmp_path / "images"
    rng = np.random.default_rng(0)
    wnids = [TENCH, "n01443537", "n01484850", TOILET_TISSUE]
    for i in range(12):
        d = imgs / wnids[i % 4]
        d.mkdir(parents=True, exist_ok=True)
        a = {"black": lambda: np.zeros((64, 80, 3), np.uint8),
             "one_colour_each": lambda: np.full((64, 80, 3), 20 * i, np.uint8),
             "near_flat": lambda: (128 + rng.integers(-1, 2, (64, 80, 3))).astype(np.uint8),
             "duplicates": lambda: noise_image(0),
             "report_equals_calib": lambda: noise_image(i % 4)}[junk]()
        Image.fromarray(a).save(d / f"{i}.png")
    out, report = tmp_path / "q.onnx", tmp_path / "r"
    rc, err = run_cli(capsys, _calibrate_argv(files["onnx"], imgs, out, report), [files["onnx"]],
                      [out, manifest_path(out), Path(f"{report}.json"), Path(f"{report}.md")])
    assert_refused(rc, err, "are distinct images with content", "real, varied photographs")


def test_nonfinite_computed_ranges_are_refused():
    with pytest.raises(ScarletError, match="re-export"):
        cache_mod.check_ranges({"x": (math.nan, math.nan)}, None, "the statistics of m.onnx", "re-export it")


# ----------------------------------------------------------------------------- 4. wrong model shapes

@pytest.mark.parametrize("bad,needle", [("c10", "outputs 10 classes"), ("s32", "(N, 3, 32, 32)"), ("garbage_onnx", "not a readable ONNX")])
@pytest.mark.parametrize("command", ["predict", "verify", "calibrate", "fp16", "profile", "bench"])
def test_wrong_or_unreadable_onnx_is_one_sentence(files, tmp_path, capsys, bad, needle, command):
    path = files[bad]
    if command in ("profile", "bench") and bad != "garbage_onnx":
        pytest.skip(f"{command} measures any ONNX at its own input size; it only needs a readable one")
    if command == "bench":
        (tmp_path / "b").mkdir()
        path = tmp_path / "b" / "efficientnet_lite0.onnx"
        path.write_bytes(files[bad].read_bytes())
    image = files["images"] / TENCH / f"{TENCH}_0.png"
    argv = {
        "predict": ["predict", "--onnx", path, "--model", "efficientnet_lite0", image],
        "verify": ["verify", "--model", "efficientnet_lite0", "--onnx", path, "--val-dir", files["images"], "--workers", "0", "--quiet"],
        "calibrate": ["calibrate", "--onnx", path, "--model", "efficientnet_lite0", "--images", files["images"], "--num-images", "2",
                      "-o", tmp_path / "q.onnx"],
        "fp16": ["fp16", "--onnx", path, "-o", tmp_path / "q.onnx", "--images", "2"],  # images: the input must take them
        "profile": ["profile", "--onnx", path, "--batch", "1", "--runs", "1"],
        "bench": ["bench", "--models", "efficientnet_lite0", "--backends", "ort", "--build-dir", tmp_path / "b", "--no-memory",
                  "--repeats", "1", "--seconds", "0.01"],
    }[command]
    rc, err = run_cli(capsys, argv, [path], [tmp_path / "q.onnx"])
    assert_refused(rc, err, str(path), needle)


# ----------------------------------------------------------------------------- 5. one image loader with limits

@pytest.mark.parametrize("pipeline", [reference, deploy])
@pytest.mark.parametrize("bad,needle", [("fifo", "not a regular file"), ("huge_png", "pixel limit"), ("big_png", "pixel limit"),
                                        ("empty_pth", "empty file"), ("garbage_onnx", "not an image"), ("dir", "not a regular file")])
def test_both_pipelines_refuse_special_files_and_bombs(files, pipeline, bad, needle):
    with pytest.raises(UnreadableImage, match=needle):
        pipeline(files[bad], get_spec("scarlet_a").preprocess)


def test_pixel_cap_is_pils_bomb_threshold():
    assert MAX_PIXELS == Image.MAX_IMAGE_PIXELS


def test_predict_skips_a_fifo_and_a_bomb_without_hanging(files):
    """In a subprocess with a timeout: before the fix, reading the FIFO blocked forever."""
    proc = subprocess.run([sys.executable, "-m", "scarlet_deploy.runtime.cli", "predict", "--onnx", str(files["onnx"]),
                           "--model", "scarlet_a", str(files["fifo"]), str(files["huge_png"]),
                           str(files["images"] / TENCH / f"{TENCH}_0.png")],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"skipped {files['fifo']}: not a regular file" in proc.stderr
    assert f"skipped {files['huge_png']}: declares more than" in proc.stderr
    assert f"{TENCH}_0.png" in proc.stdout


def test_calibrate_skips_unreadable_images_with_a_line(files, tmp_path, capsys):
    """The same loader in calibrate: a bomb or a damaged file among the images is skipped, not fatal."""
    imgs = tmp_path / "images"
    for i, wnid in enumerate((TENCH, "n01443537", "n01484850")):
        (imgs / wnid).mkdir(parents=True)
        Image.fromarray(noise_image(10 + i)).save(imgs / wnid / f"{i}.png")
    bomb = png_header(imgs / TENCH / "bomb.png", 20000, 20000)
    bad = imgs / "n01443537" / "bad.JPEG"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "q.onnx"
    before = _sha(files["onnx"])
    rc = main([str(a) for a in ["calibrate", "--onnx", files["onnx"], "--model", "efficientnet_lite0", "--images", imgs,
                                "--num-images", "4", "--num-select", "0", "--method", "minmax", "--no-compare", "--no-baseline",
                                "--bench-rounds", "0", "--threads", "1", "-o", out]])
    printed = capsys.readouterr()
    assert rc == 0 and out.exists() and _sha(files["onnx"]) == before and "Traceback" not in printed.err
    assert f"skipped {bomb}: declares more than" in printed.out and f"skipped {bad}: not an image" in printed.out
    assert json.loads(manifest_path(out).read_text())["calibration_images"]["count"] + \
        json.loads(manifest_path(out).read_text())["evaluation_images"]["count"] == 3


# ----------------------------------------------------------------------------- 6. manifests are checked against their file

def test_a_copied_manifest_is_refused(files, tmp_path, capsys):
    other = tmp_path / "other.onnx"
    other.write_bytes(files["c10"].read_bytes())
    write_manifest(other, {"model": "scarlet_a", "onnx_sha256": sha256_file(files["onnx"])})  # another file's manifest
    image = files["images"] / TENCH / f"{TENCH}_0.png"
    rc, err = run_cli(capsys, ["predict", "--onnx", other, image], [other])
    assert_refused(rc, err, str(other), "Re-create", "scarlet export")
    with pytest.raises(ScarletError, match="not the file its manifest"):
        read_manifest(other)


def test_export_writes_the_sha256_of_its_file(lite0_onnx):
    m = json.loads(manifest_path(lite0_onnx).read_text())
    assert m["onnx_sha256"] == hashlib.sha256(Path(lite0_onnx).read_bytes()).hexdigest()
    assert read_manifest(lite0_onnx) == m


# ----------------------------------------------------------------------------- 7. one paragraph and exit 2, not a traceback

def test_empty_checkpoint(files, tmp_path, capsys):
    out = tmp_path / "e.onnx"
    rc, err = run_cli(capsys, ["export", "--model", "scarlet_b", "--checkpoint", files["empty_pth"], "-o", out], [], [out])
    assert_refused(rc, err, str(files["empty_pth"]), "empty (0 bytes)", "save it again")


def test_ctrl_c_while_building_the_parser(monkeypatch, capsys):
    import importlib

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", interrupted)
    try:
        rc = main(["export", "--help"])
    except KeyboardInterrupt:  # caught here: escaping, it would stop the whole pytest session
        pytest.fail("Ctrl-C while building the parser escaped main() with a traceback")
    assert rc == 130
    assert "Traceback" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- 8. out-of-range numbers are usage errors

@pytest.mark.parametrize("argv,flag", [
    (["predict", "--onnx", "m.onnx", "--top", "0", "x.png"], "--top"),
    (["predict", "--onnx", "m.onnx", "--top", "-3", "x.png"], "--top"),
    (["calibrate", "--onnx", "m.onnx", "--images", ".", "-o", "q.onnx", "--num-eval", "-2"], "--num-eval"),
    (["calibrate", "--onnx", "m.onnx", "--images", ".", "-o", "q.onnx", "--num-images", "0"], "--num-images"),
    (["calibrate", "--onnx", "m.onnx", "--images", ".", "-o", "q.onnx", "--threads", "-1"], "--threads"),
    (["calibrate", "--onnx", "m.onnx", "--images", ".", "-o", "q.onnx", "--min-agreement", "200"], "--min-agreement"),
    (["calibrate", "--onnx", "m.onnx", "--images", ".", "-o", "q.onnx", "--max-top1-drop", "-1"], "--max-top1-drop"),
    (["calibrate-model", "--model", "scarlet_a", "--bench-rounds", "-1"], "--bench-rounds"),
    (["verify", "--model", "scarlet_a", "--onnx", "m.onnx", "--threads", "-2"], "--threads"),
    (["verify", "--model", "scarlet_a", "--onnx", "m.onnx", "--workers", "-1"], "--workers"),
    (["verify", "--model", "scarlet_a", "--onnx", "m.onnx", "--limit", "0"], "--limit"),
    (["verify", "--model", "scarlet_a", "--onnx", "m.onnx", "--fp16-min-agreement", "1.5"], "--fp16-min-agreement"),
    (["verify", "--model", "scarlet_a", "--onnx", "m.onnx", "--seed", "-1"], "--seed"),
    (["export", "--model", "scarlet_a", "-o", "m.onnx", "--seed", "99999999999999999999"], "--seed"),
    (["export", "--model", "scarlet_a", "-o", "m.onnx", "--opset", "99"], "--opset"),
    (["export", "--model", "scarlet_a", "-o", "m.onnx", "--batch", "abc"], "--batch"),
    (["bench", "--batch", "abc"], "--batch"),
    (["bench", "--batch", "1,0"], "--batch"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--threads", "-4"], "--threads"),
    (["profile", "--onnx", "m.onnx", "--runs", "0"], "--runs"),
    (["fp16", "--onnx", "m.onnx", "--images", "-1"], "--images"),
    (["engine", "--onnx", "m.onnx", "--precision", "fp32", "-o", "m.plan", "--workspace", "0"], "--workspace"),
    (["serve", "--onnx", "m.onnx", "--http-port", "70000"], "--http-port"),
    (["serve", "--onnx", "m.onnx", "--max-batch", "0"], "--max-batch"),
    (["serve", "--onnx", "m.onnx", "--max-queue-delay-us", "-1"], "--max-queue-delay-us"),
    (["triton", "--onnx", "m.onnx", "-o", "repo", "--instances", "0"], "--instances"),
    (["serve-load", "--onnx", "m.onnx", "--clients", "0"], "--clients"),
    (["serve-load", "--onnx", "m.onnx", "--seconds", "nan"], "--seconds"),
])
def test_out_of_range_numbers_are_usage_errors(capsys, argv, flag):
    assert_usage_error(*run_cli(capsys, argv), flag)


def test_num_images_that_leave_nothing_to_evaluate(files, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    rc, err = run_cli(capsys, ["calibrate", "--onnx", files["onnx"], "--model", "efficientnet_lite0", "--images", files["images"],
                               "--num-images", "40", "-o", out], [files["onnx"]], [out])
    assert_refused(rc, err, "all 4 images", str(files["images"]), "--num-images 2")


# ----------------------------------------------------------------------------- 9. mutations the suite used to miss

def test_a_checkpoint_missing_exactly_one_key_is_refused(tmp_path, b_state):
    sd = {k: v for k, v in b_state.items() if k != "classifier.bias"}
    torch.save({"model_state": sd}, tmp_path / "c.pth")
    with pytest.raises(ScarletError, match=r"1 missing keys \(e\.g\. classifier\.bias\)"):
        load_model("scarlet_b", checkpoint=tmp_path / "c.pth")


def test_wnid_to_index_first_and_last(tmp_path):
    assert classes.wnids()[0] == TENCH and classes.wnid_to_index()[TENCH] == 0
    assert classes.wnids()[-1] == TOILET_TISSUE and classes.wnid_to_index()[TOILET_TISSUE] == 999
    assert classes.name(0) == "tench" and classes.name(999) == "toilet paper"
    for wnid in (TENCH, TOILET_TISSUE):
        (tmp_path / wnid).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / wnid / "a.png")
    assert [it.label for it in open_dataset(tmp_path).items] == [0, 999]


# Pinned here, not read from the registry: a wrong mean/std in the registry must fail this test.
PINNED = {"scarlet_a": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "efficientnet_lite0": ((0.498,) * 3, (0.502,) * 3)}


@pytest.mark.parametrize("model", sorted(PINNED))
@pytest.mark.parametrize("pipeline", [reference, deploy])
def test_preprocessing_of_a_synthetic_image_is_exact(tmp_path, model, pipeline):
    """256x256 needs no resize (short side 256), the 224 centre crop starts at 16: every value is known.
    R varies with x, G with y, B is constant, so a BGR/RGB swap or a transposed crop cannot pass."""
    yy, xx = np.mgrid[0:256, 0:256]
    rgb = np.stack([xx, yy, np.full_like(xx, 200)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "s.png")
    x = pipeline(tmp_path / "s.png", get_spec(model).preprocess)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    mean, std = PINNED[model]
    crop = rgb[16:240, 16:240].astype(np.float64) / 255.0
    want = ((crop - np.array(mean)) / np.array(std)).transpose(2, 0, 1)
    np.testing.assert_allclose(x, want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- memory bounds, OS errors, SIGTERM

def test_predict_streams_many_images_in_bounded_batches(files, tmp_path, monkeypatch):
    """1000 image arguments once went through as one batch (10 GB RSS); now at most 32 at a time."""
    from scarlet_deploy.runtime.predict import predict
    from scarlet_deploy.runtime.runners.ort import OrtRunner

    img = tmp_path / "a.png"
    Image.fromarray(noise_image(3)).save(img)
    seen: list[int] = []
    infer = OrtRunner.infer

    def spy(self, x):
        seen.append(len(x))
        return infer(self, x)

    monkeypatch.setattr(OrtRunner, "infer", spy)
    preds, skipped = predict(files["onnx"], [str(img)] * 70 + [str(files["fifo"])], "efficientnet_lite0")
    assert len(preds) == 70 and len(skipped) == 1 and max(seen) <= 32 and sum(seen) == 70
    assert len({tuple(p.top) for p in preds}) == 1  # every batch gives the same answer for the same image


def test_os_errors_are_one_paragraph(files, tmp_path, capsys, monkeypatch):
    """ENAMETOOLONG for real; ENOSPC, EROFS and MemoryError raised where the write or the allocation happens."""
    import errno

    long_name = tmp_path / ("x" * 300 + ".json")
    argv = ["profile", "--onnx", files["onnx"], "--batch", "1", "--runs", "1", "--json"]
    rc, err = run_cli(capsys, argv + [long_name], [files["onnx"]])
    assert_refused(rc, err, "File name too long", "pass a shorter one")
    from scarlet_deploy.runtime.core import artifacts

    for code, needle in ((errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only")):
        def fail(*_a, code=code):
            raise OSError(code, os.strerror(code), str(tmp_path / "p.json"))

        monkeypatch.setattr(artifacts.os, "replace", fail)
        rc, err = run_cli(capsys, argv + [tmp_path / "p.json"], [files["onnx"]], [tmp_path / "p.json"])
        assert_refused(rc, err, needle, str(tmp_path / "p.json"))
        monkeypatch.undo()
        assert not list(tmp_path.glob(".p.json*")), "the temporary was left"
    from scarlet_deploy.runtime import profile

    def no_memory(*_a, **_k):
        raise MemoryError("Unable to allocate 56.1 GiB for an array with shape (100000, 3, 224, 224)")

    monkeypatch.setattr(profile, "kernel_times", no_memory)
    rc, err = run_cli(capsys, argv[:-1] + ["--json", tmp_path / "m.json"], [files["onnx"]], [tmp_path / "m.json"])
    assert_refused(rc, err, "not enough memory", "lower --batch")


@pytest.mark.slow
def test_sigterm_is_an_interruption_with_no_leftovers(files, val_dir, tmp_path):
    """SIGTERM during a long command: exit 130 as for Ctrl-C, no traceback, no temporary folder left."""
    import signal
    import time

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "q.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "scarlet_deploy.runtime.cli", "calibrate", "--onnx", str(files["onnx"]),
                             "--model", "efficientnet_lite0", "--images", str(val_dir), "--num-images", "400",
                             "--num-select", "50", "--threads", "1", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp)})
    deadline = time.monotonic() + 60
    while not list(tmp.glob("scarlet-calib-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert not list(tmp.glob("scarlet-*")) and not out.exists() and not manifest_path(out).exists()


# ----------------------------------------------------------------------------- 7. state read back is checked

def _journal_rows(pos: list[int]) -> dict[str, np.ndarray]:
    return {"pos": np.asarray(pos), "ref_top1": np.asarray(pos, np.int64), "why": np.asarray([""] * len(pos))}


JOURNAL_COLUMNS = ["pos", "ref_top1", "why", "t.wall"]


def _rewrite_chunk(path: Path, edit, keep_checksum: bool = True) -> None:
    """Load a chunk, edit it as a person with numpy would, save it back (its stored sha256 unchanged unless told)."""
    from scarlet_deploy.runtime.verify.journal import chunk_sha256

    with np.load(path) as z:
        chunk = {k: z[k] for k in z.files}
    edit(chunk)
    if not keep_checksum:  # what only the column check can catch: a consistent checksum over the wrong columns
        chunk["sha256"] = np.asarray(chunk_sha256(path.parent.name, chunk))
    with open(path, "wb") as f:
        np.savez(f, **chunk)


def test_an_edited_journal_chunk_is_dropped_and_recomputed(tmp_path):
    """Before: a value edited in a chunk was trusted on --resume (a passing model was reported FAIL)."""
    from scarlet_deploy.runtime.verify.journal import Journal

    ident = {"reference_key": "k", "backends": []}
    j = Journal(tmp_path, ident, resume=False, columns=JOURNAL_COLUMNS)
    j.append(_journal_rows([0, 1]), {"t.wall": 1.0})
    j.append(_journal_rows([2, 3]), {"t.wall": 1.0})
    j.close()
    first = sorted(j.folder.glob("chunk-*.npz"))[0]

    def flip(c):
        c["ref_top1"][1] = 999

    _rewrite_chunk(first, flip)
    r = Journal(tmp_path, ident, resume=True, columns=JOURNAL_COLUMNS)
    assert r.done_positions() == {2, 3}, "the edited chunk's images must run again"
    assert any("dropped chunk-000001.npz" in n and "sha256 does not match" in n for n in r.notes), r.notes
    assert 999 not in r.columns()["ref_top1"]
    r.close()


@pytest.mark.parametrize("checksum", ["stale", "consistent"])
def test_a_journal_chunk_missing_a_column_is_dropped_not_a_key_error(tmp_path, checksum):
    from scarlet_deploy.runtime.verify.journal import Journal

    ident = {"reference_key": "k", "backends": []}
    j = Journal(tmp_path, ident, resume=False, columns=JOURNAL_COLUMNS)
    j.append(_journal_rows([0, 1]), {"t.wall": 1.0})
    j.append(_journal_rows([2]), {"t.wall": 1.0})
    j.close()
    # The sha256 is over the run's full digest; the folder holds its first 24 hex digits, so recompute with the full one.
    from scarlet_deploy.runtime.verify.journal import chunk_sha256

    last = sorted(j.folder.glob("chunk-*.npz"))[-1]
    with np.load(last) as z:
        chunk = {k: z[k] for k in z.files if k != "ref_top1"}
    if checksum == "consistent":
        chunk["sha256"] = np.asarray(chunk_sha256(j.digest, chunk))
    with open(last, "wb") as f:
        np.savez(f, **chunk)
    r = Journal(tmp_path, ident, resume=True, columns=JOURNAL_COLUMNS)
    why = "missing ['ref_top1']" if checksum == "consistent" else "sha256 does not match"
    assert r.done_positions() == {0, 1} and any("dropped chunk-000002.npz" in n and why in n for n in r.notes), r.notes
    r.append(_journal_rows([2]), {"t.wall": 1.0})
    assert r.columns()["ref_top1"].tolist() == [0, 1, 2]
    r.close()


def test_a_second_run_of_the_same_check_is_refused_and_leaves_the_first_journal_alone(tmp_path):
    """Before: a second verify started beside the first deleted the first's live journal as 'interrupted'."""
    from scarlet_deploy.runtime.verify.journal import Journal

    ident = {"reference_key": "k", "backends": []}
    first = Journal(tmp_path, ident, resume=False)
    first.append(_journal_rows([0, 1]), {"t.wall": 1.0})
    chunk = next(first.folder.glob("chunk-*.npz"))
    before = chunk.read_bytes()
    for resume in (False, True):
        with pytest.raises(ScarletError) as e:
            Journal(tmp_path, ident, resume=resume)
        text = str(e.value)
        assert f"pid {os.getpid()}" in text and str(first.folder) in text and "\n" not in text
    assert chunk.read_bytes() == before, "the live journal was touched"
    first.append(_journal_rows([2]), {"t.wall": 1.0})  # the first run goes on
    first.close()
    later = Journal(tmp_path, ident, resume=True)  # once it has stopped, --resume continues it
    assert later.done_positions() == {0, 1, 2}
    later.finish()
    assert not list(tmp_path.iterdir()), "a finished run leaves neither its journal nor its lock file"


def _filled_reference(tmp_path: Path):
    from scarlet_deploy.runtime.verify.reference_cache import ReferenceCache, ReferenceKey

    key = ReferenceKey(model="scarlet_a", let=False, weights="sha256:" + "a" * 64, preprocess={"resize": 256},
                       code="c" * 64, torch="2", images=3, image_list_sha256="i" * 64, classes=4)
    cache = ReferenceCache(tmp_path)
    w = cache.writer(key, keep_rows=False)
    w.write([0, 1, 2], np.ones((3, 4), np.float32))
    w.commit({1: "unreadable"}, {"device": "cpu", "images_per_s": 12.5}).close()
    return cache, key


@pytest.mark.parametrize("field,value", [
    ("images_per_s", -12.5), ("images_per_s", 0), ("images_per_s", "NaN"), ("images_per_s", "Infinity"),
    ("images_per_s", "fast"), ("images_per_s", True), ("skipped", {"one": "x"}), ("skipped", {"7": "x"}),
    ("skipped", {"1": 5}), ("skipped", ["1"]), ("device", 5), ("created", ["today"]), (None, None)])
def test_a_reference_meta_with_a_wrong_value_is_ignored_with_a_note(tmp_path, field, value):
    """Before: images/s -12.5 printed a negative projected time; a string there (or an index that is not
    one) was a TypeError/ValueError traceback."""
    cache, key = _filled_reference(tmp_path)
    meta_path = next(tmp_path.glob("*/meta.json"))
    text = meta_path.read_text()
    if field is None:  # JSON that is not an object
        text = "[1, 2]"
    else:
        meta = json.loads(text)
        meta[field] = value
        text = json.dumps(meta)
        if value in ("NaN", "Infinity"):  # what Python's json writes for them, and reads back as floats
            text = text.replace(f'"{value}"', value)
    meta_path.write_text(text)
    hit, note = cache.lookup(key)
    assert hit is None and "ignored the cached reference" in note and "recomputing it" in note, note
    if field is not None:
        assert field in note


def test_a_good_reference_meta_still_passes(tmp_path):
    cache, key = _filled_reference(tmp_path)
    hit, note = cache.lookup(key)
    assert note is None and hit.skipped == {1: "unreadable"} and hit.meta["images_per_s"] == 12.5
    hit.close()


# ----------------------------------------------------------------------------- 9. no leftovers

def test_verify_of_unreadable_images_leaves_no_partial_reference_and_no_journal(files, tmp_path, capsys):
    val = tmp_path / "val" / TENCH
    val.mkdir(parents=True)
    for i in range(3):
        (val / f"bad{i}.JPEG").write_bytes(b"not a jpeg" * (i + 1))
    cache = tmp_path / "cache"
    rc, err = run_cli(capsys, ["verify", "--model", "efficientnet_lite0", "--onnx", files["onnx"], "--val-dir", val.parent,
                               "--cache-dir", cache, "--workers", "0", "--quiet", "--chunk-images", "1"], [files["onnx"]])
    assert_refused(rc, err, "none of the 3 images could be read")
    assert (cache / "reference").is_dir() and not list((cache / "reference").iterdir())
    assert not list((cache / "verify-resume").rglob("*")), list((cache / "verify-resume").rglob("*"))


# ----------------------------------------------------------------------------- 6. memory refused from the request

@pytest.mark.parametrize("command", ["profile", "bench"])
def test_a_batch_beyond_the_memory_available_is_refused_before_any_work(files, tmp_path, capsys, command):
    """Before: --batch 100000 allocated 56 GiB of input and ended in a MemoryError traceback (or the OOM killer)."""
    argv = (["profile", "--onnx", files["onnx"], "--batch", "100000", "--runs", "1"] if command == "profile" else
            ["bench", "--models", "efficientnet_lite0", "--backends", "ort", "--batch", "1,100000",
             "--build-dir", tmp_path / "build"])
    rc, err = run_cli(capsys, argv, [files["onnx"]], [tmp_path / "build"])
    assert_refused(rc, err, "--batch 100000 needs about", "GiB available; pass --batch")


def test_the_memory_estimate_lets_ordinary_batches_through(monkeypatch):
    from scarlet_deploy.runtime.core import host

    host.check_batch_memory(64, 224)  # what bench and profile are run with every day
    monkeypatch.setattr(host, "available_memory_bytes", lambda: 2**30)
    with pytest.raises(ScarletError, match=r"pass --batch 104 or less"):  # 1 GiB / 9.76 MiB an image
        host.check_batch_memory(200, 224)


# ----------------------------------------------------------------------------- 8. early, accurate refusals

def _bad_input(tmp_path: Path, kind: str, files) -> tuple[Path, str]:
    if kind == "folder":
        d = tmp_path / "models"
        d.mkdir()
        (d / "a.onnx").write_bytes(files["onnx"].read_bytes())
        return d, "is a folder, not a file; pass the .onnx file inside it such as a.onnx"
    if kind == "loop":
        a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
        a.symlink_to(b)
        b.symlink_to(a)
        return a, "is a symbolic link loop"
    if kind == "dangling":
        a = tmp_path / "gone.onnx"
        a.symlink_to(tmp_path / "nowhere.onnx")
        return a, "is a symbolic link to"
    return files["fifo"], "is not a regular file"


@pytest.mark.parametrize("kind", ["folder", "loop", "dangling", "fifo"])
@pytest.mark.parametrize("command", ["predict", "verify", "calibrate", "profile", "fp16"])
def test_an_onnx_that_cannot_be_a_file_is_named_for_what_it_is(files, tmp_path, capsys, kind, command):
    """Before: a folder or a link loop as --onnx was answered 'has no manifest ...; pass --model NAME'."""
    bad, needle = _bad_input(tmp_path, kind, files)
    argv = {"predict": ["predict", "--onnx", bad, files["images"] / TENCH / f"{TENCH}_0.png"],
            "verify": ["verify", "--model", "efficientnet_lite0", "--onnx", bad],
            "calibrate": ["calibrate", "--onnx", bad, "--images", files["images"], "-o", tmp_path / "q.onnx"],
            "profile": ["profile", "--onnx", bad],
            "fp16": ["fp16", "--onnx", bad, "-o", tmp_path / "h.onnx"]}[command]
    rc, err = run_cli(capsys, argv, not_written=[tmp_path / "q.onnx", tmp_path / "h.onnx"])
    assert_usage_error(rc, err, "--onnx")
    assert needle in " ".join(err.split()) and "--model NAME" not in err, err


@pytest.mark.parametrize("layout,needle", [
    ("empty", f"{TENCH}/: empty folder"),
    ("nested", f"{TENCH}/: its images are in subfolders (e.g. sub/a.png)"),
    ("not_images", f"{TENCH}/: no image files (.txt;")])
def test_a_val_folder_with_no_usable_wnid_folder_says_why(tmp_path, layout, needle):
    """Before: '... has no labelled images: []...'."""
    d = tmp_path / "val" / TENCH
    d.mkdir(parents=True)
    if layout == "nested":
        (d / "sub").mkdir()
        Image.fromarray(noise_image(1)).save(d / "sub" / "a.png")
    elif layout == "not_images":
        (d / "notes.txt").write_text("x")
    with pytest.raises(ScarletError) as e:
        open_dataset(tmp_path / "val")
    text = str(e.value)
    assert needle in text and "Put each class's images directly in" in text and "[]" not in text, text


def test_every_listed_image_type_decodes_through_both_pipelines_and_verify_lists_gif(tmp_path):
    """Before: verify listed no GIF (nor PPM, JPEG 2000, AVIF) though predict decodes them."""
    from scarlet_deploy.runtime.data.images import IMAGE_SUFFIXES

    p = get_spec("efficientnet_lite0").preprocess
    d = tmp_path / "val" / TENCH
    d.mkdir(parents=True)
    for i, suffix in enumerate(sorted(IMAGE_SUFFIXES)):
        path = d / f"img{i}{suffix}"
        Image.fromarray(noise_image(i)[..., 0] if suffix in (".pbm", ".pgm") else noise_image(i)).save(path)
        for pipeline in (reference, deploy):
            assert pipeline(path, p).shape == (3, 224, 224), (suffix, pipeline.__name__)
    listed = {it.path.suffix for it in open_dataset(tmp_path / "val").items}
    assert listed == IMAGE_SUFFIXES and ".gif" in listed


def qdq_onnx(path: Path, fp16: bool = False) -> Path:
    """The tiny classifier behind a QuantizeLinear/DequantizeLinear pair (or with float16 weights)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    tiny_onnx(path)
    m = onnx.load(path)
    if fp16:
        w = m.graph.initializer[0]
        m.graph.initializer[0].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).astype(np.float16), w.name))
    else:
        m.graph.node[0].input[0] = "dq"
        m.graph.node.insert(0, helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]))
        m.graph.node.insert(0, helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]))
        m.graph.initializer.extend([numpy_helper.from_array(np.float32(0.05), "s"),
                                    numpy_helper.from_array(np.int8(0), "z")])
    onnx.save(m, path)
    return path


@pytest.mark.parametrize("target", ["ort", "ov", "trt"])
@pytest.mark.parametrize("kind,needle", [("int8", "is already quantised (Q/DQ INT8 operators)"),
                                         ("fp16", "is an FP16 model (float16 weights)")])
def test_calibrating_a_model_that_is_not_fp32_is_refused_before_any_work(files, tmp_path, capsys, monkeypatch,
                                                                         target, kind, needle):
    """Before: --target ov|ort on a Q/DQ model worked 22-41 s, then failed naming a temporary file and left
    an output without a manifest."""
    from scarlet_deploy.calib import images as calib_images

    src = qdq_onnx(tmp_path / f"{kind}.onnx", fp16=kind == "fp16")
    loaded = []
    monkeypatch.setattr(calib_images, "load", lambda *a, **k: loaded.append(1) or pytest.fail("images were loaded"))
    out = tmp_path / "q.onnx"
    rc, err = run_cli(capsys, ["calibrate", "--onnx", src, "--model", "efficientnet_lite0", "--images", files["images"],
                               "--target", target, "-o", out, "--num-images", "2"], [src], [out, manifest_path(out)])
    if rc == 2 and "OpenVINO" in err and "install" in err:
        pytest.skip("no OpenVINO on this host")
    assert_refused(rc, err, str(src), needle, "calibrate quantises an FP32 ONNX")
    assert not loaded


def test_a_cache_saved_after_skipping_images_is_not_refused_as_stale_before_loading(tmp_path):
    """The check before loading sees the sample before flat/duplicate/unreadable images are skipped; the cache
    holds the list after. Before: such a cache was refused as stale on reuse."""
    prov = cache_mod.Provenance("efficientnet_lite0", "a" * 64, "percentile", "ort", 0, ("x/1.JPEG", "x/3.JPEG"))
    cache_mod.save(tmp_path / "c.json", prov, {"t": (0.0, 1.0)})
    sample = prov.__class__(**{**prov.__dict__, "images": ("x/1.JPEG", "x/2.JPEG", "x/3.JPEG")})
    assert cache_mod.load(tmp_path / "c.json", sample, images_before_filtering=True) == {"t": (0.0, 1.0)}
    with pytest.raises(ScarletError, match="calibration images"):  # the exact check after loading still applies
        cache_mod.load(tmp_path / "c.json", sample)
    for other in (("x/3.JPEG", "x/1.JPEG"), ("x/1.JPEG", "y/9.JPEG")):  # another order, an image not in the sample
        cache_mod.save(tmp_path / "d.json", prov.__class__(**{**prov.__dict__, "images": other}), {"t": (0.0, 1.0)})
        with pytest.raises(ScarletError, match="calibration images"):
            cache_mod.load(tmp_path / "d.json", sample, images_before_filtering=True)
