"""`scarlet doctor`: what this machine can run, in a few seconds, without changing anything.

Python and package versions, the CPU's instruction sets, onnxruntime's providers, OpenVINO and which
of its backends run here, torch's
CUDA, TensorRT (or why it is missing), cuda-python, each GPU with its compute capability and
free memory, free RAM and disk. It always exits 0: it is the first command to run on a new
machine (a lent GPU machine has no network, so what it finds is what there is), and
`scarlet gpu-check` starts its report with it.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.paths import check_outputs
from scarlet_deploy.runtime.core.host import cpu_isa, isa_text, physical_cores
from scarlet_deploy.runtime.core.report import markdown_table
from scarlet_deploy.runtime.runners.openvino import OV_BACKENDS, openvino_missing, ov_unavailable
from scarlet_deploy.runtime.runners.trt import import_cudart, import_tensorrt

PACKAGES = ("scarlet-deploy", "torch", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxconverter-common", "openvino",
            "opencv-python-headless", "tensorrt", "tensorrt-cu13", "tensorrt-cu12", "cuda-python", "cuda-bindings",
            "nvidia-modelopt")
NVIDIA_SMI_TIMEOUT_S = 10


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _meminfo() -> dict[str, float] | None:
    try:
        with open("/proc/meminfo") as f:
            kb = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in f)}
    except (OSError, ValueError):
        return None
    return {"total_gb": round(kb["MemTotal"] / 2**20, 1), "available_gb": round(kb.get("MemAvailable", 0) / 2**20, 1)}


def _disk(path: Path) -> dict[str, Any]:
    p = path.resolve()
    while not p.exists():  # the build dir may not exist yet: its nearest existing parent holds it
        p = p.parent
    u = shutil.disk_usage(p)
    return {"path": str(p), "free_gb": round(u.free / 2**30, 1), "total_gb": round(u.total / 2**30, 1)}


def _torch() -> dict[str, Any]:
    try:
        import torch
    except ImportError as e:
        return {"error": f"import torch failed: {e}"}
    out: dict[str, Any] = {"version": torch.__version__, "cuda_build": torch.version.cuda}
    try:
        out["cuda_available"] = bool(torch.cuda.is_available())
        out["devices"] = [f"{torch.cuda.get_device_name(i)} (compute capability "
                          f"{'.'.join(map(str, torch.cuda.get_device_capability(i)))})"
                          for i in range(torch.cuda.device_count())]
    except (RuntimeError, AssertionError) as e:  # what torch's CUDA initialisation raises on a broken driver
        out["cuda_available"], out["error"] = False, f"{type(e).__name__}: {e}"
    return out


def _onnxruntime() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError as e:
        return {"error": f"import onnxruntime failed: {e}"}
    return {"version": ort.__version__, "providers": ort.get_available_providers()}


def _openvino() -> dict[str, Any]:
    missing = openvino_missing()
    if missing:
        return {"error": missing}
    import openvino as ov

    return {"version": ov.get_version(),
            "cpu_capabilities": list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
            "backends": {b: ov_unavailable(b) or "runs here" for b in OV_BACKENDS}}


def _tensorrt() -> dict[str, Any]:
    try:
        return {"version": import_tensorrt().__version__}
    except ScarletError as e:
        return {"error": str(e)}


def _cuda_python() -> dict[str, Any]:
    """cuda-python's view: driver version and each device with its compute capability and free memory."""
    try:
        cudart = import_cudart()
    except ScarletError as e:
        return {"error": str(e)}
    ok = cudart.cudaError_t.cudaSuccess
    out: dict[str, Any] = {"version": _version("cuda-bindings") or _version("cuda-python")}
    err, driver = cudart.cudaDriverGetVersion()
    out["driver_cuda"] = f"{driver // 1000}.{driver % 1000 // 10}" if err == ok and driver else None
    err, count = cudart.cudaGetDeviceCount()
    if err != ok:
        out["error"] = f"cudaGetDeviceCount: {cudart.cudaGetErrorName(err)[1].decode()}"
        return out
    out["devices"] = []
    for i in range(count):
        err, props = cudart.cudaGetDeviceProperties(i)
        if err != ok:
            continue
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        dev = {"index": i, "name": name.split("\x00")[0].strip(), "compute_capability": f"{props.major}.{props.minor}",
               "memory_total_gb": round(props.totalGlobalMem / 2**30, 1)}
        if cudart.cudaSetDevice(i)[0] == ok:
            err, free, _total = cudart.cudaMemGetInfo()
            if err == ok:
                dev["memory_free_gb"] = round(free / 2**30, 1)
        out["devices"].append(dev)
    return out


