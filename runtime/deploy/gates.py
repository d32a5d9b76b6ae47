"""What a candidate must show against PyTorch to count as the same model: the deploy gates.

Every gate reads the verification images, which neither calibration nor any calibration
decision has seen. A figure whose change is within noise is reported as such and never
decides: a top-1 drop past the budget fails only when McNemar's test says it is real.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.deploy.stats import CONFIDENCE, McNemar, Proportion, mcnemar, proportion

ALPHA = 1.0 - CONFIDENCE


@dataclass(frozen=True)
class Gates:
    min_agreement: float = 97.0  # percent of images whose top-1 equals PyTorch's
    max_top1_drop: float | None = 0.5  # points of labelled top-1; None: no top-1 gate
    # FP32 artifacts reorder float arithmetic and nothing more: anything above this is a bug, not rounding.
    fp32_max_rel_error: float = 1e-3

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_agreement <= 100.0:
            raise ScarletError(f"--min-agreement {self.min_agreement} is a percentage: pass a number from 0 to 100.")
        if self.max_top1_drop is not None and not 0.0 <= self.max_top1_drop <= 100.0:
            raise ScarletError(f"--max-top1-drop {self.max_top1_drop} is in percentage points: pass a number from 0 to 100.")
        if not self.fp32_max_rel_error > 0:
            raise ScarletError("the FP32 logit error bound must be positive.")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Verification:
    images: int
    nonfinite: int
    agreement: Proportion | None
    kl_mean: float | None  # KL(softmax(PyTorch) || softmax(candidate)), nats, mean over images
    max_rel_error: float | None  # max |candidate - PyTorch| / max |PyTorch| over all logits
    mean_abs_error: float | None
    top1: Proportion | None = None  # against labels, trained weights only
    top1_change: McNemar | None = None
    passed: bool = False
    failed: list[str] = field(default_factory=list)  # which gates, with the figures
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.images, "nonfinite_images": self.nonfinite,
                "agreement": self.agreement.as_dict() if self.agreement else None,
                "kl_mean": self.kl_mean, "max_rel_error": self.max_rel_error, "mean_abs_error": self.mean_abs_error,
                "top1": self.top1.as_dict() if self.top1 else None,
                "top1_change": self.top1_change.as_dict() if self.top1_change else None,
                "passed": self.passed, "failed": self.failed, "notes": self.notes}


def kl_per_image(reference: np.ndarray, out: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(out)) per image in float64 (float32 loses the small values that matter)."""
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(reference), log_softmax(out)
    return np.sum(np.exp(lp) * (lp - lq), axis=1)


def verify(reference: np.ndarray, out: np.ndarray, labels: np.ndarray | None, precision: str, gates: Gates,
           trained: bool) -> Verification:
    """`out` (a candidate's logits) against PyTorch's `reference` on the same images, gated."""
    reference, out = np.asarray(reference), np.asarray(out)
    if reference.shape != out.shape or reference.ndim != 2 or not len(reference):
        raise ValueError(f"logits of shape {out.shape} cannot be compared with the reference's {reference.shape}")
    n = len(out)
    finite = np.isfinite(out).all(1)
    nonfinite = int(n - finite.sum())
    if not np.isfinite(reference).all():
        raise ScarletError("PyTorch itself gives NaN or infinite logits on the verification images: the weights are "
                           "not usable (training diverged or the checkpoint is damaged). Deploy a good checkpoint.")
    v = Verification(n, nonfinite, None, None, None, None)
    if nonfinite:
        # No statistic of a model that emits NaN or Inf is worth stating: argmax and KL would still give numbers.
        v.failed.append(f"non-finite logits on {nonfinite} of {n} images")
        return v
    ref_top1, top1 = reference.argmax(1), out.argmax(1)
    v.agreement = proportion(int((ref_top1 == top1).sum()), n)
    v.kl_mean = float(kl_per_image(reference, out).mean())
    diff = np.abs(out.astype(np.float64) - reference)
    v.max_rel_error = float(diff.max() / max(float(np.abs(reference).max()), 1e-30))
    v.mean_abs_error = float(diff.mean())
    if v.agreement.value < gates.min_agreement:
        v.failed.append(f"top-1 agreement with PyTorch {v.agreement.text()} < {gates.min_agreement:g} %")
    if precision == "fp32" and v.max_rel_error > gates.fp32_max_rel_error:
        v.failed.append(f"FP32 logits differ from PyTorch's by {v.max_rel_error:.2e} (relative) > "
                        f"{gates.fp32_max_rel_error:g}: an FP32 artifact must reproduce them")
    if labels is not None and len(labels) == n and (labels >= 0).all():
        if trained:
            v.top1 = proportion(int((top1 == labels).sum()), n)
            v.top1_change = mcnemar(ref_top1 == labels, top1 == labels)
            drop = v.top1_change.drop_points
            if gates.max_top1_drop is not None and drop > gates.max_top1_drop:
                if v.top1_change.p_value < ALPHA:
                    v.failed.append(f"top-1 {v.top1_change.text()} > the {gates.max_top1_drop:g}-point budget, "
                                    f"and more than noise (p < {ALPHA:g})")
                else:
                    v.notes.append(f"top-1 {v.top1_change.text()}: past the {gates.max_top1_drop:g}-point budget but "
                                   f"within noise (p >= {ALPHA:g}), so it decides nothing")
        else:
            v.notes.append("seeded weights: top-1 against labels is meaningless, so only agreement with PyTorch gates")
    v.passed = not v.failed
    return v
