from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from scarlet_deploy.runtime.verify.compare import Thresholds


@dataclass
class VerifyConfig:
    model: str
    onnx: list[Path] = field(default_factory=list)
    engines: list[Path] = field(default_factory=list)
    backends: list[str] = field(default_factory=lambda: ["ort"])  # CPU runtimes every ONNX runs on (ONNX_RUNTIMES)
    auto_onnx: Path | None = None  # use every <dir>/<model>*.onnx whose manifest names this model
    let: bool = False
    checkpoint: str | None = None
    seed: int = 0
    val_dir: Path | None = None
    limit: int | None = None
    batch: int = 64
    workers: int | None = None  # decode processes; None: every core
    threads: int | None = None  # inference threads; None: physical cores
    pipeline_parity: bool = True
    thresholds: Thresholds = field(default_factory=Thresholds)
    progress: bool = True
    device: str = "cpu"  # where the PyTorch reference runs: cpu | cuda
    gpu_id: int = 0
    # Reference cache (<cache_dir>/reference) and resume journal (<cache_dir>/verify-resume);
    # None: neither, every row in memory (the CLI passes build/).
    cache_dir: Path | None = None
    reference_cache: bool = True
    resume: bool = False
    chunk_images: int = 256  # images per journal chunk: what an interruption can lose
    reference_only: bool = False  # no backend is fine: evaluate PyTorch alone (the seed's command)
