"""SCARLET-A/B/C as data: one block table per model, one builder.

Module names follow the SCARLET-NAS release so official checkpoints load unchanged:
`stem`, `separable_conv`, `mb_module.{i}`, `conv_before_pooling`, `classifier`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from scarlet_deploy.export.layers import HSwish, SqueezeExcite, conv_bn


@dataclass(frozen=True)
class Block:
    """One of the 19 searchable slots: an InvertedResidual, or None for identity."""

    expansion: int
    out: int
    kernel: int
    stride: int
    se: bool


I = None  # an identity slot (a LET when built with let=True)


def _t(*rows: Optional[tuple]) -> tuple[Optional[Block], ...]:
    return tuple(None if r is None else Block(r[0], r[1], r[2], r[3], r[4] == "y") for r in rows)


SCARLET_TABLES: dict[str, tuple[Optional[Block], ...]] = {
    "scarlet_a": _t(
        (3, 32, 7, 2, "n"), (6, 32, 5, 1, "n"), (3, 40, 5, 2, "n"), (3, 40, 7, 1, "y"), (6, 40, 3, 1, "y"),
        (3, 40, 5, 1, "y"), (6, 80, 3, 2, "y"), (3, 80, 3, 1, "n"), (3, 80, 7, 1, "y"), (3, 80, 7, 1, "n"),
        (3, 96, 5, 1, "n"), (3, 96, 7, 1, "y"), (3, 96, 3, 1, "n"), (3, 96, 7, 1, "y"), (6, 192, 3, 2, "y"),
        (6, 192, 5, 1, "y"), (3, 192, 3, 1, "y"), (6, 192, 3, 1, "y"), (6, 320, 7, 1, "y"),
    ),
    "scarlet_b": _t(
        (3, 32, 3, 2, "y"), (3, 32, 5, 1, "y"), (3, 40, 3, 2, "y"), (6, 40, 7, 1, "y"), (3, 40, 3, 1, "n"),
        (3, 40, 5, 1, "n"), (6, 80, 7, 2, "y"), (3, 80, 3, 1, "y"), I, (3, 80, 5, 1, "n"),
        (3, 96, 3, 1, "y"), (3, 96, 3, 1, "y"), (6, 96, 7, 1, "y"), (3, 96, 3, 1, "y"), (6, 192, 5, 2, "y"),
        (6, 192, 5, 1, "y"), I, (6, 192, 7, 1, "y"), (6, 320, 5, 1, "y"),
    ),
    "scarlet_c": _t(
        (3, 32, 5, 2, "y"), (3, 32, 3, 1, "y"), (3, 40, 5, 2, "y"), I, I,
        (3, 40, 3, 1, "n"), (6, 80, 7, 2, "y"), (3, 80, 3, 1, "y"), (3, 80, 3, 1, "y"), (3, 80, 5, 1, "n"),
        (3, 96, 7, 1, "y"), (3, 96, 7, 1, "n"), (3, 96, 3, 1, "y"), (3, 96, 7, 1, "y"), (3, 192, 3, 2, "y"),
        I, (6, 192, 3, 1, "y"), (6, 192, 7, 1, "y"), (6, 320, 5, 1, "y"),
    ),
}

STEM_CHANNELS = 32
SEPARABLE_OUT = 16
HEAD_CHANNELS = 1280


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, b: Block):
        super().__init__()
        hidden = int(round(cin * b.expansion))
        self.conv1 = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act1 = HSwish()
        self.conv2 = nn.Conv2d(hidden, hidden, b.kernel, b.stride, b.kernel // 2, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.act2 = HSwish()
        self.mid_se = SqueezeExcite(hidden) if b.se else None
        self.conv3 = nn.Conv2d(hidden, b.out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(b.out)
        self.use_residual = b.stride == 1 and cin == b.out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        if self.mid_se is not None:
            y = self.mid_se(y)
        y = self.bn3(self.conv3(y))
        return x + y if self.use_residual else y


class LET(nn.Module):
    """A linear 1x1 layer standing in an identity slot; a fresh one is the identity map."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
            # BN with unit variance and eps folded into gamma so the fresh layer is exactly identity.
            self.bn.weight.fill_((1.0 + self.bn.eps) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ScarletNet(nn.Module):
    def __init__(self, table: tuple[Optional[Block], ...], let: bool = False, num_classes: int = 1000):
        super().__init__()
        self.table = table
        self.let = let
        self.stem = nn.Sequential(*conv_bn(3, STEM_CHANNELS, 3, 2), nn.ReLU6(inplace=True))
        self.separable_conv = nn.Sequential(
            *conv_bn(STEM_CHANNELS, STEM_CHANNELS, 3, groups=STEM_CHANNELS), nn.ReLU6(inplace=True),
            *conv_bn(STEM_CHANNELS, SEPARABLE_OUT, 1),
        )
        blocks: list[nn.Module] = []
        cin = SEPARABLE_OUT
        for b in table:
            if b is None:
                blocks.append(LET(cin) if let else nn.Identity())
            else:
                blocks.append(InvertedResidual(cin, b))
                cin = b.out
        self.mb_module = nn.Sequential(*blocks)
        self.conv_before_pooling = nn.Sequential(*conv_bn(cin, HEAD_CHANNELS, 1), nn.ReLU6(inplace=True))
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_before_pooling(self.mb_module(self.separable_conv(self.stem(x))))
        return self.classifier(x.mean((2, 3)))


def build_scarlet(name: str, let: bool = False) -> ScarletNet:
    return ScarletNet(SCARLET_TABLES[name], let=let)
