"""`scarlet check PACKAGE [--server URL]`: the package proves itself wherever it was copied.

1. Integrity: every file against SHA256SUMS (the `sha256sum -c` format, so a machine without
   scarlet can check the bytes too). A changed, missing or unlisted-but-expected file makes the
   package unusable (exit 2), naming the file.
2. The golden images through the package's preprocessing and artifact (here, or on a live Triton
   serving the package): no NaN/Inf, agreement with PyTorch's logits at or above the package's gate,
   and drift from the deploy-time logits within the bound for the artifact's precision.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.deploy import golden

SUMS = "SHA256SUMS"
DEPLOY_JSON = "deploy.json"


def sha256(path: Path) -> str:
    # Not artifacts.sha256_file: its cache trusts inode, size and mtime, which an in-place edit that
    # restores the mtime keeps; an integrity check reads the bytes every time.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_sums(root: Path) -> None:
    """SHA256SUMS over every file under `root` but itself, sorted, relative POSIX paths."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != SUMS)
    (root / SUMS).write_text("".join(f"{sha256(p)}  {p.relative_to(root).as_posix()}\n" for p in files))


def read_sums(root: Path) -> dict[str, str]:
    path = root / SUMS
    if not root.is_dir():
        raise ScarletError(f"{root} is not a folder: pass the package folder `scarlet deploy` wrote (deploy/<model>).")
    if not path.is_file():
        raise ScarletError(f"{root} has no {SUMS}, so it is not a scarlet deploy package (or it was damaged): "
                           "pass the folder `scarlet deploy -o` wrote, or make it again.")
    out: dict[str, str] = {}
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        rel = PurePosixPath(name)
        if not sep or len(digest) != 64 or rel.is_absolute() or ".." in rel.parts or not name:
            raise ScarletError(f"{path} line {i} is not `<sha256>  <relative path>`: the package is damaged; "
                               "make it again with `scarlet deploy`.")
        out[name] = digest.lower()
    return out


def integrity(root: Path) -> list[str]:
    """Problems with the package's files (empty: every listed file is intact)."""
    sums = read_sums(root)
    problems = []
    for name, digest in sums.items():
        p = root / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif (got := sha256(p)) != digest:
            problems.append(f"{name} was changed (sha256 {got[:16]}..., expected {digest[:16]}...)")
    for needed in (DEPLOY_JSON, golden.PIXELS, golden.REFERENCE, golden.DEPLOYED, golden.THRESHOLDS, golden.PREPROCESS):
        if needed not in sums:
            problems.append(f"{needed} is not listed in {SUMS}")
    return problems


def require_intact(root: Path) -> None:
    """A ScarletError naming every changed or missing file, for whatever reads a package (check, serve)."""
    problems = integrity(root)
    if problems:
        raise ScarletError(f"package {root} is not what `scarlet deploy` wrote: {'; '.join(problems)}. "
                           "Copy it again from the original, or make it again with `scarlet deploy`.")


@dataclass
class CheckResult:
    package: str
    where: str  # "here" or the server URL
    backend: str
    artifact: str
    images: int = 0
    nonfinite: int = 0
    agreement: float | None = None  # percent, with PyTorch's logits
    min_agreement: float | None = None
    drift_max_rel: float | None = None  # max |now - deploy time| / max |deploy time|
    drift_bound: float | None = None
    top1_changed_since_deploy: int | None = None
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}

    def text(self) -> str:
        head = f"{'PASS' if self.passed else 'FAIL'}: {self.package} ({self.backend} over {self.artifact}, {self.where})"
        lines = [head,
                 f"  integrity      every file matches {SUMS}",
                 f"  golden images  {self.images}, non-finite outputs {self.nonfinite}",
                 f"  vs PyTorch     top-1 agreement {_pct(self.agreement)} (gate >= {_pct(self.min_agreement)})",
                 f"  drift          max relative logit change since deploy {_num(self.drift_max_rel)} "
                 f"(bound {_num(self.drift_bound)}), top-1 changed on {self.top1_changed_since_deploy} images",
                 f"  took           {self.seconds:.1f} s"]
        lines += [f"  FAILED: {f}" for f in self.failed]
        return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} %"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def judge(res: CheckResult, out: np.ndarray, ref: np.ndarray, deployed: np.ndarray, thresholds: dict[str, Any]) -> None:
    res.images = len(out)
    finite = np.isfinite(out).all(1)
    res.nonfinite = int((~finite).sum())
    res.min_agreement = float(thresholds["min_agreement"])
    res.drift_bound = float(thresholds["drift_max_rel"])
    if res.nonfinite:
        res.failed.append(f"non-finite logits on {res.nonfinite} of {len(out)} golden images")
        return
    res.agreement = 100.0 * float((out.argmax(1) == ref.argmax(1)).mean())
    res.drift_max_rel = float(np.abs(out.astype(np.float64) - deployed).max() / max(float(np.abs(deployed).max()), 1e-30))
    res.top1_changed_since_deploy = int((out.argmax(1) != deployed.argmax(1)).sum())
    if res.agreement < res.min_agreement:
        res.failed.append(f"top-1 agreement with PyTorch {res.agreement:.1f} % < {res.min_agreement:.1f} %")
    if not res.drift_max_rel <= res.drift_bound:
        res.failed.append(f"logits drifted from their deploy-time values by {res.drift_max_rel:.3g} (relative) > "
                          f"{res.drift_bound:g}: this runtime or CPU does not reproduce the deployed artifact")


