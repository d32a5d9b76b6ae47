"""Writing artifacts: atomic files, sha256, JSON manifests, tool versions."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from scarlet_deploy.runtime.core.errors import ScarletError

TOOLS = ("torch", "onnx", "onnxscript", "onnxsim", "onnxruntime", "openvino", "numpy", "opencv-python-headless", "tensorrt")


def sha256_file(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return _sha256(os.path.realpath(path), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, dev: int, ino: int, mtime_ns: int, size: int) -> str:
    # Keyed by inode, modification time and size: one command reads a manifest several times, and a
    # 30 MB model should be hashed once, but a file replaced (atomic writes make a new inode) or
    # rewritten in between is hashed again.
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


def current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


_STREAM = re.compile(r"^/dev/(stdout|stderr|null|fd/\d+)$|^/proc/self/fd/\d+$")


def is_stream(path: str | os.PathLike) -> bool:
    """A name for one of this process's output streams (or /dev/null): written through, never renamed over."""
    return bool(_STREAM.match(os.path.abspath(os.fspath(path))))


def special_file(path: str | os.PathLike) -> str | None:
    """What an existing non-regular file is (following links: "a character device", ...), None otherwise."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, what in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return None


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only on success.

    An interrupted or failed writer leaves neither a partial file nor the temporary. A stream name
    (/dev/stdout, /dev/null, ...) gets the finished bytes written through; any other special file is refused:
    renaming over a device replaces it with a regular file.
    """
    final = Path(final)
    if is_stream(final):
        with tempfile.TemporaryDirectory(prefix="scarlet-out-") as d:
            tmp = Path(d) / final.name
            yield tmp
            sys.stdout.flush()  # what the command printed so far comes first
            # Append: /dev/stdout redirected to a file must not truncate what was printed there.
            with open(final, "ab") as out, open(tmp, "rb") as src:
                shutil.copyfileobj(src, out)
        return
    what = special_file(final)
    if what:
        raise ScarletError(f"{final} is {what}, not a regular file; scarlet writes a file beside it and renames it "
                           "into place, which would replace it. Pass the path of a regular file "
                           "(a report may also go to /dev/stdout).")
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; an artifact is for others too (a Triton server, a CI job), as open() would make it.
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON (RFC 8259 has no NaN or Infinity): a non-finite number is written as null, so every
    reader can parse the file; the report itself must say why a value is missing (verify fails it)."""
    text = json.dumps(finite_or_null(obj), indent=2, sort_keys=False, default=_jsonable, allow_nan=False)
    write_bytes_atomic(path, (text + "\n").encode())


def finite_or_null(obj: Any) -> Any:
    """`obj` with every NaN/Inf float (also inside numpy arrays and scalars) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return finite_or_null(obj.tolist())
    return obj


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


# The key under which a manifest records its own artifact's sha256 (export; fp16 and int8). TensorRT plans
# check their plan_sha256 themselves: a changed plan is rebuilt, not refused.
ARTIFACT_SHA_KEYS = ("onnx_sha256", "sha256")


def read_manifest(artifact: str | os.PathLike, required: bool = False, check: bool = True) -> dict[str, Any] | None:
    """The manifest beside `artifact`. With `check` (the default) its recorded sha256 must be the
    file's: a manifest copied beside another file would lend it the wrong model and preprocessing."""
    path = manifest_path(artifact)
    if not path.exists():
        if required:
            raise ScarletError(f"{artifact} has no manifest ({path.name}); re-create it with the scarlet command that made it.")
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, and UnicodeDecodeError for binary files
        raise ScarletError(f"manifest {path} is unreadable ({e}); delete it and re-create the artifact.") from e
    if not isinstance(manifest, dict):
        raise ScarletError(f"manifest {path} is not a JSON object; delete it and re-create the artifact.")
    if check and os.path.isfile(artifact):
        key = next((k for k in ARTIFACT_SHA_KEYS if isinstance(manifest.get(k), str)), None)
        if key and manifest[key] != sha256_file(artifact):
            raise ScarletError(f"{artifact} is not the file its manifest {path.name} describes (sha256 {sha256_file(artifact)[:16]}, "
                               f"manifest {key} {manifest[key][:16]}): the file was replaced or the manifest copied from "
                               f"another one. Re-create {artifact} with the scarlet command that made it (`scarlet export` "
                               f"for an FP32 ONNX), which writes both together.")
    return manifest
