"""PyTorch eager as a Runner: the reference every other backend is compared with."""
from __future__ import annotations

import numpy as np

from scarlet_deploy.runtime.runners.base import Runner


class TorchRunner(Runner):
    kind = "torch"

    def __init__(self, model, name: str = "pytorch", threads: int | None = None):
        self.model = model.eval()
        self.name = name
        self.threads = threads

    def load(self) -> "TorchRunner":
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        return self

    def infer(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()


def torch_module(module, channels_last: bool):
    """The module in eval mode, in channels_last memory format when asked (a bench setting)."""
    import torch

    module = module.eval()
    return module.to(memory_format=torch.channels_last) if channels_last else module