def read_deploy(root: Path) -> dict[str, Any]:
    try:
        d = json.loads((root / DEPLOY_JSON).read_text())
        d["package"]["artifact"], d["package"]["backend"]  # noqa: B018 - the keys check needs
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ScarletError(f"{root / DEPLOY_JSON} is unreadable ({e}): the package is damaged; make it again.") from e
    return d


def check_package(root: str | Path, server: str | None = None, threads: int | None = None) -> CheckResult:
    """Integrity first (ScarletError: unusable), then the golden images here or on `server`."""
    t0 = time.perf_counter()
    root = Path(root)
    require_intact(root)
    pkg = read_deploy(root)["package"]
    x, ref, dep, thresholds = golden.load(root)
    res = CheckResult(str(root), server or "here", pkg["backend"], pkg["artifact"])
    if server:
        out = _server_logits(server, pkg["serve_name"], x, int(thresholds["batch"]))
    else:
        out = _local_logits(root, pkg, x, int(thresholds["batch"]), threads)
    judge(res, out, ref, dep, thresholds)
    res.seconds = time.perf_counter() - t0
    return res


def _local_logits(root: Path, pkg: dict[str, Any], x: np.ndarray, batch: int, threads: int | None) -> np.ndarray:
    from scarlet_deploy.runtime.deploy.candidates import get, unavailable
    from scarlet_deploy.runtime.runners.registry import open_runner

    cand = get(pkg["backend"])
    why = unavailable(cand)
    if why:
        raise ScarletError(f"this package runs on {cand.name} ({cand.summary}), which cannot run here: {why}. "
                           "Check it on a machine that can, or make a package for this one with `scarlet deploy`.")
    with open_runner(cand.name, root / pkg["artifact"], threads=threads) as r:
        return golden.batches(r, x, batch)


def _server_logits(url: str, model: str, x: np.ndarray, batch: int) -> np.ndarray:
    """The golden images through a live Triton's tensor model (`scarlet serve --package`, or your own)."""
    scheme, _, address = url.partition("://")
    if not address:
        scheme, address = "http", url
    if scheme not in ("http", "grpc"):
        raise ScarletError(f"--server {url}: use http://HOST:PORT (Triton's HTTP port) or grpc://HOST:PORT.")
    try:
        if scheme == "grpc":
            import tritonclient.grpc as client
        else:
            import tritonclient.http as client
    except ImportError as e:
        raise ScarletError(f"--server needs tritonclient ({e}): pip install -c constraints.txt 'scarlet-deploy[serve]'.") from e
    try:
        c = client.InferenceServerClient(address)
        if not c.is_model_ready(model):
            raise ScarletError(f"Triton at {url} is up but model {model!r} is not ready: serve the package with "
                               f"`scarlet serve --package PACKAGE` (or load its triton/ repository).")
        out = []
        for i in range(0, len(x), batch):
            inp = client.InferInput("input", list(x[i:i + batch].shape), "FP32")
            inp.set_data_from_numpy(np.ascontiguousarray(x[i:i + batch]))
            res = c.infer(model, [inp], outputs=[client.InferRequestedOutput("logits")])
            out.append(res.as_numpy("logits"))
    except ScarletError:
        raise
    except Exception as e:  # noqa: BLE001 - tritonclient raises its own and socket errors alike
        raise ScarletError(f"cannot check against Triton at {url}: {e}. Is the server up, and is it the HTTP "
                           "(http://) or gRPC (grpc://) port?") from e
    return np.concatenate(out).astype(np.float32)
