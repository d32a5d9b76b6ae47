from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, k: int = 5) -> np.ndarray:
    """(N, k) class indices, highest logit first (argpartition: no full sort of 1000 classes)."""
    k = min(k, logits.shape[1])
    idx = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(-logits, idx, axis=1).argsort(axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)
