from __future__ import annotations

from typing import Any

from scarlet_deploy.runtime.bench.plan import BACKEND_LABELS
from scarlet_deploy.runtime.core.host import load_text
from scarlet_deploy.runtime.core.report import markdown_table
from scarlet_deploy.runtime.measure import Ratio, paired_ratio


def _ratio_text(r: dict[str, float] | None) -> str:
    return "-" if r is None else Ratio(**r).text()


def _num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"



def _pct_peak(r: dict[str, Any]) -> str:
    return f"{_num(r['pct_peak'])} {r['peak_kind'].upper()}" if r.get("pct_peak") is not None else "-"


def peak_text(peaks: dict[str, dict[str, Any]]) -> str:
    parts = [f"{k.upper()} {p['gops']:.0f} GOP/s ({p['method']}, {p['threads']} threads)" for k, p in peaks.items()]
    n = len(next(iter(peaks.values()))["samples_gops"]) if peaks else 0
    return f"Machine peaks: {'; '.join(parts)}; best of {n} samples taken before and after each model."


TABLE_HEADERS = ("Model", "Backend", "Batch", "p50 ms", "p90 ms", "p99 ms", "img/s", "spread",
                 "x PyTorch", "x ORT FP32", "GOP/s", "% peak", "Mem MB", "File MB")


def render_markdown(data: dict[str, Any]) -> str:
    env, peak, st = data["environment"], data["peak"], data["settings"]
    rows = [(r["model"], BACKEND_LABELS.get(r["backend"], r["backend"]), r["batch"], _num(r["p50_ms"], 2),
             _num(r["p90_ms"], 2), _num(r["p99_ms"], 2), _num(r["throughput"]), f"{r['spread_pct']:.0f}%",
             _ratio_text(r.get("vs_torch")), _ratio_text(r.get("vs_ort")), _num(r["gops"]), _pct_peak(r),
             _num(r["mem_mb"], 0), _num(r["size_mb"]))
            for r in data["results"]]
    lines = [
        "## Performance",
        "",
        f"Measured {env['date']} on {env['machine']['cpu']} ({env['machine']['logical_cpus']} logical CPUs) by "
        f"`scarlet bench`; {data['config']['repeats']} interleaved rounds of ~{data['config']['seconds']:g} s per "
        f"backend after warm-up, whole run {data['elapsed_s']:.0f} s. {load_text(data.get('machine_load'))}",
        f"CPU ISA: {env['machine'].get('isa', 'not recorded')}. " + peak_text(peak),
        f"PyTorch eager: {st['torch']['mode']}, {st['torch']['threads']} threads, "
        f"channels_last {'on' if st['torch']['channels_last'] else 'off'}. onnxruntime (CPU): {_ort_text(st['ort'])}."
        + _ov_text(st.get("openvino")),
        "",
        markdown_table(TABLE_HEADERS, rows).rstrip(),
        "",
        "img/s: median of the rounds; spread: (max - min) / median over rounds. Speed-ups: images/s paired round by "
        "round, median (min-max); at batch 1 that is the mean-latency ratio. GOP/s = 2 x MACs/image x img/s; "
        "% peak: share of the FP32 peak for float backends, of the INT8 peak for INT8 ones (none for GPU backends). "
        "Mem MB: peak RSS growth of a fresh process loading that backend and running batches up to this one "
        "(weights, arenas, activations; not library code, not GPU memory). File MB: the artifact run "
        "(PyTorch: state_dict bytes).",
        "",
        "Work per image: " + ", ".join(f"{m} {v['macs']['macs'] / 1e6:.0f}M MACs" for m, v in data["models"].items()) + ".",
    ]
    if data.get("peak_invalid"):
        lines += ["", "No % peak for " + ", ".join(data["peak_invalid"]) + ": they ran faster than the measured peak, "
                  "so that peak is not this CPU's ceiling."]
    skipped = skipped_lines(data)
    if skipped:
        lines += ["", "Not measured:"] + skipped
    if data.get("tune"):
        t = data["tune"]
        kept = t["winner"] == t["default"]
        lines += ["", f"onnxruntime tuning ({t['model']}, batch {t['batch']}, {len(t['grid'])} settings): best "
                      f"{_ort_text(t['best'])} at {t['gain_over_default']:.2f}x the default; "
                      + ("default kept (gain within the noise margin)." if kept else "used for this run.")]
    lines += ["", "Summary (largest batch speed-ups; batch-1 p50 latency ratios):"] + summary_lines(data)
    return "\n".join(lines) + "\n"


def skipped_lines(data: dict[str, Any]) -> list[str]:
    """One line per reason (TensorRT missing is one line, not one per model and precision)."""
    by_reason: dict[str, dict[str, list[str]]] = {}
    for m, v in data["models"].items():
        for b, why in v["skipped"].items():
            by_reason.setdefault(why, {}).setdefault(m, []).append(BACKEND_LABELS.get(b, b))
    lines = []
    for why, per_model in by_reason.items():
        by_backends: dict[tuple[str, ...], list[str]] = {}
        for m, backends in per_model.items():
            by_backends.setdefault(tuple(backends), []).append(m)
        for backends, models in by_backends.items():
            lines.append(f"- {', '.join(backends)} ({', '.join(models)}): {why}.")
    return lines


def _ort_text(o: dict[str, Any]) -> str:
    return f"{o['threads']} threads, {o['opt_level']}, {o['execution_mode']}, arena {'on' if o['memory_arena'] else 'off'}"


def _ov_text(ov: dict[str, dict[str, Any]] | None) -> str:
    if not ov:
        return ""
    hints = ", ".join(f"{BACKEND_LABELS.get(b, b)} {o['precision']}" for b, o in ov.items())
    o = next(iter(ov.values()))
    return (f" OpenVINO (CPU): INFERENCE_NUM_THREADS {o['threads']}, PERFORMANCE_HINT {o['hint']}, "
            f"ENABLE_CPU_PINNING {'on' if o['pin_threads'] else 'off'}, INFERENCE_PRECISION_HINT for float ops: {hints}; "
            "one compiled model per batch size.")


def summary_lines(data: dict[str, Any]) -> list[str]:
    """The numbers the project's targets are stated in, one line per model."""
    big, out = max(data["config"]["batches"]), []
    for m in data["models"]:
        cell = {(r["backend"], r["batch"]): r for r in data["results"] if r["model"] == m}
        parts = []
        for b, ref, label in (("ort", "torch", "ORT FP32 / PyTorch"), ("ort-int8", "ort", "ORT INT8 / ORT FP32"),
                              ("ov-int8", "ort-int8", "OpenVINO INT8 / ORT INT8")):
            r, r_ref = cell.get((b, big)), cell.get((ref, big))
            if r and r_ref:  # paired round by round, like every ratio in the table
                ratio = paired_ratio(r["throughput_rounds"], r_ref["throughput_rounds"])
                parts.append(f"{label} {ratio.median:.2f}x at batch {big}")
        r1 = cell.get(("ort", 1))
        if r1 and "latency_vs_torch" in r1:
            parts.append(f"batch-1 latency PyTorch / ORT FP32 {r1['latency_vs_torch']:.2f}x")
        out.append(f"- {m}: " + ("; ".join(parts) if parts else "no comparable pair measured") + ".")
    return out
