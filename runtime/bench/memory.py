from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from typing import Any

from scarlet_deploy.runtime.bench.plan import Artifact, BenchConfig, bench_input
from scarlet_deploy.runtime.runners.ort import OrtOptions
from scarlet_deploy.runtime.runners.pytorch import torch_module
from scarlet_deploy.runtime.runners.registry import open_runner


def _status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the peak-RSS high-water mark to the current RSS
        return True
    except OSError:
        return False


def _probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh interpreter: peak RSS growth of loading and running one backend."""
    backend = spec["backend"]
    if backend.startswith("torch"):
        import torch  # noqa: F401  (imported before the baseline: library code is not the model's memory)
    elif backend.startswith("ov"):
        import openvino  # noqa: F401
    else:
        import onnxruntime  # noqa: F401
    base = _status_kb()["VmRSS"]
    reset = _reset_hwm()
    if backend.startswith("torch"):  # same architecture and tensor sizes as the trained model; values do not matter
        from scarlet_deploy.export.registry import get_spec

        module = torch_module(get_spec(spec["model"]).create(), spec["channels_last"])
    else:
        module = None
    peaks = {}
    with open_runner(backend, spec["path"], threads=spec["threads"], ort=OrtOptions(**spec["ort"]), module=module) as runner:
        for b in spec["batches"]:  # ascending: the peak after batch b is what serving batches <= b needs
            runner.infer(bench_input(b, size=spec["size"]))
            runner.infer(bench_input(b, size=spec["size"]))  # arenas may grow on the second call as well
            peaks[str(b)] = (_status_kb()["VmHWM"] - base) / 1024
    return {"peak_mb": peaks, "baseline_mb": base / 1024, "hwm_reset": reset}


def measure_memory(model: str, backend: str, art: Artifact, cfg: BenchConfig, size: int = 224) -> dict[str, Any]:
    spec = {"model": model, "backend": backend, "path": str(art.path) if art.path else None,
            "batches": cfg.batches, "threads": cfg.threads, "size": size, "ort": asdict(cfg.ort), "channels_last": cfg.torch_channels_last}
    proc = subprocess.run([sys.executable, "-m", "scarlet_deploy.runtime.bench.memory", "--memory-probe", json.dumps(spec)],
                          capture_output=True, text=True, check=False)  # in our working directory: build paths are relative to it
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": f"memory probe failed: {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__" and sys.argv[1:2] == ["--memory-probe"]:
    print(json.dumps(_probe(json.loads(sys.argv[2]))))
