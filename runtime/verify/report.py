from __future__ import annotations

from pathlib import Path

from scarlet_deploy.runtime.verify.run import VerifyReport


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _sci(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def render_markdown(r: VerifyReport) -> str:
    from scarlet_deploy.runtime.core.report import markdown_table

    ds, run, m = r.dataset, r.run, r.model
    weights = "pretrained" if m["pretrained"] else "SEEDED, NOT PRETRAINED (accuracy is meaningless; parity still holds)"
    lines = [
        f"# verify {m['name']}{' +LET' if m['let'] else ''}: {'PASS' if r.passed else 'FAIL'}",
        "",
        f"- weights: {weights}; {m['weights']}",
        f"- images: {ds['decoded']} decoded of {ds['images']} ({ds['layout']} at {ds['root']}; "
        f"{ds['images_in_folder']} in the folder{', --limit ' + str(ds['limit']) if ds['limit'] else ''}); "
        f"classes present: {ds['classes_present'] if ds['classes_present'] is not None else 'n/a'}; "
        f"labels: {ds['label_source']}; unreadable: {ds['skipped']}",
        f"- throughput: {run['images_per_s']:.1f} images/s for decode + PyTorch + {len(r.backends)} backend(s)"
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
             _pct(r.reference["top5"]), "-", "-", "-", "-", "-", "-", f"{r.reference['images_per_s']:.1f}", "-", "-"]]
    for b in r.backends:
        rows.append([b["name"], b["precision"], b["images"], _pct(b["top1"]), _pct(b["top5"]), _pct(b["top1_agreement"]),
                     _pct(b["top5_overlap"]), _sci(b["max_abs_error"]), _sci(b["max_rel_error"]), _sci(b["mean_abs_error"]),
                     f"{b['worst_cosine']:.6f}", f"{b['images_per_s']:.1f}", b["rule"], "PASS" if b["passed"] else "**FAIL**"])
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
    if r.skipped:
        lines += [f"## Unreadable images ({len(r.skipped)}, skipped)", ""] + [f"- {s['path']}: {s['why']}" for s in r.skipped] + [""]
    return "\n".join(lines)


MAX_LISTED_MD = 20  # disagreements per backend in the markdown (the JSON has all of them)
