"""The deploy package: built in a temporary folder beside its destination, checked, then renamed.

A package never carries its final name half-written: an interruption leaves at most a hidden
`.NAME.*.part` folder, removed on the way out. A package that fails its own `scarlet check` is
not renamed into place either.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.deploy import golden
from scarlet_deploy.runtime.deploy.check import DEPLOY_JSON, check_package, write_sums

README = """# {model}: deployed with scarlet-deploy

`{artifact}` is {summary} ({precision}). `scarlet deploy` chose it on {cpu} ({isa}) as the fastest
candidate that passed its gates against PyTorch; `REPORT.md` says why, with every other candidate's
verdict, and `deploy.json` holds every figure.

## Check it (seconds, on any machine you copy it to)

    scarlet check .                          # files, golden images, drift; exit 0 pass, 1 fail, 2 unusable
    scarlet check . --server http://HOST:8000   # the same golden images through a live Triton
    sha256sum -c SHA256SUMS                  # the bytes alone, without scarlet

## Run it

```python
import json, numpy as np
from PIL import Image
{runtime_import}

spec = json.load(open("golden/preprocess.json"))

def preprocess(path):  # shorter side to spec["resize"] (bilinear), centre crop, RGB, /255, mean/std, NCHW
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = spec["resize"]
    w, h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    im = im.resize((w, h), Image.BILINEAR)
    c = spec["crop"]
    left, top = int(round((w - c) / 2.0)), int(round((h - c) / 2.0))
    x = np.asarray(im.crop((left, top, left + c, top + c)), np.float32) / 255.0
    x = (x - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    return x.transpose(2, 0, 1)[None]

{runtime_run}
print(logits.argmax(1))  # ImageNet-1k class index
```

## Serve it

    scarlet serve --package .                # Triton on 127.0.0.1:8000 (HTTP) / 8001 (gRPC), model `{name}`
    tritonserver --model-repository=triton   # your own Triton: the repository for {triton_backend}

Threads: timed with {threads}; set the runtime's thread count to the cores you give it.
"""

RUNTIME_SNIPPETS = {
    "onnxruntime": ("import onnxruntime as ort",
                    'sess = ort.InferenceSession("{artifact}", providers=["CPUExecutionProvider"])\n'
                    'logits = sess.run(None, {{"input": preprocess("photo.jpg")}})[0]'),
    "openvino": ("import openvino as ov",
                 'core = ov.Core()\n'
                 'compiled = core.compile_model("{artifact}", "CPU", {{"INFERENCE_PRECISION_HINT": "{ov_precision}"}})\n'
                 'logits = compiled(preprocess("photo.jpg"))[0]'),
}


def write(cfg, chosen, data: dict[str, Any], pixels: list[np.ndarray], split, labels, pre, ref: np.ndarray,
          deployed: np.ndarray, thresholds: dict[str, Any], fp32: Path) -> Path:
    from scarlet_deploy.calib.images import relative_names
    from scarlet_deploy.runtime.core.artifacts import current_umask, manifest_path
    from scarlet_deploy.runtime.deploy import report
    from scarlet_deploy.runtime.serve.repository import ExportRequest, write_triton_repository

    out = Path(os.path.abspath(cfg.output))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    try:
        # mkdtemp makes 0700; a package is for others too (a Triton server, a CI job), as mkdir would make it
        os.chmod(tmp, 0o777 & ~current_umask())
        c = chosen.candidate
        artifact = Path(chosen.artifact)
        shutil.copyfile(artifact, tmp / artifact.name)
        if manifest_path(artifact).is_file():
            shutil.copyfile(manifest_path(artifact), manifest_path(tmp / artifact.name))
        n = len(pixels)
        names = relative_names(split.eval[:n])
        golden.write(tmp, pixels, names, list(labels[:n]) if labels is not None else [-1] * n, pre, ref, deployed,
                     thresholds)
        if c.runtime == "tensorrt":  # the repository reads input/output names and dims from the ONNX the plan came from
            write_triton_repository(ExportRequest(fp32, tmp / "triton", cfg.model, engine=tmp / artifact.name))
        else:
            write_triton_repository(ExportRequest(tmp / artifact.name, tmp / "triton", cfg.model, backend=c.triton_backend))
        data["package"] = {"artifact": artifact.name, "backend": c.name, "precision": c.precision, "runtime": c.runtime,
                           "serve_name": cfg.model, "serve_backend": c.serve_backend, "triton_backend": c.triton_backend,
                           "golden": thresholds | {"images": n}}
        png = report.plot_png(data)
        if png:
            (tmp / "speed_vs_agreement.png").write_bytes(png)
        (tmp / "REPORT.md").write_text(report.markdown(data, "speed_vs_agreement.png" if png else None))
        (tmp / DEPLOY_JSON).write_text(json.dumps(data, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text(_readme(data, c, artifact.name))
        write_sums(tmp)
        res = check_package(tmp, threads=cfg.threads)
        if not res.passed:
            raise ScarletError(f"the package failed its own check before it was renamed into place "
                               f"({'; '.join(res.failed)}); nothing was written. Please report this.")
        data["package"]["self_check"] = res.as_dict() | {"package": str(out)}
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace(tmp: Path, out: Path) -> None:
    """tmp becomes out. An older package at out (deploy refuses any other folder there) is moved aside
    first and removed after: if the process dies between the two renames, the old package survives
    under its hidden name and the new one under its .part name; neither is half-written."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rename(out, old / "package")
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _readme(d: dict[str, Any], c, artifact: str) -> str:
    imp, run = RUNTIME_SNIPPETS.get(c.runtime, RUNTIME_SNIPPETS["onnxruntime"])
    env = d["environment"]["machine"]
    return README.format(model=d["model"], artifact=artifact, summary=c.summary, precision=c.precision,
                         cpu=env["cpu"], isa=env["isa"], runtime_import=imp,
                         runtime_run=run.format(artifact=artifact, ov_precision="bf16" if c.precision == "bf16" else "f32"),
                         name=d["model"], triton_backend={"ort": "onnxruntime", "ov": "OpenVINO"}[c.triton_backend],
                         threads=d["threads"])
