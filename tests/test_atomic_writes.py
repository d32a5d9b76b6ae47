from __future__ import annotations

import builtins
import errno
import io
import os
import stat

import pytest

from scarlet_deploy.runtime.core.artifacts import atomic_path, read_manifest, write_bytes_atomic, write_manifest


def test_an_artifact_gets_the_mode_open_would_give_it(tmp_path):
    old = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "m.onnx", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.onnx").stat().st_mode) == 0o644


def test_a_failed_writer_leaves_neither_the_file_nor_its_temporary(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "m.onnx") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert (tmp_path / "m.onnx").read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["m.onnx"]


class _DiskFullHalfway:
    """A file whose first write stores half its data and then fails, as a full disk or a crash mid-write would."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _fail_writes_under(monkeypatch, folder):
    real_open = io.open

    def opener(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+") and str(file).startswith(str(folder)):
            return _DiskFullHalfway(f)
        return f

    monkeypatch.setattr(io, "open", opener)
    monkeypatch.setattr(builtins, "open", opener)


OLD = {"model": "scarlet_a", "precision": "fp32", "sha256": "0" * 64}
NEW = {"model": "scarlet_a", "precision": "int8", "sha256": "1" * 64, "calibration": {"images": list(range(500))}}


@pytest.mark.parametrize("failure", ["write", "rename"])
def test_a_manifest_rewrite_that_fails_halfway_leaves_the_old_manifest_whole_and_no_temporary(tmp_path, monkeypatch,
                                                                                              failure):
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"onnx")
    write_manifest(artifact, OLD)
    if failure == "write":
        _fail_writes_under(monkeypatch, tmp_path)
    else:
        def no_rename(*a, **k):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "replace", no_rename)
        monkeypatch.setattr(os, "rename", no_rename)
    with pytest.raises(OSError):
        write_manifest(artifact, NEW)
    monkeypatch.undo()
    assert read_manifest(artifact, check=False) == OLD, "the manifest beside the artifact is the old one, whole"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.json"], "no partial or temporary file left"
    write_manifest(artifact, NEW)  # and the next write goes through
    assert read_manifest(artifact, check=False) == NEW


def test_a_first_manifest_that_fails_halfway_leaves_no_manifest(tmp_path, monkeypatch):
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"onnx")
    _fail_writes_under(monkeypatch, tmp_path)
    with pytest.raises(OSError):
        write_manifest(artifact, NEW)
    monkeypatch.undo()
    assert read_manifest(artifact) is None and sorted(os.listdir(tmp_path)) == ["model.onnx"]
