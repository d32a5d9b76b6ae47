"""Seeded weights whose activations are O(1) at every layer.

Random init with default BN statistics (mean 0, var 1) shrinks the signal at every
block: logits end up ~1e-12 and any parity check passes whatever the exporter does.
Here BN affines are random, BN statistics are re-estimated on images, and the
classifier is centred and scaled, so logits are O(1) and top-1 varies across images.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from scarlet_deploy.export.scarlet import LET

SYNTHETIC_IMAGES = 16


def synthetic_images(n: int = SYNTHETIC_IMAGES, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Deterministic image-like tensors (1/f noise, normalised): a data-free stand-in for
    real photos, so seeded weights are the same on every machine."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 3, size, size), np.float32)
    for cells in (4, 8, 16, 32, 64):
        coarse = torch.from_numpy(rng.standard_normal((n, 3, cells, cells)).astype(np.float32))
        out += torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).numpy() * (8.0 / cells)
    out -= out.mean(axis=(2, 3), keepdims=True) * 0.5
    out /= out.std()
    return torch.from_numpy(out)


def sample_images(n: int, preprocess, seed: int = 0) -> tuple[np.ndarray, str]:
    """`n` preprocessed real photos where the shared ImageNet sample is at hand, else `n`
    deterministic synthetic images; with a phrase saying which."""
    from scarlet_deploy.runtime.data.images import default_val_dir, fixed_images
    from scarlet_deploy.runtime.data.preprocess import load_batch

    files = fixed_images(n)
    if len(files) == n:
        return load_batch(files, preprocess), f"{n} images of {default_val_dir()}"
    return synthetic_images(n, seed=seed).numpy(), f"{n} synthetic images (no real images found)"


@torch.no_grad()
def realistic_weights_(model: nn.Module, images: torch.Tensor, seed: int = 0, logit_std: float = 3.0) -> nn.Module:
    """Re-initialise `model` in place (see module docstring); returns it in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the re-estimation batches
    for m in model.modules():
        if isinstance(m, LET):
            # Near the identity, but far enough from it that folding is exercised.
            c = m.conv.in_channels
            m.conv.weight.copy_(torch.eye(c).view_as(m.conv.weight) + torch.randn(c, c, 1, 1, generator=g) * 0.5 / c**0.5)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.eval()
    for bn in bns:
        bn.train()
    for chunk in images.split(16):
        model(chunk)
    for bn in bns:
        bn.momentum = 0.1
    model.eval()

    head = _classifier(model)
    feats = _features(model, head, images)
    w = torch.randn(head.weight.shape, generator=g)
    logits = feats @ w.T
    scale = logit_std / logits.std().clamp_min(1e-12)
    head.weight.copy_(w * scale)
    head.bias.copy_(-(logits * scale).mean(0))
    return model


def _classifier(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1]


def _features(model: nn.Module, head: nn.Linear, images: torch.Tensor) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    try:
        for chunk in images.split(16):
            model(chunk)
    finally:
        hook.remove()
    return torch.cat(captured)
