"""The deploy decision: the fastest candidate that passes, unless a simpler one is within the run's noise of it.

Speeds come as per-round figures from one interleaved run (higher is better: images/s, or 1/latency),
so two candidates are compared round by round. One counts as faster than another only when it won
every round: on a shared or turbo-boosting machine a median alone can move a few percent between
runs, and a decision that flips between reruns is no decision.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Simpler first: an FP32 artifact is the model; bf16/fp16 round every op; INT8 adds calibration.
TIERS = {"fp32": 0, "bf16": 1, "fp16": 1, "int8": 2}


@dataclass
class Contender:
    name: str
    precision: str
    order: int  # position in the candidate list: breaks ties within a tier (the more common runtime first)
    passed: bool
    rounds: list[float] = field(default_factory=list)  # per-round speed, higher is better

    @property
    def tier(self) -> int:
        return TIERS[self.precision]

    @property
    def speed(self) -> float:
        return float(np.median(self.rounds))


def round_ratios(a: Contender, b: Contender) -> np.ndarray:
    """a's speed over b's, round by round (they ran next to each other)."""
    n = min(len(a.rounds), len(b.rounds))
    return np.asarray(a.rounds[:n], np.float64) / np.asarray(b.rounds[:n], np.float64)


def faster_beyond_noise(a: Contender, b: Contender) -> bool:
    """a beat b in every round of the run."""
    r = round_ratios(a, b)
    return bool(len(r) and (r > 1.0).all())


@dataclass
class Decision:
    chosen: str | None
    fastest: str | None
    why: dict[str, str]  # every contender: why it was chosen, or why it lost


def choose(contenders: list[Contender]) -> Decision:
    why: dict[str, str] = {}
    for c in contenders:
        if not c.passed:
            why[c.name] = "failed its gates"
    passing = [c for c in contenders if c.passed and c.rounds]
    if not passing:
        return Decision(None, None, why)
    fastest = max(passing, key=lambda c: c.speed)
    tied = [c for c in passing if c is fastest or not faster_beyond_noise(fastest, c)]
    chosen = min(tied, key=lambda c: (c.tier, c.order))
    for c in passing:
        r = round_ratios(chosen, c)
        spread = f"{np.median(r):.2f}x (rounds {r.min():.2f}-{r.max():.2f})" if len(r) else "n/a"
        if c is chosen:
            why[c.name] = ("chosen: the fastest that passes" if c is fastest else
                           f"chosen: ties the fastest, {fastest.name}, within noise and is simpler "
                           f"({fastest.name}/{c.name} {_ratio(fastest, c)})")
        elif c in tied:
            why[c.name] = (f"ties {chosen.name} within noise, {'more complex' if c.tier > chosen.tier else 'listed later'}: "
                           f"{chosen.name}/{c.name} {spread}")
        else:
            why[c.name] = f"slower: {chosen.name}/{c.name} {spread}"
    return Decision(chosen.name, fastest.name, why)


def _ratio(a: Contender, b: Contender) -> str:
    r = round_ratios(a, b)
    return f"{np.median(r):.2f}x, rounds {r.min():.2f}-{r.max():.2f}"
