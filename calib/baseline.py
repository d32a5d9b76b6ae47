"""The plain baseline every report compares with: onnxruntime's own quantize_static on the same
calibration images (U8S8, per-channel weights, min/max ranges, Q/DQ, nothing excluded) — what a
user gets without this package. If ours is not better, the report says so."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scarlet_deploy.calib import evaluate
from scarlet_deploy.calib.qdq import quiet_quantizer

DESCRIPTION = "onnxruntime quantize_static: QDQ, U8S8 (UINT8 activations, INT8 per-channel weights), MinMax"


@dataclass
class Baseline:
    path: Path  # kept for the process's lifetime (the speed comparison reads it)
    report: evaluate.Accuracy
    selection: evaluate.Accuracy | None
    _dir: tempfile.TemporaryDirectory | None = None


def quantize_plain(onnx_path: str | os.PathLike, images: np.ndarray, output: str | os.PathLike, batch: int = 8) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    name = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(images[i:i + batch] for i in range(0, len(images), batch))

        def get_next(self) -> dict | None:
            x = next(self.batches, None)
            return None if x is None else {name: x}

    with quiet_quantizer():
        quantize_static(str(onnx_path), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)


def build(onnx_path: str | os.PathLike, x_calib: np.ndarray, x_select: np.ndarray, y_select: np.ndarray | None,
          ref_select: np.ndarray, x_report: np.ndarray, y_report: np.ndarray | None, ref_report: np.ndarray,
          threads: int | None = None) -> Baseline:
    """The plain model, evaluated with onnxruntime's integer kernels on the selection and report images."""
    d = tempfile.TemporaryDirectory(prefix="scarlet-baseline-")
    path = Path(d.name) / "plain.int8.onnx"
    quantize_plain(onnx_path, x_calib, path)
    sel = evaluate.accuracy(evaluate.logits(path, x_select, threads=threads), y_select, ref_select) \
        if len(x_select) else None
    rep = evaluate.accuracy(evaluate.logits(path, x_report, threads=threads), y_report, ref_report)
    return Baseline(path, rep, sel, d)
