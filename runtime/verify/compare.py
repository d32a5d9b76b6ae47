from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

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

    def __post_init__(self) -> None:
        for name, v in asdict(self).items():
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ScarletError(f"verify threshold {name} = {v!r}: thresholds must be finite, non-negative numbers.")

    def check(self, precision: str, agreement: float, rel_error: float, nonfinite: int = 0) -> tuple[bool, str]:
        """Pass or fail, and the rule applied. Comparisons are written so that NaN fails them, and any
        NaN or infinite logit fails every precision: argmax over NaN still "agrees" by accident."""
        finite = nonfinite == 0
        if precision == "fp32":
            rule = f"agree >= {self.fp32_min_agreement:.2%}, rel err <= {self.fp32_max_rel_error:g}"
            return finite and agreement >= self.fp32_min_agreement and rel_error <= self.fp32_max_rel_error, rule
        floor = {"fp16": self.fp16_min_agreement, "bf16": self.bf16_min_agreement}.get(precision, self.int8_min_agreement)
        return finite and agreement >= floor, f"agree >= {floor:.2%}"


class Accuracy:
    """Top-1/top-5 on the labelled images."""

    def __init__(self) -> None:
        self.images = self.top1 = self.top5 = 0

    def update(self, logits: np.ndarray, labels: list[int | None]) -> None:
        if any(v is None for v in labels):
            return
        y = np.asarray(labels)
        self.images += len(y)
        self.top1 += int((logits.argmax(1) == y).sum())
        self.top5 += int((top_k(logits) == y[:, None]).any(1).sum())

    def as_dict(self) -> dict[str, Any]:
        n = self.images
        return {"images": n, "top1": self.top1 / n if n else None, "top5": self.top5 / n if n else None}


class Comparison:
    """A backend's logits against PyTorch's on the same images."""

    def __init__(self) -> None:
        self.accuracy = Accuracy()
        self.images = self.agree = 0
        self.top5_overlap = 0.0
        self.max_abs = self.sum_abs = self.ref_scale = 0.0
        self.values = 0
        self.nonfinite = 0  # NaN/Inf logits of the backend or of PyTorch
        self.worst_cos, self.worst_cos_file = 1.0, None
        self.disagreements: list[dict[str, Any]] = []
        self.seconds = 0.0

    def update(self, ref: np.ndarray, out: np.ndarray, items: list, since: float | None = None) -> None:
        """Add a batch; `since`: perf_counter() before the backend ran, to account its inference time."""
        from scarlet_deploy.runtime.data import classes
        if since is not None:
            self.seconds += time.perf_counter() - since
        self.accuracy.update(out, [it.label for it in items])
        self.images += len(out)
        r1, o1 = ref.argmax(1), out.argmax(1)
        self.agree += int((r1 == o1).sum())
        self.top5_overlap += float((top_k(ref)[:, :, None] == top_k(out)[:, None, :]).any(2).sum() / 5)
        self.nonfinite += int(out.size - np.count_nonzero(np.isfinite(out)) + ref.size - np.count_nonzero(np.isfinite(ref)))
        diff = np.abs(out.astype(np.float64) - ref)
        self.max_abs = float(np.max([self.max_abs, diff.max()]))  # np.max keeps a NaN, builtin max() drops it
        self.sum_abs += float(diff.sum())
        self.values += diff.size
        self.ref_scale = max(self.ref_scale, float(np.abs(ref).max()))
        cos = (ref * out).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1), 1e-30)
        i = int(cos.argmin())
        if not cos[i] >= self.worst_cos:  # NaN cosine (NaN logits) is the worst there is
            self.worst_cos, self.worst_cos_file = float(cos[i]), str(items[i].path)
        pr, po = softmax(ref), softmax(out)
        for i in np.flatnonzero(r1 != o1):
            label = items[i].label
            self.disagreements.append({
                "file": str(items[i].path),
                "label": label, "label_name": classes.name(label) if label is not None else None,
                "pytorch": int(r1[i]), "pytorch_name": classes.name(int(r1[i])), "pytorch_prob": float(pr[i, r1[i]]),
                "backend": int(o1[i]), "backend_name": classes.name(int(o1[i])), "backend_prob": float(po[i, o1[i]]),
            })

    def as_dict(self) -> dict[str, Any]:
        n = self.images
        return {
            **{k: v for k, v in self.accuracy.as_dict().items() if k != "images"},
            "labelled_images": self.accuracy.images,
            "images": n,
            "top1_agreement": self.agree / n if n else None,
            "top5_overlap": self.top5_overlap / n if n else None,
            "max_abs_error": self.max_abs,
            "mean_abs_error": self.sum_abs / self.values if self.values else None,
            "logit_scale": self.ref_scale,
            "max_rel_error": self.max_abs / self.ref_scale if self.ref_scale else None,
            "nonfinite_logits": self.nonfinite,
            "worst_cosine": self.worst_cos,
            "worst_cosine_file": self.worst_cos_file,
            "inference_seconds": round(self.seconds, 3),
            "disagreements": self.disagreements,
        }
