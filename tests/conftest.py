"""Shared fixtures: real images, realistic models and their exports, built once per session.

SCARLET models get seeded weights with O(1) activations (export.weights): default BN
statistics would make every parity check pass whatever the code does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scarlet_deploy.export.checkpoint import LoadedModel, load_model
from scarlet_deploy.export.onnx_export import ExportConfig, ExportReport, export_model
from scarlet_deploy.export.registry import get_spec
from scarlet_deploy.runtime.data.images import default_val_dir, list_images
from scarlet_deploy.runtime.data.preprocess import load_batch

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _cache_outside_the_checkout(tmp_path_factory):
    """verify's CLI caches references in ./build by default: tests (and the CLIs they start) keep theirs in tmp."""
    import os

    os.environ["SCARLET_CACHE_DIR"] = str(tmp_path_factory.mktemp("scarlet-cache"))
    yield
    os.environ.pop("SCARLET_CACHE_DIR", None)


@pytest.fixture(scope="session")
def val_dir() -> Path:
    d = default_val_dir()
    if d is None:
        pytest.skip("the shared ImageNet sample (../shared/data/imagenet-sample/val) is not beside this checkout")
    return d


@pytest.fixture(scope="session")
def val_files(val_dir) -> list[Path]:
    return list_images(val_dir)


@pytest.fixture(scope="session")
def eval_batch(val_files) -> callable:
    """eval_batch(model_name, n): n real images (not those used for BN statistics), preprocessed."""
    cache: dict = {}

    def get(name: str, n: int = 32) -> np.ndarray:
        key = (get_spec(name).preprocess, n)
        if key not in cache:
            files = val_files[7::max(len(val_files) // n, 1)][:n]
            cache[key] = load_batch(files, get_spec(name).preprocess)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def loaded_model() -> callable:
    """loaded_model(name, let): the seeded (or shipped, for Lite0) model, built once."""
    cache: dict = {}

    def get(name: str, let: bool = False) -> LoadedModel:
        if (name, let) not in cache:
            cache[(name, let)] = load_model(name, let)
        return cache[(name, let)]

    return get


@pytest.fixture(scope="session")
def exported(tmp_path_factory, loaded_model) -> callable:
    """exported(name, let): ExportReport of the model's ONNX in a session tmp dir."""
    out_dir = tmp_path_factory.mktemp("onnx")
    cache: dict = {}

    def get(name: str, let: bool = False) -> ExportReport:
        if (name, let) not in cache:
            out = out_dir / f"{name}{'-let' if let else ''}.onnx"
            cache[(name, let)] = export_model(ExportConfig(name, out, let=let), loaded_model(name, let))
        return cache[(name, let)]

    return get


@pytest.fixture(scope="session")
def lite0_onnx(exported) -> Path:
    return exported("efficientnet_lite0").output


@pytest.fixture(scope="session")
def scarlet_onnx(exported) -> callable:
    return lambda name, let=False: exported(name, let).output


@pytest.fixture(scope="session")
def lite0_reference(val_files, loaded_model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, PyTorch logits, labels) of trained Lite0 on every shared image, computed once:
    PyTorch eager is the slowest part of the suite."""
    from scarlet_deploy.runtime.data.classes import wnid_to_index

    model = loaded_model("efficientnet_lite0").model
    x = load_batch(val_files, get_spec("efficientnet_lite0").preprocess)
    with torch.inference_mode():
        logits = np.concatenate([model(torch.from_numpy(x[i:i + 100])).numpy() for i in range(0, len(x), 100)])
    return x, logits, np.array([wnid_to_index()[f.parent.name] for f in val_files])


@pytest.fixture(scope="session")
def lite0_trt_qdq(lite0_onnx, val_files, tmp_path_factory) -> Path:
    """Lite0's TensorRT-target Q/DQ ONNX (minmax ranges from 32 real images, every layer INT8) with
    the manifest fields `scarlet calibrate` writes: seconds instead of the calibration search."""
    from scarlet_deploy.calib import qdq, ranges, stats
    from scarlet_deploy.runtime.core.artifacts import sha256_file, write_manifest

    spec = get_spec("efficientnet_lite0")
    x = load_batch(val_files[3::max(len(val_files) // 32, 1)][:32], spec.preprocess)  # offset 3: not fixed_images'
    target = qdq.get_target("trt")
    out = tmp_path_factory.mktemp("qdq") / "efficientnet_lite0.int8-trt.onnx"
    qdq.quantize(lite0_onnx, ranges.compute_ranges(stats.collect(lite0_onnx, x, batch=8, threads=2), "minmax",
                                                   target.symmetric), target, out)
    write_manifest(out, {"model": "efficientnet_lite0", "precision": "int8", "target": "trt", "format": "onnx-qdq",
                         "method": "minmax", "source_onnx": str(lite0_onnx),
                         "source_onnx_sha256": sha256_file(lite0_onnx), "sha256": sha256_file(out)})
    return out


@pytest.fixture(scope="session")
def start_scarlet_serve():
    """start_scarlet_serve(args, log) -> (process, ports): `scarlet serve ARGS` on free loopback ports, once Triton
    answers ready (180 s at most). The caller stops it."""
    import subprocess
    import sys
    import time
    import urllib.request

    from scarlet_deploy.runtime.serve.server import free_ports

    def start(args: list[str], log: Path):
        ports = free_ports()
        proc = subprocess.Popen([sys.executable, "-m", "scarlet_deploy.runtime.cli", "serve", *args,
                                 "--http-port", str(ports.http), "--grpc-port", str(ports.grpc),
                                 "--metrics-port", str(ports.metrics), "--max-batch", "8", "--log", str(log)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"scarlet serve exited: {proc.stdout.read()}\n{log.read_text() if log.exists() else ''}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return proc, ports
            except OSError:
                pass
            assert time.monotonic() < deadline, "Triton was not ready within 180 s"
            time.sleep(0.5)

    return start
