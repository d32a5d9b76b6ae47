"""PyTorch eager as a Runner: the reference every other backend is compared with."""
from __future__ import annotations

import numpy as np

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
