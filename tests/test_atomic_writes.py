from __future__ import annotations

import os
import stat

import pytest

from scarlet_deploy.runtime.core.artifacts import atomic_path, write_bytes_atomic


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
