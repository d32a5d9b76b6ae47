"""Activation and squeeze-excite layers as SCARLET-NAS writes them.

h-swish and h-sigmoid are spelled out (not nn.Hardswish) so that the exported graph
is the one a user's own SCARLET code produces; export/fuse.py turns them back into
single ONNX ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HSwish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


class HSigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.squeeze_conv = nn.Conv2d(channels, channels // reduction, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.excite_conv = nn.Conv2d(channels // reduction, channels, 1, bias=True)
        self.gate = HSigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(self.excite_conv(self.relu(self.squeeze_conv(self.pool(x)))))
        return x * s


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, eps: float = 1e-5) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=eps)]
