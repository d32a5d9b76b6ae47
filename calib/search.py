"""Accuracy-guided mixed precision: rank layers by sensitivity, keep the worst in float until the budget holds."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import evaluate, qdq


@dataclass(frozen=True)
class Sensitivity:
    node: str
    op_type: str
    logits_rmse: float  # network output error (relative RMSE vs float) with only this layer quantised
    agreement: float  # top-1 agreement with float, percent, same probe


@dataclass(frozen=True)
class SearchStep:
    kept_float: int
    accuracy: evaluate.Accuracy
    within_budget: bool


@dataclass
class SearchResult:
    nodes_to_exclude: list[str]
    steps: list[SearchStep] = field(default_factory=list)
    met: bool = False

    @property
    def kept(self) -> SearchStep | None:
        """The step that measured the model being kept."""
        return next((s for s in reversed(self.steps) if s.kept_float == len(self.nodes_to_exclude)), None)


def sensitivities(model_path: str | os.PathLike, ranges: dict, target: qdq.Target, probe: np.ndarray,
                  reference: np.ndarray, threads: int | None = None) -> list[Sensitivity]:
    """Quantise one layer at a time (ranges reused, nothing recalibrated) and measure how far
    the network output moves on the few `probe` images; most sensitive first."""
    import onnx
    from tqdm import tqdm

    ops = {n.name: n.op_type for n in onnx.load(str(model_path), load_external_data=False).graph.node}
    out: list[Sensitivity] = []
    with tempfile.TemporaryDirectory(prefix="scarlet-sens-") as d:
        path = Path(d) / "one.onnx"
        for node, group in tqdm(qdq.layers(model_path, target).items(), desc="layer sensitivity", unit="layer", leave=False):
            qdq.quantize(model_path, ranges, target, path, nodes_to_quantize=group)
            acc = evaluate.accuracy(evaluate.logits(path, probe, threads=threads, fake_quant=target.fake_quant_eval),
                                    None, reference)
            out.append(Sensitivity(node, ops[node], acc.logits_rmse, acc.agreement))
    return sorted(out, key=lambda s: -s.logits_rmse)


def schedule(n: int) -> list[int]:
    """How many layers to keep in float at each step: one at a time first, then growing by half."""
    ks, k = [0], 1
    while k < n:
        ks.append(k)
        k = k + 1 if k < 4 else k + k // 2
    return ks + [n]


def mixed_precision(order: list[str] | Callable[[], list[str]], build_and_eval: Callable[[list[str]], evaluate.Accuracy],
                    fp32_top1: float | None, max_top1_drop: float | None, min_agreement: float | None) -> SearchResult:
    """Smallest prefix of `order` (most sensitive first) to keep in float so that top-1 drop and
    agreement meet the budget; with no budget, everything is quantised. `order` may be a function,
    called only when the fully quantised model misses the budget (sensitivity costs minutes)."""
    from tqdm import tqdm

    res = SearchResult([])

    def ok(a: evaluate.Accuracy) -> bool:
        drop_ok = max_top1_drop is None or fp32_top1 is None or a.top1 is None or fp32_top1 - a.top1 <= max_top1_drop + 1e-9
        agree_ok = min_agreement is None or a.agreement is None or a.agreement >= min_agreement - 1e-9
        return drop_ok and agree_ok

    def step(k: int) -> bool:
        acc = build_and_eval(list(order[:k]) if k else [])
        good = ok(acc)
        res.steps.append(SearchStep(k, acc, good))
        tqdm.write(f"mixed precision: {k} layers in float: top-1 {acc.top1}, agreement {acc.agreement}"
                   f"{' (within budget)' if good else ''}")
        return good

    budget = max_top1_drop is not None or min_agreement is not None
    if step(0) or not budget:
        return SearchResult([], res.steps, budget and res.steps[0].within_budget)
    if callable(order):
        order = order()
    ks = schedule(len(order))[1:]
    lo, hi = 0, None
    for k in ks:
        if step(k):
            hi = k
            break
        lo = k
    if hi is None:
        res.nodes_to_exclude = order[:ks[-1]]
        return res
    # The schedule grows in jumps; bisect between the last failing and the first passing count
    # for the fewest float layers (accuracy is not strictly monotonic in k, so this is a heuristic).
    best = hi
    while best - lo > 1:
        mid = (lo + best) // 2
        if step(mid):
            best = mid
        else:
            lo = mid
    res.nodes_to_exclude, res.met = order[:best], True
    return res
