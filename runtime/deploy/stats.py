"""The uncertainty that goes with every accuracy figure a deploy report states.

Agreement and top-1 are proportions over a few hundred images: a confidence interval says how
far another sample of images could move them, and McNemar's exact test says whether a top-1
change between two models on the same images is more than the images that happened to flip.
scipy.stats does both (the Wilson interval and an exact binomial test); nothing here is
hand-rolled beyond counting.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Proportion:
    k: int
    n: int
    value: float  # percent
    low: float  # percent, Wilson interval at CONFIDENCE
    high: float

    def text(self) -> str:
        return f"{self.value:.1f} % [{self.low:.1f}, {self.high:.1f}]"

    def as_dict(self) -> dict:
        return asdict(self)


def proportion(k: int, n: int, confidence: float = CONFIDENCE) -> Proportion:
    """k of n as a percentage with its Wilson score interval (sensible at 0 % and 100 %, unlike the normal one)."""
    from scipy.stats import binomtest

    if n <= 0:
        raise ValueError("a proportion needs at least one image")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return Proportion(int(k), int(n), 100.0 * k / n, 100.0 * float(ci.low), 100.0 * float(ci.high))


@dataclass(frozen=True)
class McNemar:
    """Paired top-1 change on the same labelled images: `lost` right before and wrong after, `gained` the reverse."""

    lost: int
    gained: int
    p_value: float  # exact two-sided: under "no change" the discordant images split as fair coin flips
    images: int

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.lost - self.gained) / self.images if self.images else 0.0

    def text(self) -> str:
        return (f"{self.drop_points:+.2f} points lost ({self.lost} images lost, {self.gained} gained; "
                f"McNemar exact p = {self.p_value:.3g})").replace("+-", "-")

    def as_dict(self) -> dict:
        return asdict(self) | {"drop_points": self.drop_points}


def mcnemar(before_correct: np.ndarray, after_correct: np.ndarray) -> McNemar:
    from scipy.stats import binomtest

    before, after = np.asarray(before_correct, bool), np.asarray(after_correct, bool)
    if before.shape != after.shape:
        raise ValueError("McNemar's test pairs the same images: shapes differ")
    lost, gained = int((before & ~after).sum()), int((~before & after).sum())
    p = 1.0 if lost + gained == 0 else float(binomtest(min(lost, gained), lost + gained, 0.5).pvalue)
    return McNemar(lost, gained, min(p, 1.0), int(before.size))
