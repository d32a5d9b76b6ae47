"""Fold BatchNorm and LET layers into convolutions, exactly (see shared docs/let-folding.md).

The result is a copy of the model with the same structure, every BN replaced by
Identity and every LET either absorbed by the convolutions around it (the slot becomes
Identity again) or, when its matrix is too ill-conditioned to invert safely, kept as
one 1x1 convolution. Arithmetic is in float64; only the final weights are float32.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
from torch import nn

from scarlet_deploy.export.lite0 import EfficientNetLite0
from scarlet_deploy.export.scarlet import LET, InvertedResidual, ScarletNet

# Above this condition number A^-1 amplifies float32 rounding by more than ~1e4 * 6e-8:
# the LET stays a 1x1 conv rather than risk a visible logit change.
MAX_CONDITION = 1e4


@dataclass
class LetFate:
    slot: int
    folded: bool
    case: str  # "producer" | "residual-chain" | "kept"
    absorbed_by: str | None
    through: list[str] = field(default_factory=list)
    condition_number: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def conv_bn_pairs(model: nn.Module) -> Iterator[tuple[nn.Conv2d, nn.Module, str]]:
    """(conv, bn, bn attribute path) for every conv followed by its BN."""
    if isinstance(model, ScarletNet):
        seqs = [("stem", (0, 1)), ("separable_conv", (0, 1)), ("separable_conv", (3, 4)), ("conv_before_pooling", (0, 1))]
        for seq, (ci, bi) in seqs:
            s = getattr(model, seq)
            yield s[ci], s[bi], f"{seq}.{bi}"
        for i, blk in enumerate(model.mb_module):
            if isinstance(blk, InvertedResidual):
                for n in "123":
                    yield getattr(blk, f"conv{n}"), getattr(blk, f"bn{n}"), f"mb_module.{i}.bn{n}"
            elif isinstance(blk, LET):
                yield blk.conv, blk.bn, f"mb_module.{i}.bn"
    elif isinstance(model, EfficientNetLite0):
        yield model._conv_stem, model._bn0, "_bn0"
        yield model._conv_head, model._bn1, "_bn1"
        for i, blk in enumerate(model._blocks):
            if hasattr(blk, "_expand_conv"):
                yield blk._expand_conv, blk._bn0, f"_blocks.{i}._bn0"
            yield blk._depthwise_conv, blk._bn1, f"_blocks.{i}._bn1"
            yield blk._project_conv, blk._bn2, f"_blocks.{i}._bn2"
    else:
        raise TypeError(f"no folding rule for {type(model).__name__}")


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _set_conv(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> None:
    # Standard strides: einsum can leave a 1x1 kernel with channels-last strides (which .contiguous() keeps, the
    # size-1 dims making both layouts "contiguous"); PyTorch then runs that conv and everything after it channels-last,
    # torch.export records the layout, and the dynamo exporter spells each SE pooling out as as_strided (Shape,
    # Range, Gather ...) instead of one mean.
    conv.weight = nn.Parameter(weight.to(torch.float32).clone(memory_format=torch.contiguous_format))
    conv.bias = nn.Parameter(bias.to(torch.float32))


def _conv_wb(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return w, b


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    w, b = _conv_wb(conv)
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    _set_conv(conv, w * scale.view(-1, 1, 1, 1), (b - bn.running_mean.double()) * scale + bn.bias.detach().double())


def _matrix(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().double()[:, :, 0, 0]


def _left_multiply(conv: nn.Conv2d, a: torch.Tensor, c: torch.Tensor | None) -> None:
    """Output of `conv` becomes A y + c."""
    w, b = _conv_wb(conv)
    w2 = torch.einsum("ij,jklm->iklm", a, w)
    _set_conv(conv, w2, a @ b + (c if c is not None else 0))


def _fold_let(model: ScarletNet, slot: int) -> LetFate:
    let = model.mb_module[slot]
    a, c = _matrix(let.conv), let.conv.bias.detach().double()
    cond = float(torch.linalg.cond(a))
    if cond > MAX_CONDITION:
        return LetFate(slot, False, "kept", None, condition_number=cond)
    a_inv = torch.linalg.inv(a)
    through: list[str] = []
    j = slot - 1
    while True:
        while j >= 0 and isinstance(model.mb_module[j], nn.Identity):
            j -= 1
        if j < 0:
            # Slot 0 is never an identity in the released tables; the separable conv still covers it.
            target, name = model.separable_conv[3], "separable_conv.3"
        else:
            blk = model.mb_module[j]
            if isinstance(blk, InvertedResidual) and blk.use_residual:
                # Re-parametrise the residual stream x' = A x + c through this block.
                w1, b1 = _conv_wb(blk.conv1)
                w1m = w1[:, :, 0, 0] @ a_inv
                _set_conv(blk.conv1, w1m[:, :, None, None], b1 - w1m @ c)
                _left_multiply(blk.conv3, a, None)
                through.append(f"mb_module.{j}")
                j -= 1
                continue
            if isinstance(blk, LET):
                # A LET kept as a conv produces the stream: it absorbs like any producer.
                target, name = blk.conv, f"mb_module.{j}.conv"
            else:
                target, name = blk.conv3, f"mb_module.{j}.conv3"
        _left_multiply(target, a, c)
        break
    model.mb_module[slot] = nn.Identity()
    return LetFate(slot, True, "residual-chain" if through else "producer", name, through, cond)


@torch.no_grad()
def fold(model: nn.Module) -> tuple[nn.Module, list[LetFate]]:
    """A folded copy of `model` (eval mode) and what happened to each LET."""
    folded = copy.deepcopy(model).eval()
    for conv, bn, path in list(conv_bn_pairs(folded)):
        _fold_bn(conv, bn)
        _set_module(folded, path, nn.Identity())
    fates: list[LetFate] = []
    if isinstance(folded, ScarletNet):
        for slot, blk in enumerate(folded.mb_module):
            if isinstance(blk, LET):
                fates.append(_fold_let(folded, slot))
    return folded, fates
