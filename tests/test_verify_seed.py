"""verify the way SCARLET-NAS's verify.py is run: its command line, a cached reference, resumable runs."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scarlet_deploy.runtime.cli import main
from scarlet_deploy.runtime.verify import config as vcfg
from scarlet_deploy.runtime.verify import report as vrep
from scarlet_deploy.runtime.verify import run as vrun
from scarlet_deploy.runtime.verify.journal import Journal

LITE0 = "efficientnet_lite0"
SEED_LINE = re.compile(r"^Evaluate Result: Total: (\d+)\tmTop1: (\d+\.\d{4})\tmTop5: (\d+\.\d{6})$")
TIMING = {"inference_seconds", "images_per_s", "read_seconds", "source", "cache", "computed", "device", "machine",
          "torch"}


def _link_folder(root: Path, val_dir: Path, n: int) -> Path:
    """n real images, one per class spread over the sample, as ROOT/<wnid>/<file> symlinks."""
    folders = sorted(d for d in val_dir.iterdir() if d.is_dir())
    for d in folders[:: len(folders) // n][:n]:
        f = next(iter(sorted(d.iterdir())))
        (root / d.name).mkdir(parents=True)
        os.symlink(f, root / d.name / f.name)
    return root


def _numbers(report: dict) -> dict:
    """A report without what depends on the clock, the session or the machine."""
    def strip(d):
        return {k: v for k, v in d.items() if k not in TIMING} if d else d

    return {"reference": strip(report["reference"]), "backends": [strip(b) for b in report["backends"]],
            "pipeline": strip(report["pipeline"]), "skipped": report["skipped"], "dataset": report["dataset"],
            "passed": report["passed"]}


def test_the_seed_result_line_is_the_seeds_format():
    r = vrun.VerifyReport(model={}, dataset={}, reference={"images": 50000, "top1": 0.76912, "top5": 0.9331234},
                          backends=[], pipeline=None, skipped=[], run={}, thresholds={}, notes=[], environment={})
    # verify.py: '... Total: %d\tmTop1: %.4f\tmTop5: %.6f' % (count, top-1 %, top-5 %)
    assert vrep.seed_result_line(r) == "Evaluate Result: Total: 50000\tmTop1: 76.9120\tmTop5: 93.312340"
    r.reference = {"images": 0, "top1": None, "top5": None}  # unlabelled photos: the seed has no line to print
    assert vrep.seed_result_line(r) is None


def test_device_cuda_without_a_gpu_is_one_paragraph_and_exit_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: --device cuda is expected to work here")
    rc = main(["verify", "--model", "Scarlet_A", "--device", "cuda", "--gpu-id", "0", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --device cuda") and "--device cpu" in err and "Traceback" not in err


def test_our_flag_and_the_seeds_spelling_must_agree(capsys):
    rc = main(["verify", "--model", "scarlet_a", "--batch", "8", "--batch-size", "16", "--quiet"])
    assert rc == 2 and "disagree" in capsys.readouterr().err


@pytest.mark.slow
def test_the_seed_command_prints_its_line_and_a_second_check_reuses_the_reference(tmp_path, val_dir, loaded_model,
                                                                               capsys):
    from scarlet_deploy.export.checkpoint import load_model
    from scarlet_deploy.export.onnx_export import ExportConfig, export_model

    # An official-format checkpoint of seeded SCARLET-A weights, an ILSVRC2012 root with the seed's valid/.
    ckpt = tmp_path / "ScarletA.pth.tar"
    torch.save({"model_state": loaded_model("scarlet_a").model.state_dict()}, ckpt)
    root = tmp_path / "ILSVRC2012"
    _link_folder(root / "valid", val_dir, 8)
    _link_folder(root / "val", val_dir, 3)  # the seed reads valid/; so do we
    seed_cmd = ["verify", "--model", "Scarlet_A", "--device", "cpu", "--val-dataset-root", str(root),
                "--pretrained-path", str(ckpt), "--batch-size", "4", "--cache-dir", str(tmp_path / "build"),
                "--workers", "0", "--quiet"]
    assert main([*seed_cmd, "--json", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    first = json.loads((tmp_path / "a.json").read_text())
    m = SEED_LINE.match(out[-1])
    assert m, out[-1]
    ref = first["reference"]
    assert int(m[1]) == ref["images"] == 8 and first["dataset"]["root"] == str(root / "valid")
    assert float(m[2]) == pytest.approx(100 * ref["top1"], abs=5e-5) and float(m[3]) == pytest.approx(100 * ref["top5"])
    assert ref["source"] == "computed on cpu" and ref["cache"] and first["backends"] == []
    assert "PyTorch reference only" in "\n".join(out)

    onnx = tmp_path / "scarlet_a.onnx"
    export_model(ExportConfig("scarlet_a", onnx, checkpoint=str(ckpt)), load_model("scarlet_a", checkpoint=str(ckpt)))
    assert main([*seed_cmd, "--onnx", str(onnx), "--json", str(tmp_path / "b.json")]) == 0
    out2 = capsys.readouterr().out.strip().splitlines()
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["reference"]["source"] == "cache" and second["reference"]["cache"] == ref["cache"]
    assert out2[-1] == out[-1]  # the seed's line, from the cached logits
    b = second["backends"][0]
    assert b["passed"] and b["top1"] == ref["top1"] and b["top1_agreement"] == 1.0

    # PyTorch alone with its logits cached: nothing to decode or run, the same line.
    assert main([*seed_cmd, "--json", str(tmp_path / "d.json")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == out[-1]
    assert json.loads((tmp_path / "d.json").read_text())["reference"]["source"] == "cache"

    assert main([*seed_cmd, "--no-reference-cache", "--json", str(tmp_path / "c.json")]) == 0
    third = json.loads((tmp_path / "c.json").read_text())
    assert third["reference"]["source"] == "computed on cpu" and third["reference"]["cache"] is None
    assert _numbers(third)["reference"] == _numbers(first)["reference"]


@pytest.mark.slow
def test_an_interrupted_run_resumed_gives_the_uninterrupted_report(tmp_path, val_dir, lite0_onnx, loaded_model,
                                                                  monkeypatch):
    folder = _link_folder(tmp_path / "val", val_dir, 10)
    (folder / next(iter(sorted(os.listdir(folder)))) / "corrupt.JPEG").write_bytes(b"\xff\xd8 truncated")

    def cfg(cache: str, resume: bool = False) -> vcfg.VerifyConfig:
        return vcfg.VerifyConfig(LITE0, onnx=[lite0_onnx], val_dir=folder, batch=3, chunk_images=3, workers=0,
                                 progress=False, cache_dir=tmp_path / cache, resume=resume)

    whole = vrun.verify(cfg("a"), loaded_model(LITE0)).as_dict()

    real_append, calls = Journal.append, []

    def append_then_stop(self, rows, scalars):  # Ctrl-C right after the second chunk is on disk
        real_append(self, rows, scalars)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Journal, "append", append_then_stop)
    with pytest.raises(KeyboardInterrupt):
        vrun.verify(cfg("b"), loaded_model(LITE0))
    monkeypatch.setattr(Journal, "append", real_append)
    assert not list((tmp_path / "b" / "reference").glob("efficientnet_lite0-*"))  # partial only, never found
    assert list((tmp_path / "b" / "reference").glob(".partial-*"))
    resumed = vrun.verify(cfg("b", resume=True), loaded_model(LITE0)).as_dict()

    # Two chunks done: 3 images plus the corrupt one (a chunk closes at >= 3), then 3.
    assert resumed["run"]["resumed_images"] == 7 and whole["run"]["resumed_images"] == 0
    assert any(n.startswith("resumed: 7 images") for n in resumed["notes"])
    assert _numbers(resumed) == _numbers(whole)
    assert resumed["dataset"]["skipped"] == 1 and resumed["backends"][0]["images"] == 10
    # The reference computed over two sessions was cached whole, row for row what one session computes.
    a = np.load(Path(whole["reference"]["cache"]) / "logits.npy")
    b = np.load(Path(resumed["reference"]["cache"]) / "logits.npy")
    np.testing.assert_array_equal(a, b)
    assert not list((tmp_path / "b" / "verify-resume").iterdir())  # the journal is gone once the run completed


@pytest.mark.slow
def test_a_killed_cli_run_resumes(tmp_path, val_dir, lite0_onnx):
    folder = _link_folder(tmp_path / "val", val_dir, 12)
    cmd = [sys.executable, "-m", "scarlet_deploy.runtime.cli", "verify", "--model", LITE0, "--onnx", str(lite0_onnx),
           "--val-dir", str(folder), "--batch", "2", "--chunk-images", "2", "--workers", "0", "--threads", "1",
           "--no-pipeline-parity", "--cache-dir", str(tmp_path / "build"), "--quiet"]
    journal = tmp_path / "build" / "verify-resume"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and len(list(journal.glob("*/chunk-*.npz"))) < 2:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: only what is already on disk survives
    proc.wait()
    done = len(list(journal.glob("*/chunk-*.npz")))
    assert 2 <= done < 6
    r = subprocess.run([*cmd, "--resume", "--json", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    resumed = json.loads((tmp_path / "r.json").read_text())
    assert resumed["run"]["resumed_images"] == 2 * done
    r = subprocess.run([*cmd, "--no-reference-cache", "--json", str(tmp_path / "w.json")], capture_output=True,
                       text=True)
    whole = json.loads((tmp_path / "w.json").read_text())
    assert _numbers(resumed) == _numbers(whole)
