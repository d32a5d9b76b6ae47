"""deploy.json, REPORT.md and the speed-against-agreement plot: every candidate, its gates, its speed, the decision."""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

from scarlet_deploy.runtime.core.report import fmt, markdown_table


def data(cfg, rows, decision, images: Path, split, loaded, fp32: Path, torch_speed: dict[str, Any], trained: bool,
         t0: float) -> dict[str, Any]:
    from scarlet_deploy.calib.images import relative_names
    from scarlet_deploy.runtime.core.artifacts import sha256_file
    from scarlet_deploy.runtime.core.host import physical_cores
    from scarlet_deploy.runtime.core.report import environment

    batch = cfg.batch if cfg.objective == "throughput" else 1
    return {
        "model": cfg.model,
        "let": cfg.let,
        "weights": {"source": loaded.source, "pretrained": trained, "checkpoint_sha256": loaded.checkpoint_sha256},
        "fp32_onnx": {"path": str(fp32), "sha256": sha256_file(fp32)},
        "objective": cfg.objective,
        "batch": batch,
        "threads": cfg.threads or physical_cores(),
        "gates": cfg.gates.as_dict() | {"applies_top1": trained,
                                        "rule": "agreement >= min (point estimate, 95 % Wilson interval reported); "
                                                "FP32 also max relative logit error; top-1 drop past the budget fails "
                                                "only when McNemar's exact test gives p < 0.05; any NaN/Inf fails"},
        "images": {"dir": str(images), "calibration": len(split.calib), "selection": len(split.select),
                   "verification": len(split.eval), "golden": min(cfg.golden, len(split.eval)),
                   "verification_files": relative_names(split.eval),
                   "disjoint": "calibration, selection and verification share no file"},
        "candidates": [r.as_dict() for r in rows],
        "pytorch_eager": torch_speed,
        "decision": {"chosen": decision.chosen, "fastest_passing": decision.fastest,
                     "rule": "the fastest candidate that passes; one within the run's noise of it (not slower in every "
                             "round) and simpler (FP32 before bf16/FP16 before INT8) wins instead"},
        "environment": environment(),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _speed_cell(r: dict[str, Any], objective: str) -> str:
    s = r.get("speed")
    if not s:
        return ""
    if objective == "throughput":
        streams = s.get("streams") or 1
        return f"{s['img_s']:.1f} img/s" + (f" ({streams} streams)" if streams > 1 else "")
    return f"{s['p50_ms']:.2f} / {s['p99_ms']:.2f} ms"


def _ratio(r: dict[str, Any], key: str) -> str:
    v = (r.get("speed") or {}).get(key)
    return f"{v['median']:.2f}x" if v else ""


def markdown(d: dict[str, Any], plot_name: str | None = None) -> str:
    objective = d["objective"]
    speed_head = f"img/s (batch {d['batch']})" if objective == "throughput" else "p50 / p99 ms (batch 1)"
    env = d["environment"]
    chosen = d["decision"]["chosen"]
    md = [f"# scarlet deploy: {d['model']}{' +LET' if d['let'] else ''}\n\n",
          f"**Chosen: {f'`{chosen}`' if chosen else 'none: no candidate passed its gates, so no package was written'}** "
          f"({objective} objective). {env['date']}, {env['machine']['cpu']} ({env['machine']['isa']}), "
          f"{d['threads']} threads.\n\n",
          f"Weights: {d['weights']['source']}{'' if d['weights']['pretrained'] else ' -- seeded, so top-1 against labels means nothing and only agreement with PyTorch gates'}. "
          f"Images: {d['images']['calibration']} calibration, {d['images']['selection']} selection, "
          f"{d['images']['verification']} verification (disjoint; gates read only the verification set) from "
          f"`{d['images']['dir']}`.\n\n",
          f"Gates: top-1 agreement with PyTorch >= {d['gates']['min_agreement']:g} %"
          + (f", top-1 drop <= {d['gates']['max_top1_drop']:g} points unless within noise (McNemar)" if d['gates']['applies_top1']
             and d['gates']['max_top1_drop'] is not None else "")
          + f", FP32 relative logit error <= {d['gates']['fp32_max_rel_error']:g}, no NaN/Inf. "
          "Brackets: 95 % Wilson intervals.\n\n"]
    rows = []
    for r in d["candidates"]:
        v = r.get("verification") or {}
        agree = v.get("agreement")
        change = v.get("top1_change")
        rows.append([
            f"**{r['backend']}**" if r["backend"] == chosen else r["backend"], r["precision"], r["status"],
            f"{agree['value']:.1f} [{agree['low']:.1f}, {agree['high']:.1f}]" if agree else "",
            f"{v['top1']['value']:.1f}" if v.get("top1") else "",
            f"{-change['drop_points']:+.2f} (p={change['p_value']:.2g})" if change else "",
            fmt(v.get("kl_mean")) if v.get("kl_mean") is not None else "",
            f"{v['max_rel_error']:.1e}" if v.get("max_rel_error") is not None else "",
            _speed_cell(r, objective), _ratio(r, "vs_ort_fp32"), _ratio(r, "vs_pytorch"),
            r.get("decision") or r.get("why") or ""])
    md.append(markdown_table(["backend", "precision", "gates", "agreement % [95 % CI]", "top-1 %", "top-1 change, points (McNemar p)",
                              "KL", "max rel. err", speed_head, "vs ORT FP32", "vs PyTorch", "verdict"], rows))
    t = d.get("pytorch_eager") or {}
    if t:
        md.append(f"\nPyTorch eager (the reference, not a candidate): {_speed_cell({'speed': t}, objective)}. "
                  "Speeds measured interleaved in one run, order rotated every round; ratios are medians of "
                  "per-round ratios.\n")
    notes = [(r["backend"], n) for r in d["candidates"] for n in ((r.get("verification") or {}).get("notes") or [])]
    if notes:
        md.append("\nNotes:\n\n" + "".join(f"- {b}: {n}\n" for b, n in notes))
    if plot_name:
        md.append(f"\n![speed against agreement]({plot_name})\n")
    md.append(f"\nDecision rule: {d['decision']['rule']}. Took {d['seconds']} s.\n")
    return "".join(md)


def plot_png(d: dict[str, Any]) -> bytes | None:
    """Speed against agreement, one point per candidate that ran, the chosen one marked."""
    pts = [(r["backend"], r["verification"]["agreement"], r["speed"], r["status"], r["backend"] == d["decision"]["chosen"])
           for r in d["candidates"] if (r.get("verification") or {}).get("agreement") and r.get("speed")]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    throughput = d["objective"] == "throughput"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, agree, speed, status, chosen in pts:
        y = speed["img_s"] if throughput else speed["p50_ms"]
        err = [[agree["value"] - agree["low"]], [agree["high"] - agree["value"]]]
        ax.errorbar([agree["value"]], [y], xerr=err, fmt="*" if chosen else ("o" if status == "passed" else "x"),
                    markersize=16 if chosen else 7, color="tab:red" if chosen else ("tab:blue" if status == "passed" else "grey"),
                    capsize=3)
        ax.annotate(name + (" (chosen)" if chosen else ""), (agree["value"], y), textcoords="offset points", xytext=(6, 6))
    ax.axvline(d["gates"]["min_agreement"], color="grey", linestyle="--", linewidth=1)
    ax.margins(x=0.12, y=0.08)  # room for the labels of points at 100 % agreement
    ax.set_xlabel("top-1 agreement with PyTorch, % (95 % CI)")
    ax.set_ylabel(f"images/s at batch {d['batch']}" if throughput else "p50 latency, ms (batch 1)")
    env = d["environment"]["machine"]
    ax.set_title(f"{d['model']}: candidates on {env['cpu'][:40]}", fontsize=9)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write(prefix: Path, d: dict[str, Any]) -> None:
    from scarlet_deploy.runtime.core.artifacts import write_bytes_atomic, write_json_atomic

    prefix = Path(prefix)
    png = plot_png(d)
    plot = prefix.with_name(prefix.name + ".png")
    if png:
        write_bytes_atomic(plot, png)
    write_json_atomic(prefix.with_name(prefix.name + ".json"), d)
    write_bytes_atomic(prefix.with_name(prefix.name + ".md"), markdown(d, plot.name if png else None).encode())


def summary(d: dict[str, Any], package: Path | None) -> str:
    """The one screen `scarlet deploy` ends with."""
    objective = d["objective"]
    env = d["environment"]["machine"]
    lines = [f"scarlet deploy {d['model']} on {env['cpu']} ({env['isa']}), {objective} objective, {d['seconds']} s",
             f"{'backend':<13} {'prec':<5} {'gates':<11} {'agreement % [95% CI]':<21} {'speed':<25} {'vs ORT':<7} verdict"]
    for r in d["candidates"]:
        v = r.get("verification") or {}
        a = v.get("agreement")
        agree = f"{a['value']:.1f} [{a['low']:.1f}, {a['high']:.1f}]" if a else "-"
        verdict = (r.get("decision") or r.get("why") or "")
        lines.append(f"{r['backend']:<13} {r['precision']:<5} {r['status']:<11} {agree:<21} "
                     f"{_speed_cell(r, objective) or '-':<25} {_ratio(r, 'vs_ort_fp32') or '-':<7} {verdict[:100]}")
    chosen = d["decision"]["chosen"]
    if chosen and package:
        lines += [f"chosen: {chosen} -> package {package}",
                  f"  check it anywhere: scarlet check {package}",
                  f"  serve it:          scarlet serve --package {package}"]
    else:
        lines.append("no candidate passed its gates: no package written (see the report for each verdict)")
    return "\n".join(lines)
