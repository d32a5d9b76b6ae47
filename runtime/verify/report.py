from __future__ import annotations

from pathlib import Path

from scarlet_deploy.runtime.verify.run import VerifyReport


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _sci(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def seed_result_line(r: VerifyReport) -> str | None:
    """The line SCARLET-NAS's verify.py prints, from the PyTorch reference: percentages, 4 and 6 decimals."""
    ref = r.reference
    if ref["top1"] is None:
        return None
    return f"Evaluate Result: Total: {ref['images']:d}\tmTop1: {100 * ref['top1']:.4f}\tmTop5: {100 * ref['top5']:.6f}"


def _reference_line(r: VerifyReport) -> str:
    ref = r.reference
    if ref["source"] == "cache":
        return (f"- PyTorch reference: from the cache ({ref['cache']}), computed {ref['computed']} on {ref['device']} "
                f"({ref['machine']}, torch {ref['torch']}) at {_rate(ref['images_per_s'])} images/s (--no-reference-cache recomputes it)")
    cached = f"; cached in {ref['cache']}" if ref["cache"] else "; not cached"
    return f"- PyTorch reference: {ref['source']} at {_rate(ref['images_per_s'])} images/s{cached}"


def _throughput(r: VerifyReport) -> list[str]:
    from scarlet_deploy.runtime.core.report import markdown_table

    run, ref = r.run, r.reference
    rows = [["PyTorch reference" + (" (read from the cache)" if ref["source"] == "cache" else f" ({ref['device']})"),
             _rate(r.dataset["decoded"] / ref["read_seconds"] if ref.get("read_seconds") else ref["images_per_s"]),
             ref.get("read_seconds", ref["inference_seconds"])]]
    rows += [[b["name"], _rate(b["images_per_s"]), b["inference_seconds"]] for b in r.backends]
    if r.pipeline:
        p = r.pipeline
        rows.append([f"{p['name']} on deploy tensors", _rate(p["images"] / p["inference_seconds"] if p["inference_seconds"] else None),
                     p["inference_seconds"]])
    rows.append(["waiting for decoded images", "-", run["waiting_for_images_seconds"]])
    rows.append(["whole run", _rate(run["images_per_s"]), run["seconds"]])
    proj = run["projected_seconds_for_50000_images"]
    return ["## Throughput (this machine) and the 50,000-image projection", "",
            markdown_table(["stage", "images/s", "seconds"], rows),
            f"Projected wall time for the 50,000 ImageNet validation images with this command here: "
            f"{_duration(proj['with_cached_reference'])} with the PyTorch reference cached, "
            f"{_duration(proj['computing_the_reference'])} computing it (this run's seconds per image, with the "
            "reference's inference time taken out or added; decoding assumed to cost what it cost here)"
            + (f"; resumed run: {run['resumed_images']} images came from an interrupted session" if run["resumed_images"] else "")
            + f". Peak RSS of this process: {run['peak_rss_mib']:.0f} MiB.", ""]


def render_markdown(r: VerifyReport) -> str:
    from scarlet_deploy.runtime.core.report import markdown_table

    ds, run, m = r.dataset, r.run, r.model
    weights = "pretrained" if m["pretrained"] else "SEEDED, NOT PRETRAINED (accuracy is meaningless; parity still holds)"
    lines = [
        f"# verify {m['name']}{' +LET' if m['let'] else ''}: "
        f"{('PASS' if r.passed else 'FAIL') if r.backends else 'PyTorch reference only'}",
        "",
        f"- weights: {weights}; {m['weights']}",
        f"- images: {ds['decoded']} decoded of {ds['images']} ({ds['layout']} at {ds['root']}; "
        f"{ds['images_in_folder']} in the folder{', --limit ' + str(ds['limit']) if ds['limit'] else ''}); "
        f"classes present: {ds['classes_present'] if ds['classes_present'] is not None else 'n/a'}; "
        f"labels: {ds['label_source']}; unreadable: {ds['skipped']}",
        _reference_line(r),
        f"- throughput: {_rate(run['images_per_s'])} images/s for decode + PyTorch"
        f"{' (cached logits)' if r.reference['source'] == 'cache' else ''} + {len(r.backends)} backend(s)"
        f"{' + deploy-pipeline pass' if r.pipeline else ''} (batch {run['batch']}, {run['workers']} decode workers, "
        f"{run['threads']} inference threads; {run['seconds']:.1f} s, {run['waiting_for_images_seconds']:.1f} s waiting for images)",
        f"- {r.environment['date']}, {r.environment['machine']['cpu']}",
        *[f"- note: {n}" for n in r.notes],
        "",
        "## Model parity (same reference-preprocessed tensors into every backend)",
        "",
    ]
    headers = ["backend", "precision", "images", "top-1", "top-5", "top-1 agree", "top-5 overlap",
               "max abs err", "max rel err", "mean abs err", "worst cos", "img/s", "threshold", "result"]
    rows = [["PyTorch (reference)", "fp32", r.reference["images"] or ds["decoded"], _pct(r.reference["top1"]),
             _pct(r.reference["top5"]), "-", "-", "-", "-", "-", "-", _rate(r.reference["images_per_s"]), "-", "-"]]
    for b in r.backends:
        rows.append([b["name"], b["precision"], b["images"], _pct(b["top1"]), _pct(b["top5"]), _pct(b["top1_agreement"]),
                     _pct(b["top5_overlap"]), _sci(b["max_abs_error"]), _sci(b["max_rel_error"]), _sci(b["mean_abs_error"]),
                     f"{b['worst_cosine']:.6f}", _rate(b["images_per_s"]), b["rule"], "PASS" if b["passed"] else "**FAIL**"])
    lines.append(markdown_table(headers, rows))
    p = r.pipeline
    if p:
        lines += ["## Pipeline parity (PyTorch on PIL reference preprocessing vs ONNX on OpenCV deploy preprocessing)", "",
                  markdown_table(["backend", "top-1", "top-5", "top-1 change", "top-5 change", "top-1 agree",
                                  "top-5 overlap", "max abs err", "worst cos"],
                                 [[p["name"], _pct(p["top1"]), _pct(p["top5"]),
                                   "n/a" if p["top1_change_from_preprocessing"] is None else f"{100 * p['top1_change_from_preprocessing']:+.2f} pt",
                                   "n/a" if p["top5_change_from_preprocessing"] is None else f"{100 * p['top5_change_from_preprocessing']:+.2f} pt",
                                   _pct(p["top1_agreement"]), _pct(p["top5_overlap"]), _sci(p["max_abs_error"]),
                                   f"{p['worst_cosine']:.6f}"]]),
                  "Reported, not gated: the preprocessing choice, not the model, causes these differences.", ""]
    for b in [*r.backends, *([p] if p else [])]:
        dis = b["disagreements"]
        if not dis:
            continue
        title = b["name"] + (" with deploy preprocessing" if b is p else "")
        lines += [f"## Top-1 differs from PyTorch: {title} ({len(dis)} images"
                  f"{', first ' + str(MAX_LISTED_MD) + ' shown; all in the JSON' if len(dis) > MAX_LISTED_MD else ''})", "",
                  markdown_table(["file", "label", "PyTorch", "p", "backend", "p"],
                                 [[Path(d["file"]).name, d["label_name"] or "n/a", d["pytorch_name"], f"{d['pytorch_prob']:.3f}",
                                   d["backend_name"], f"{d['backend_prob']:.3f}"] for d in dis[:MAX_LISTED_MD]])]
    lines += _throughput(r)
    if r.skipped:
        lines += [f"## Unreadable images ({len(r.skipped)}, skipped)", ""] + [f"- {s['path']}: {s['why']}" for s in r.skipped] + [""]
    return "\n".join(lines)


MAX_LISTED_MD = 20  # disagreements per backend in the markdown (the JSON has all of them)
