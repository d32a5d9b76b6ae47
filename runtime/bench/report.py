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


def peak_text(peaks: dict[str, dict[str, Any]], missing: dict[str, str] | None = None) -> str:
    parts = [f"{k.upper()} {p['gops']:.0f} GOP/s ({p['method']}, {p['threads']} threads)" for k, p in peaks.items()]
    n = len(next(iter(peaks.values()))["samples_gops"]) if peaks else 0
    text = f"Machine peaks: {'; '.join(parts)}; best of {n} samples taken before and after each model."
    if missing:
        text += " " + " ".join(f"{why[0].upper()}{why[1:]}." for why in missing.values())
    return text


TABLE_HEADERS = ("Model", "Backend", "Batch", "p50 ms", "p90 ms", "p99 ms", "img/s", "spread",
                 "x PyTorch", "x ORT FP32", "GOP/s", "% peak", "Mem MB", "File MB")
THROUGHPUT_HEADERS = ("Model", "Backend", "Batch", "Streams", "img/s", "spread", "x PyTorch", "x ORT FP32",
                      "GOP/s", "% peak")


def _mode(r: dict[str, Any]) -> str:
    return r.get("mode", "latency")  # reports from before the modes were all latency mode


def _streams(r: dict[str, Any]) -> str:
    return str(r["streams"]) if r["streams"] > 1 else "1 (= latency run)"


def render_markdown(data: dict[str, Any]) -> str:
    env, peak, st = data["environment"], data["peak"], data["settings"]
    latency = [r for r in data["results"] if _mode(r) == "latency"]
    throughput = [r for r in data["results"] if _mode(r) == "throughput"]
    rows = [(r["model"], BACKEND_LABELS.get(r["backend"], r["backend"]), r["batch"], _num(r["p50_ms"], 2),
             _num(r["p90_ms"], 2), _num(r["p99_ms"], 2), _num(r["throughput"]), f"{r['spread_pct']:.0f}%",
             _ratio_text(r.get("vs_torch")), _ratio_text(r.get("vs_ort")), _num(r["gops"]), _pct_peak(r),
             _num(r["mem_mb"], 0), _num(r["size_mb"]))
            for r in latency]
    trows = [(r["model"], BACKEND_LABELS.get(r["backend"], r["backend"]), r["batch"], _streams(r), _num(r["throughput"]),
              f"{r['spread_pct']:.0f}%", _ratio_text(r.get("vs_torch")), _ratio_text(r.get("vs_ort")), _num(r["gops"]),
              _pct_peak(r)) for r in throughput]
    lines = [
        "## Performance",
        "",
        f"Measured {env['date']} on {env['machine']['cpu']} ({env['machine']['logical_cpus']} logical CPUs) by "
        f"`scarlet bench`; {data['config']['repeats']} interleaved rounds of ~{data['config']['seconds']:g} s per "
        f"backend after warm-up, whole run {data['elapsed_s']:.0f} s. {load_text(data.get('machine_load'))}",
        f"CPU ISA: {env['machine'].get('isa', 'not recorded')}. " + peak_text(peak, data.get("peak_missing")),
        f"PyTorch eager: {st['torch']['mode']}, {st['torch']['threads']} threads, "
        f"channels_last {'on' if st['torch']['channels_last'] else 'off'}. onnxruntime (CPU): {_ort_text(st['ort'])}."
        + _ov_text(st.get("openvino")),
        "",
        *(["Latency mode (`infer`: one batch at a time, every core on it):", ""] if trows else []),
        markdown_table(TABLE_HEADERS, rows).rstrip(),
        "",
        *(["Throughput mode (`infer_many`: as many batches in flight as the backend has streams; "
           "speed-ups against the references in this mode):", "", markdown_table(THROUGHPUT_HEADERS, trows).rstrip(), ""]
          if trows else []),
        "img/s: median of the rounds; spread: (max - min) / median over rounds. Speed-ups: images/s paired round by "
        "round, median (min-max); at batch 1 that is the mean-latency ratio. GOP/s = 2 x MACs/image x img/s; "
        "% peak: share of the peak of the backend's precision (FP32, BF16 or INT8; INT8+BF16 counts as INT8; "
        "none for GPU backends). "
        "Mem MB: peak RSS growth of a fresh process loading that backend and running batches up to this one "
        "(weights, arenas, activations; not library code, not GPU memory). File MB: the artifact run "
        "(PyTorch: state_dict bytes).",
        "",
        "Work per image: " + ", ".join(f"{m} {v['macs']['macs'] / 1e6:.0f}M MACs" for m, v in data["models"].items()) + ".",
    ]
    if data.get("peak_invalid"):
        lines += ["", "No % peak for " + ", ".join(data["peak_invalid"]) + ": they ran faster than the measured peak, "
                  "so that peak is not this CPU's ceiling."]
    no_peak = {}
    for r in data["results"]:
        if r.get("peak_kind") in (data.get("peak_missing") or {}):
            no_peak.setdefault(r["peak_kind"], set()).add(f"{r['model']} {BACKEND_LABELS.get(r['backend'], r['backend'])}")
    for kind, names in no_peak.items():
        lines += ["", f"No % peak for {', '.join(sorted(names))}: {data['peak_missing'][kind]}."]
    compiled = [f"{BACKEND_LABELS.get(b, b)} ({m}) " + ", ".join(f"batch {n} {s:.0f} s" for n, s in per.items())
                for m, v in data["models"].items() for b, per in (v.get("compile_s") or {}).items()]
    if compiled:
        lines += ["", "torch.compile time (first call per batch size; in no timing): " + "; ".join(compiled) + "."]
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
    speed = speed_lines(data)
    if speed:
        lines += ["", "Best CPU path (onnxruntime and OpenVINO backends, either mode):"] + speed
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
            "one compiled model per batch size; throughput mode compiles it again with PERFORMANCE_HINT THROUGHPUT "
            "and keeps optimal_number_of_infer_requests requests in an AsyncInferQueue.")


