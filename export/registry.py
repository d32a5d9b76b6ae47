"""The model registry: the one place that says how each model is built and fed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from scarlet_deploy.runtime.data.preprocess import Preprocess

if TYPE_CHECKING:  # torch is imported only when a model is built: decode workers never need it
    from torch import nn

from scarlet_deploy.runtime.core.errors import ScarletError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[bool], nn.Module]
    preprocess: Preprocess = field(default_factory=Preprocess)
    supports_let: bool = False
    # Weights a package ships; None means "seeded, not pretrained" when no checkpoint is given.
    default_checkpoint: Optional[Callable[[], str]] = None
    paper_top1: Optional[float] = None
    num_classes: int = 1000

    def create(self, let: bool = False) -> nn.Module:
        if let and not self.supports_let:
            raise ScarletError(f"--let applies to SCARLET models only; {self.name} has no identity slots.")
        return self.build(let).eval()


def _scarlet(name: str) -> Callable[[bool], nn.Module]:
    def build(let: bool) -> nn.Module:
        from scarlet_deploy.export.scarlet import build_scarlet

        return build_scarlet(name, let)

    return build


def _lite0(let: bool) -> nn.Module:
    from scarlet_deploy.export.lite0 import EfficientNetLite0

    return EfficientNetLite0()


def _lite0_weights() -> str:
    from scarlet_deploy.export.lite0 import shipped_checkpoint

    return shipped_checkpoint()


MODELS: dict[str, ModelSpec] = {
    "scarlet_a": ModelSpec("scarlet_a", _scarlet("scarlet_a"), supports_let=True, paper_top1=76.9),
    "scarlet_b": ModelSpec("scarlet_b", _scarlet("scarlet_b"), supports_let=True, paper_top1=76.3),
    "scarlet_c": ModelSpec("scarlet_c", _scarlet("scarlet_c"), supports_let=True, paper_top1=75.6),
    "efficientnet_lite0": ModelSpec(
        "efficientnet_lite0", _lite0,
        preprocess=Preprocess(mean=(0.498,) * 3, std=(0.502,) * 3),
        default_checkpoint=_lite0_weights,
    ),
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ScarletError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}.") from None
