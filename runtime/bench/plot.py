from __future__ import annotations

import os
from typing import Any

from scarlet_deploy.runtime.bench.plan import BACKEND_LABELS, BACKENDS


def plot(data: dict[str, Any], path: str | os.PathLike) -> None:
    """Throughput vs batch per backend, one panel per model; accuracy vs latency when verify ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scarlet_deploy.runtime.core.artifacts import atomic_path

    models = list(data["models"])
    with_acc = [m for m in models if data["models"][m].get("accuracy")]
    fig, axes = plt.subplots(2 if with_acc else 1, len(models), figsize=(4.2 * len(models), 7.5 if with_acc else 3.8),
                             squeeze=False)
    colour = {b: f"C{i}" for i, b in enumerate(BACKENDS)}  # one colour per backend in every panel
    for i, m in enumerate(models):
        ax = axes[0][i]
        for b in BACKENDS:
            # img/s in the backend's faster mode at each batch (reports from before the modes have latency only)
            best: dict[int, float] = {}
            for r in data["results"]:
                if r["model"] == m and r["backend"] == b:
                    best[r["batch"]] = max(best.get(r["batch"], 0.0), r["throughput"])
            pts = sorted(best.items())
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colour[b], label=BACKEND_LABELS[b])
        ax.set(title=m, xlabel="batch", ylabel="images/s (faster mode)")
        ax.set_ylim(bottom=0)  # ratios read honestly only from a zero baseline
        ax.set_xticks(data["config"]["batches"])
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
        if with_acc:
            ax2 = axes[1][i]
            acc = data["models"][m].get("accuracy", {})
            pts = [(r["p50_ms"], acc[r["backend"]], r["backend"]) for r in data["results"]
                   if r["model"] == m and r["batch"] == min(data["config"]["batches"]) and r["backend"] in acc
                   and r.get("mode", "latency") == "latency"]
            if not pts:
                ax2.text(0.5, 0.5, "no calib/verify\nresults", ha="center", va="center", transform=ax2.transAxes)
                ax2.set_axis_off()
                continue
            for x, y, b in pts:
                ax2.scatter(x, y, color=colour[b])
                ax2.annotate(BACKEND_LABELS[b], (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
            ax2.set(xlabel=f"batch-{min(data['config']['batches'])} p50 latency (ms)", ylabel="top-1 % (calib/verify)")
            ax2.set_xlim(0, 1.3 * max(x for x, _, _ in pts))  # room for the labels
            ax2.grid(alpha=0.3)
    fig.suptitle(f"scarlet bench, {data['environment']['date']}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
