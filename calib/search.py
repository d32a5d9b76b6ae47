"""Accuracy-guided mixed precision: rank layers by sensitivity, keep the worst in float until the budget holds."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from scarlet_deploy.calib import evaluate, qdq


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
    quantised_back: str | None = None  # pruning step: this layer of the passing set tried in INT8 again


@dataclass
class SearchResult:
    nodes_to_exclude: list[str]
    steps: list[SearchStep] = field(default_factory=list)
    met: bool = False
    kept: SearchStep | None = None  # the step that measured the model being kept


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
            acc = evaluate.accuracy(evaluate.logits(path, probe, threads=threads, runtime=target.evaluate_with),
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


def layer_costs(model_path: str | os.PathLike, layers: dict[str, list[str]]) -> dict[str, int]:
    """What keeping a layer in float costs, as the activation elements per image it reads and
    writes: each is dequantised in front of it and quantised after it, in NCHW where its INT8
    neighbours run NHWC, so these conversions, not the float arithmetic, dominate. Measured on
    Lite0 (AVX2): the 112x112 first depthwise layer in float costs 11 % of INT8 throughput, a 14x14
    projection nothing measurable."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path), load_external_data=False))
    g = model.graph
    elements: dict[str, int] = {}
    for v in list(g.value_info) + list(g.input) + list(g.output):
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim[1:]]
        if dims and all(dims):
            elements[v.name] = int(np.prod(dims))
    nodes = {n.name: n for n in g.node}
    inits = {t.name for t in g.initializer}
    costs = {}
    for layer, members in layers.items():
        tensors = [t for t in nodes[layer].input if t not in inits] + list(nodes[members[-1]].output)
        costs[layer] = sum(elements.get(t, 0) for t in tensors)
    return costs


def within_budget(a: evaluate.Accuracy, fp32_top1: float | None, max_top1_drop: float | None,
                  min_agreement: float | None) -> bool:
    drop_ok = max_top1_drop is None or fp32_top1 is None or a.top1 is None or fp32_top1 - a.top1 <= max_top1_drop + 1e-9
    agree_ok = min_agreement is None or a.agreement is None or a.agreement >= min_agreement - 1e-9
    return drop_ok and agree_ok


def mixed_precision(order: list[str] | Callable[[], list[str]], build_and_eval: Callable[[list[str]], evaluate.Accuracy],
                    fp32_top1: float | None, max_top1_drop: float | None, min_agreement: float | None,
                    costs: dict[str, float] | None = None) -> SearchResult:
    """Smallest prefix of `order` (most sensitive first) to keep in float so that top-1 drop and
    agreement meet the budget; with no budget, everything is quantised. `order` may be a function,
    called only when the fully quantised model misses the budget (sensitivity costs minutes).
    With `costs`, the passing prefix is then pruned: its layers, costliest first, go back to INT8
    one at a time wherever the budget still holds (sensitivity alone keeps expensive early layers
    whose neighbours would do; on Lite0 that made the mixed model slower than FP32)."""
    from tqdm import tqdm

    res = SearchResult([])

    def ok(a: evaluate.Accuracy) -> bool:
        return within_budget(a, fp32_top1, max_top1_drop, min_agreement)

    def run(exclude: list[str], back: str | None = None) -> bool:
        acc = build_and_eval(exclude)
        good = ok(acc)
        res.steps.append(SearchStep(len(exclude), acc, good, back))
        tqdm.write(f"mixed precision: {len(exclude)} layers in float{f' ({back} back in INT8)' if back else ''}: "
                   f"top-1 {acc.top1}, agreement {acc.agreement}{' (within budget)' if good else ''}")
        return good

    def step(k: int) -> bool:
        return run(list(order[:k]) if k else [])

    budget = max_top1_drop is not None or min_agreement is not None
    if step(0) or not budget:
        return SearchResult([], res.steps, budget and res.steps[0].within_budget, res.steps[0])
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
        res.nodes_to_exclude, res.kept = order[:ks[-1]], res.steps[-1]
        return res
    # The schedule grows in jumps; bisect between the last failing and the first passing count
    # for the fewest float layers (accuracy is not strictly monotonic in k, so this is a heuristic).
    best, kept = hi, res.steps[-1]
    while best - lo > 1:
        mid = (lo + best) // 2
        if step(mid):
            best, kept = mid, res.steps[-1]
        else:
            lo = mid
    exclude = list(order[:best])
    for layer in sorted(exclude, key=lambda n: -costs[n]) if costs else []:
        trial = [n for n in exclude if n != layer]
        if trial and run(trial, back=layer):
            exclude, kept = trial, res.steps[-1]
    res.nodes_to_exclude, res.met, res.kept = exclude, True, kept
    return res
