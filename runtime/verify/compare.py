"""What verify measures, as per-image rows and their reduction.

Each batch becomes a few numbers per image and stream (PyTorch, each backend, the deploy
pipeline): top-1, top-5, the top-1 probability, and against PyTorch the max and summed
absolute logit error and the cosine. The report reduces those rows in dataset order, so it
does not depend on how the images were batched or in how many sessions (`--resume`) they
were run, and memory grows by these rows only, never by logits.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.core.logits import softmax, top_k


@dataclass(frozen=True)
class Thresholds:
    fp32_max_rel_error: float = 1e-3  # max |backend - pytorch| / max |pytorch logits|
    fp32_min_agreement: float = 1.0
    fp16_min_agreement: float = 0.99
    int8_min_agreement: float = 0.95
    # bf16 keeps 8 significant bits where fp16 keeps 11: its own floor, below fp16's.
    bf16_min_agreement: float = 0.98
    # An INT8 model whose float parts run in bf16 (ov-int8-bf16): INT8's floor, gated apart from
    # ov-int8 so that a bf16 loss shows as this row failing while the f32-float-parts row passes.
    int8_bf16_min_agreement: float = 0.95

    def __post_init__(self) -> None:
        for name, v in asdict(self).items():  # a NaN threshold makes every comparison with it False
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ScarletError(f"verify threshold {name} = {v!r}: thresholds must be finite, non-negative numbers.")

    def check(self, precision: str, agreement: float, rel_error: float) -> tuple[bool, str]:
        if precision == "fp32":
            rule = f"agree >= {self.fp32_min_agreement:.2%}, rel err <= {self.fp32_max_rel_error:g}"
            return agreement >= self.fp32_min_agreement and rel_error <= self.fp32_max_rel_error, rule
        floor = {"fp16": self.fp16_min_agreement, "bf16": self.bf16_min_agreement,
                 "int8-bf16": self.int8_bf16_min_agreement}.get(precision, self.int8_min_agreement)
        return agreement >= floor, f"agree >= {floor:.2%}"


def _top(prefix: str, logits: np.ndarray) -> dict[str, np.ndarray]:
    finite = np.isfinite(logits).all(1)
    safe = np.where(finite[:, None], logits, 0)  # a NaN row is counted as non-finite, not ranked
    top1 = safe.argmax(1)
    return {f"{prefix}.top1": top1.astype(np.int16), f"{prefix}.top5": top_k(safe).astype(np.int16),
            f"{prefix}.prob": softmax(safe)[np.arange(len(safe)), top1].astype(np.float32),
            f"{prefix}.finite": finite}


def reference_rows(ref: np.ndarray) -> dict[str, np.ndarray]:
    return {**_top("ref", ref), "ref.absmax": np.abs(ref).max(1).astype(np.float32)}


def backend_rows(prefix: str, ref: np.ndarray, out: np.ndarray) -> dict[str, np.ndarray]:
    """`out` against `ref`, one row per image."""
    top = _top(prefix, out)
    out = np.where(top[f"{prefix}.finite"][:, None], out, 0)  # errors of the finite rows; the others fail the gate
    diff = np.abs(out.astype(np.float64) - ref)
    cos = (ref * out).sum(1, dtype=np.float64) / np.maximum(
        np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1), 1e-30)
    return {**top, f"{prefix}.max_abs": diff.max(1), f"{prefix}.sum_abs": diff.sum(1),
            f"{prefix}.cos": cos}


def filler_rows(like: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Rows for `n` unreadable images, shaped like `like`: they hold no result and are never read."""
    return {k: np.zeros((n, *v.shape[1:]), v.dtype) for k, v in like.items()}


def accuracy(cols: dict[str, np.ndarray], prefix: str, labels: np.ndarray) -> dict[str, Any]:
    """Top-1/top-5 over the images, when every one is labelled (`labels` -1: unknown)."""
    n = len(labels)
    if not n or (labels < 0).any():
        return {"images": 0, "top1": None, "top5": None}
    top1 = int((cols[f"{prefix}.top1"] == labels).sum())
    top5 = int((cols[f"{prefix}.top5"] == labels[:, None]).any(1).sum())
    return {"images": n, "top1": top1 / n, "top5": top5 / n}


def compare(cols: dict[str, np.ndarray], prefix: str, labels: np.ndarray, files: Sequence[str],
            seconds: float, classes: int = 1000) -> dict[str, Any]:
    """A stream's rows against PyTorch's, reduced in dataset order (`cols` holds readable images only)."""
    from scarlet_deploy.runtime.data import classes as names

    n = len(labels)
    acc = accuracy(cols, prefix, labels)
    r1, o1 = cols["ref.top1"], cols[f"{prefix}.top1"]
    rank5, out5 = cols["ref.top5"], cols[f"{prefix}.top5"]
    nonfinite = int((~cols[f"{prefix}.finite"]).sum())
    cos = cols[f"{prefix}.cos"]
    worst = int(cos.argmin()) if n else None
    max_abs = float(cols[f"{prefix}.max_abs"].max()) if n else 0.0
    scale = float(cols["ref.absmax"].max()) if n else 0.0
    pr, po = cols["ref.prob"], cols[f"{prefix}.prob"]
    disagreements = [{
        "file": files[i],
        "label": int(labels[i]) if labels[i] >= 0 else None,
        "label_name": names.name(int(labels[i])) if labels[i] >= 0 else None,
        "pytorch": int(r1[i]), "pytorch_name": names.name(int(r1[i])), "pytorch_prob": float(pr[i]),
        "backend": int(o1[i]), "backend_name": names.name(int(o1[i])), "backend_prob": float(po[i]),
    } for i in np.flatnonzero(r1 != o1)]
    return {
        "top1": acc["top1"], "top5": acc["top5"],
        "labelled_images": acc["images"],
        "images": n,
        "nonfinite_images": nonfinite,
        "top1_agreement": float((r1 == o1).mean()) if n else None,
        "top5_overlap": float((rank5[:, :, None] == out5[:, None, :]).any(2).sum(1).mean() / 5) if n else None,
        "max_abs_error": max_abs,
        "mean_abs_error": float(cols[f"{prefix}.sum_abs"].sum() / (n * classes)) if n else None,
        "logit_scale": scale,
        "max_rel_error": max_abs / scale if scale else None,
        "worst_cosine": float(cos[worst]) if n else 1.0,
        "worst_cosine_file": files[worst] if n else None,
        "inference_seconds": round(seconds, 3),
        "disagreements": disagreements,
    }
