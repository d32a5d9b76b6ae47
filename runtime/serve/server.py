"""Launching the `tritonserver` binary that the PyPI package nvidia-pytriton bundles, and stopping it cleanly.

We drive the binary ourselves with a generated model repository instead of PyTriton's Python API: PyTriton
forwards every batch from Triton's Python-backend stub to the user's process over ZeroMQ (one more copy and
hop), and its package metadata caps numpy below 2, which this project cannot install. The bundled Triton
has only the Python backend, so both served models are Python-backend models running our Runner.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.serve.guard import HttpGuard

LOOPBACK = "127.0.0.1"
INSTALL_HINT = ("install the serving extra: `.venv/bin/python -m pip install -c constraints.txt -e '.[serve]'` and "
                "`.venv/bin/python -m pip install --no-deps -c constraints.txt nvidia-pytriton` (make setup does both)")


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    def __post_init__(self) -> None:
        # Triton would bind the first and fail on the second, reported only as "exited while loading".
        seen: dict[int, str] = {}
        for what, port in self.items():
            if port in seen:
                raise ScarletError(f"the {seen[port]} and {what} ports are both {port}; each of --http-port, "
                                   "--grpc-port and --metrics-port needs a port of its own.")
            seen[port] = what

    def items(self) -> list[tuple[str, int]]:
        return [("HTTP", self.http), ("gRPC", self.grpc), ("metrics", self.metrics)]


@dataclass(frozen=True)
class TritonDist:
    """Where the bundled server lives: the binary, its Python backend, and the stub built for this Python."""

    binary: Path
    python_backend: Path
    stub: Path

    @classmethod
    def find(cls) -> "TritonDist":
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise ScarletError(f"Triton Inference Server is not installed; {INSTALL_HINT}.")
        root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        dist = cls(root / "bin" / "tritonserver", root / "backends" / "python",
                   root / "python_backend_stubs" / version / "triton_python_backend_stub")
        for p in (dist.binary, dist.python_backend / "libtriton_python.so", dist.stub):
            if not p.exists():
                raise ScarletError(f"the Triton install under {root} lacks {p.relative_to(root)} (Python {version}); "
                                   f"reinstall nvidia-pytriton: {INSTALL_HINT}.")
        return dist

    def backend_dir(self, under: Path) -> Path:
        """A backends/ folder whose python/ holds the stub for the running Python (the package ships one per version)."""
        python = under / "backends" / "python"
        python.mkdir(parents=True, exist_ok=True)
        for f in self.python_backend.iterdir():
            if f.is_file():
                (python / f.name).symlink_to(f)
        (python / "triton_python_backend_stub").symlink_to(self.stub)
        # The stub imports numpy (for triton_python_backend_utils) before any model.py can extend its path, and
        # this folder is last on that path: an interpreter without numpy of its own then finds ours.
        import numpy

        for pkg in (Path(numpy.__file__).parent, Path(numpy.__file__).parent.with_name("numpy.libs")):
            if pkg.is_dir():
                (python / pkg.name).symlink_to(pkg)
        return under / "backends"


def check_ports_free(ports: Ports, host: str = LOOPBACK) -> None:
    """Refuse before anything starts if a port is taken (Triton would otherwise start, half-serve and exit)."""
    taken = []
    for what, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # SO_REUSEADDR: a socket left in TIME_WAIT by the last run is not "in use"; a listener is.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise
                taken.append(f"{what} port {port}")
    if taken:
        raise ScarletError(f"{' and '.join(taken)} on {host} {'is' if len(taken) == 1 else 'are'} already in use; stop "
                           "whatever listens there (`ss -ltnp` shows it) or choose other ports with --http-port, "
                           "--grpc-port and --metrics-port.")


def free_ports(host: str = LOOPBACK) -> Ports:
    """Three currently free loopback ports (for tests and `serve-load`)."""
    socks = []
    try:
        for _ in range(3):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return Ports(*(s.getsockname()[1] for s in socks))
    finally:
        for s in socks:
            s.close()


def stub_environment() -> dict[str, str]:
    """The server's environment, fixed for the Python-backend stub.

    The stub links libpython by soname and would find the system's copy (a different patch release than a
    pyenv interpreter, which breaks the stdlib it then imports), so the running interpreter's LIBDIR goes first.
    """
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    return env


@dataclass
class TritonServer:
    """One tritonserver process over `repository`, listening on loopback only unless `host` says otherwise."""

    repository: Path
    ports: Ports = field(default_factory=Ports)
    host: str = LOOPBACK
    log_path: Path | None = None
    exit_timeout_s: int = 5
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self._guard: HttpGuard | None = None
        self._triton_http: int | None = None  # Triton's own HTTP port (loopback), behind the guard on ports.http
        self._work = tempfile.TemporaryDirectory(prefix="scarlet-triton-")
        self._shm_prefix = f"scarlet_{os.getpid()}_{os.urandom(3).hex()}_"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    def command(self, dist: TritonDist) -> list[str]:
        backends = dist.backend_dir(Path(self._work.name))
        return [
            str(dist.binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
            # Triton's HTTP frontend listens on loopback only; the public HTTP port is the guard's (guard.py).
            f"--http-address={LOOPBACK}", f"--grpc-address={self.host}", f"--metrics-address={self.host}",
            f"--http-port={self._triton_http}", f"--grpc-port={self.ports.grpc}", f"--metrics-port={self.ports.metrics}",
            f"--exit-timeout-secs={self.exit_timeout_s}", "--strict-readiness=true",
            # A named shared-memory prefix, so a killed server's regions can be found and removed.
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            # Room for a batch of 32 images up front instead of growing the region 1 MB at a time.
            "--backend-config=python,shm-default-byte-size=33554432",
            "--backend-config=python,shm-growth-byte-size=16777216",
        ]

    def start(self, ready_timeout_s: float = 120.0) -> "TritonServer":
        dist = TritonDist.find()
        check_ports_free(self.ports, self.host)
        self._triton_http = free_ports(LOOPBACK).http
        try:
            self._guard = HttpGuard((self.host, self.ports.http), (LOOPBACK, self._triton_http)).start()
        except OSError as e:
            raise ScarletError(f"HTTP port {self.ports.http} on {self.host} cannot be opened ({e.strerror or e}); "
                               "choose another with --http-port.") from None
        try:
            log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
            try:
                # Own session: signals from the terminal reach only us, and we stop the whole group (stubs included).
                self.proc = subprocess.Popen(self.command(dist), env=stub_environment(), stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            finally:
                if log is not subprocess.DEVNULL:
                    log.close()
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                where = f"see {self.log_path}" if self.log_path else "rerun with --log FILE to see why"
                raise ScarletError(f"tritonserver exited with status {self.proc.returncode} while loading the models; {where}.")
            if self.ready():
                return
            time.sleep(0.25)
        raise ScarletError(f"tritonserver was not ready after {timeout_s:.0f} s; see its log ({self.log_path or 'use --log FILE'}).")

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGINT (Triton unloads its models and its stubs exit), then SIGKILL to the group if it lingers."""
        if self._guard is not None:
            self._guard.stop()
            self._guard = None
        if self.proc is None:
            return None
        timeout_s = timeout_s if timeout_s is not None else self.exit_timeout_s + 10
        pgid = self.proc.pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                self.proc.wait()
        # Stubs share the server's process group; none may outlive it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _group_alive(pgid) and time.monotonic() < deadline:  # SIGKILL is delivered asynchronously
            time.sleep(0.05)
        survived = _group_alive(pgid)
        # Only now that no stub maps them: the regions a killed server could not remove itself.
        for leftover in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
            leftover.unlink(missing_ok=True)
        code, self.proc = self.proc.returncode, None
        self._work.cleanup()
        if survived:
            raise ScarletError(f"processes of Triton's group {pgid} survived SIGKILL; see `ps -o pid,cmd -g {pgid}`.")
        return code

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies still count for killpg; only a running member is a survivor.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def launcher_paths() -> str:
    """The running interpreter's import path as JSON, for the generated model.py files (see repository.py)."""
    return json.dumps([p for p in sys.path if p and os.path.isdir(p)])
