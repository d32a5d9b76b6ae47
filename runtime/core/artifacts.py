"""Writing artifacts: atomic files, sha256, JSON manifests, tool versions."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Iterator

from scarlet_deploy.runtime.core.errors import ScarletError

TOOLS = ("torch", "onnx", "onnxsim", "onnxruntime", "openvino", "numpy", "opencv-python-headless", "tensorrt")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only on success.

    An interrupted or failed writer leaves neither a partial file nor the temporary.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; an artifact is for others too (a Triton server, a CI job), as open() would make it.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n").encode())


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def manifest_path(artifact: str | os.PathLike) -> Path:
    """The manifest that travels with an artifact: `model.onnx` -> `model.onnx.json`."""
    return Path(str(artifact) + ".json")


def write_manifest(artifact: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    path = manifest_path(artifact)
    write_json_atomic(path, manifest)
    return path


def read_manifest(artifact: str | os.PathLike, required: bool = False) -> dict[str, Any] | None:
    path = manifest_path(artifact)
    if not path.exists():
        if required:
            raise ScarletError(f"{artifact} has no manifest ({path.name}); re-create it with the scarlet command that made it.")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ScarletError(f"manifest {path} is unreadable ({e}); delete it and re-create the artifact.") from e