def _label(r: dict[str, Any]) -> str:
    name = BACKEND_LABELS.get(r["backend"], r["backend"])
    return f"{name}, {r['streams']} streams" if _mode(r) == "throughput" and r["streams"] > 1 else name


def speed_lines(data: dict[str, Any]) -> list[str]:
    """The issue's ratios per model: our best CPU path (ONNX runtimes, any mode) at the largest
    batch against ORT FP32 (latency mode, as onnxruntime runs out of the box, and throughput mode)
    and against torch.compile bf16 (else FP32); the best batch-1 p50 against ORT FP32's."""
    big, out = max(data["config"]["batches"]), []
    for m in data["models"]:
        rows = [r for r in data["results"] if r["model"] == m and r["backend"].startswith(("ort", "ov"))]
        ours = [r for r in rows if r["batch"] == big]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["throughput"])
        parts = [f"best throughput at batch {big}: {_label(best)} {best['throughput']:.0f} img/s"]
        others = {(r["backend"], _mode(r)): r for r in data["results"] if r["model"] == m and r["batch"] == big}
        for key, label in ((("ort", "latency"), "ORT FP32 latency mode"), (("ort", "throughput"), "ORT FP32 throughput mode"),
                           (("torch-compile-bf16", "latency"), "torch.compile BF16"),
                           (("torch-compile", "latency"), "torch.compile FP32")):
            ref = others.get(key)
            if ref and ref is not best:
                ratio = paired_ratio(best["throughput_rounds"], ref["throughput_rounds"])
                parts.append(f"{ratio.median:.2f}x {label}")
            if key[0] == "torch-compile-bf16" and ref:
                break  # the stronger PyTorch baseline is enough
        one = [r for r in rows if r["batch"] == 1 and _mode(r) == "latency"]
        ort1 = next((r for r in one if r["backend"] == "ort"), None)
        if one and ort1:
            fast = min(one, key=lambda r: r["p50_ms"])
            parts.append(f"best batch-1 p50: {_label(fast)} {fast['p50_ms']:.2f} ms = {fast['p50_ms'] / ort1['p50_ms']:.2f}x "
                         "ORT FP32's")
        out.append(f"- {m}: " + "; ".join(parts) + ".")
    return out


def summary_lines(data: dict[str, Any]) -> list[str]:
    """The numbers the project's targets are stated in, one line per model."""
    big, out = max(data["config"]["batches"]), []
    for m in data["models"]:
        cell = {(r["backend"], r["batch"]): r for r in data["results"] if r["model"] == m and _mode(r) == "latency"}
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
