"""PyTorch as a Runner: eager (the reference every other backend is compared with) and
torch.compile (the baseline a PyTorch user would try first for CPU speed)."""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.host import HOST, cpu_isa
from scarlet_deploy.runtime.runners.base import Runner


class TorchRunner(Runner):
    kind = "torch"

    def __init__(self, model, name: str = "pytorch", threads: int | None = None, device: str = "cpu"):
        self.model = model.eval()
        self.name = name
        self.threads = threads
        self.device = device  # "cpu" or "cuda:<n>"

    def load(self) -> "TorchRunner":
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        if self.device != "cpu":
            # TF32 (cuDNN's default for convolutions) keeps 10 mantissa bits: a reference that inexact
            # would fail FP32 ONNX models on the 1e-3 gate for its own error. Process-wide, like the flags.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            self.model.to(self.device)
        return self

    def infer(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
            if self.device == "cpu":
                return self.model(t).numpy()
            return self.model(t.to(self.device)).float().cpu().numpy()

    def close(self) -> None:
        if self.device != "cpu":
            self.model.to("cpu")  # the caller's module, as it was given


def torch_module(module, channels_last: bool):
    """The module in eval mode, in channels_last memory format when asked (a bench setting)."""
    import torch

    module = module.eval()
    return module.to(memory_format=torch.channels_last) if channels_last else module


COMPILE_BACKENDS = ("torch-compile", "torch-compile-bf16")


def torch_compile_unavailable(backend: str, isa: dict[str, bool] | None | object = HOST,
                              compiler: str | None | object = HOST) -> str | None:
    """Why `backend` (torch-compile, torch-compile-bf16) cannot run here, or None: a skip reason.

    Inductor writes C++ and builds it with the host's compiler (CXX, else g++): without one,
    torch.compile fails on the first call. bf16 autocast runs where the CPU has native bf16
    dot products only; elsewhere oneDNN emulates it, and the row would time an emulation.
    """
    import shutil

    compiler = (os.environ.get("CXX") or shutil.which("g++")) if compiler is HOST else compiler
    if not compiler:
        return ("torch.compile (Inductor) needs a C++ compiler to build its CPU kernels and none was found "
                "(no $CXX, no g++ on PATH); install g++ (apt-get install g++) to measure it")
    if backend.endswith("bf16"):
        isa = cpu_isa() if isa is HOST else isa
        if isa is None:
            return f"this CPU's flags cannot be read (no /proc/cpuinfo): {backend} is skipped"
        if not (isa["BF16"] or isa["AMX-BF16"]):
            return (f"this CPU has no native bf16 (avx512_bf16 or amx_bf16 not in /proc/cpuinfo flags), so {backend} "
                    "is skipped: bf16 autocast would time an emulation")
    return None


class TorchCompileRunner(TorchRunner):
    """torch.compile (Inductor) as a PyTorch user would try it for CPU speed: frozen weights
    (torch._inductor.config.freezing, so weights are constants Inductor can prepack and fold),
    under torch.no_grad (freezing needs it), FP32 or bf16 autocast.

    Each batch size is compiled once (dynamic=False: static shapes, as OpenVINO's per-batch
    models); its compile time is kept in `compile_s`, so reports state it while timings exclude it.
    """
    kind = "torch"

    def __init__(self, model, name: str = "torch-compile", threads: int | None = None, precision: str = "fp32"):
        super().__init__(model, name=name, threads=threads)
        self.precision = precision  # fp32 | bf16 (autocast)
        self.compiled = None
        self.compile_s: dict[int, float] = {}

    def load(self) -> "TorchCompileRunner":
        import torch
        import torch._inductor.config as inductor_config

        super().load()
        if self.compiled is None:
            reason = torch_compile_unavailable(self.name if self.name in COMPILE_BACKENDS else
                                               ("torch-compile-bf16" if self.precision == "bf16" else "torch-compile"))
            if reason:
                raise ScarletError(reason + ".")
            inductor_config.freezing = True  # process-wide, as a user sets it; eager runners do not read it
            self.compiled = torch.compile(self.model, dynamic=False)
        return self

    def infer(self, x: np.ndarray) -> np.ndarray:
        import contextlib

        import torch

        if self.compiled is None:
            self.load()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16" else contextlib.nullcontext()
        first = x.shape[0] not in self.compile_s
        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            try:
                y = self.compiled(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
            except Exception as e:  # Inductor's build errors come in many types; one sentence, not a traceback
                if first:
                    raise ScarletError(f"torch.compile failed for batch {x.shape[0]}: {str(e).splitlines()[0]}.") from e
                raise
        if first:
            self.compile_s[x.shape[0]] = time.perf_counter() - t0
        return y.float().numpy()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "precision": self.precision, "freezing": True,
                "compile_s": {str(b): s for b, s in self.compile_s.items()}}