def _nvidia_smi() -> dict[str, Any]:
    """The driver's view, which needs no Python package at all."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"error": "nvidia-smi not found (no NVIDIA driver installed, or not on PATH)"}
    fields = "index,name,compute_cap,memory.total,memory.free,driver_version"
    try:
        r = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"], capture_output=True,
                           text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"nvidia-smi failed: {e}"}
    if r.returncode != 0:
        return {"error": f"nvidia-smi exited {r.returncode}: {(r.stderr or r.stdout).strip()[:300]}"}
    gpus = []
    for line in r.stdout.strip().splitlines():
        v = [x.strip() for x in line.split(",")]
        if len(v) == 6:
            gpus.append({"index": int(v[0]), "name": v[1], "compute_capability": v[2],
                         "memory_total_gb": round(float(v[3]) / 1024, 1), "memory_free_gb": round(float(v[4]) / 1024, 1),
                         "driver": v[5]})
    return {"gpus": gpus}


def missing_for_tensorrt(report: dict[str, Any]) -> list[str]:
    """What running TensorRT plans here still lacks, one precise item each (empty: nothing)."""
    missing = []
    if "error" in report["tensorrt"]:
        missing.append(report["tensorrt"]["error"].rstrip("."))
    cp = report["cuda_python"]
    if "devices" not in cp:
        missing.append(cp.get("error", "cuda-python cannot query the GPUs").rstrip("."))
    elif not cp["devices"]:
        smi = report["nvidia_smi"].get("error") or "nvidia-smi lists " + (
            ", ".join(g["name"] for g in report["nvidia_smi"].get("gpus", [])) or "no GPU")
        missing.append(f"no CUDA GPU visible to cuda-python ({smi}; CUDA_VISIBLE_DEVICES="
                       f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return missing


def probe(build_dir: str | os.PathLike = ".") -> dict[str, Any]:
    """Everything `scarlet doctor` reports, as a dict (JSON-ready)."""
    from scarlet_deploy.runtime.core.report import environment

    isa = cpu_isa()
    report: dict[str, Any] = {
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "packages": {p: v for p in PACKAGES if (v := _version(p))},
        "cpu": {"model": environment()["machine"]["cpu"], "logical_cpus": os.cpu_count(),
                "physical_cores": physical_cores(), "isa": isa, "isa_text": isa_text(isa)},
        "memory": _meminfo(),
        "disk": _disk(Path(build_dir)),
        "onnxruntime": _onnxruntime(),
        "openvino": _openvino(),
        "torch": _torch(),
        "tensorrt": _tensorrt(),
        "cuda_python": _cuda_python(),
        "nvidia_smi": _nvidia_smi(),
    }
    report["tensorrt_ready"] = not (missing := missing_for_tensorrt(report))
    report["missing_for_tensorrt"] = missing
    return report


def _gpu_lines(r: dict[str, Any]) -> list[str]:
    devices = r["cuda_python"].get("devices") or r["nvidia_smi"].get("gpus") or []
    return [f"{d['name']} (compute capability {d['compute_capability']}, "
            f"{d.get('memory_free_gb', '?')} of {d['memory_total_gb']} GB free)" for d in devices]


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """(item, finding) pairs, the same for the terminal and the markdown report."""
    torch_ = r["torch"]
    torch_text = torch_.get("error") or (
        f"{torch_['version']}, CUDA build {torch_['cuda_build'] or 'none (CPU build)'}, "
        f"CUDA {'available: ' + ', '.join(torch_['devices']) if torch_.get('cuda_available') else 'not available'}")
    ort_, ov_ = r["onnxruntime"], r["openvino"]
    mem, disk = r["memory"], r["disk"]
    cp = r["cuda_python"]
    cuda_text = cp.get("error") if "devices" not in cp else f"{cp['version']}, driver CUDA {cp['driver_cuda']}"
    return [
        ("python", f"{r['python']['version']} ({r['python']['executable']})"),
        ("packages", ", ".join(f"{k} {v}" for k, v in r["packages"].items())),
        ("cpu", f"{r['cpu']['model']}, {r['cpu']['physical_cores']} cores / {r['cpu']['logical_cpus']} threads"),
        ("cpu isa", r["cpu"]["isa_text"]),
        ("onnxruntime", ort_.get("error") or f"{ort_['version']}, providers {', '.join(ort_['providers'])}"),
        ("openvino", ov_.get("error") or f"{ov_['version']}, CPU capabilities {', '.join(ov_['cpu_capabilities'])}; "
         + "; ".join(f"{b}: {why}" for b, why in ov_["backends"].items())),
        ("torch", torch_text),
        ("tensorrt", r["tensorrt"].get("error") or r["tensorrt"]["version"]),
        ("cuda-python", cuda_text),
        ("gpu", "; ".join(_gpu_lines(r)) or r["nvidia_smi"].get("error") or "none"),
        ("driver", ", ".join(sorted({g["driver"] for g in r["nvidia_smi"].get("gpus", [])})) or "-"),
        ("memory", f"{mem['available_gb']} of {mem['total_gb']} GB available" if mem else "unknown"),
        ("disk", f"{disk['free_gb']} of {disk['total_gb']} GB free at {disk['path']}"),
        ("tensorrt plans", "can be built and run here" if r["tensorrt_ready"] else
         "cannot run here: " + "; ".join(r["missing_for_tensorrt"])),
    ]


def text(r: dict[str, Any]) -> str:
    return "\n".join(f"{k:>15}: {v}" for k, v in rows(r))


def markdown(r: dict[str, Any]) -> str:
    return markdown_table(["item", "found"], rows(r))


def register(sub) -> None:
    p = sub.add_parser("doctor", help="what this machine can run (Python, packages, CPU ISA, onnxruntime, torch CUDA, "
                                      "TensorRT, GPUs, memory, disk); always exits 0",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--build-dir", type=Path, default=Path("build"), help="where free disk space matters (default build)")
    p.add_argument("--json", type=Path, help="also write the findings as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from scarlet_deploy.runtime.core.artifacts import write_json_atomic

    if args.json:
        check_outputs([("--json", args.json)])
    r = probe(args.build_dir)
    print(text(r))
    if args.json:
        write_json_atomic(args.json, r)
    return 0
