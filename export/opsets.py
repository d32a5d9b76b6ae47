"""The exporters and the ONNX opsets each may write.

Here, not in onnx_export, so that `scarlet --help` needs no torch.
"""
from __future__ import annotations

from scarlet_deploy.runtime.core.errors import ScarletError

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"
# (lowest, highest, default) per exporter.
# torchscript: 14 for HardSwish; 20 is the newest its symbolic functions write (torch.onnx._constants).
# dynamo: torchlib is written in opset 18, and a lower request is "version-converted" on a best-effort basis that,
# measured with torch 2.13 + onnxscript 0.7.2, leaves every model at 18 while asking for 14-17 (no error),
# so 18 is the floor; 23 is torch's ONNX_MAX_OPSET, and 18-23 all pass export, onnxsim, strict shape
# inference, onnxruntime 1.32 and the parity gate on SCARLET-A and Lite0.
OPSETS: dict[str, tuple[int, int, int]] = {"torchscript": (14, 20, 17), "dynamo": (18, 23, 18)}
MIN_OPSET = min(lo for lo, _, _ in OPSETS.values())
MAX_OPSET = max(hi for _, hi, _ in OPSETS.values())


def resolve_opset(exporter: str, opset: int | None) -> int:
    """The opset to write: the exporter's default for None, else `opset` once it is in the exporter's range."""
    if exporter not in OPSETS:
        raise ScarletError(f"--exporter must be one of {', '.join(EXPORTERS)}, not {exporter!r}.")
    lo, hi, default = OPSETS[exporter]
    if opset is None:
        return default
    if opset < lo:
        why = "HardSwish needs opset >= 14" if exporter == "torchscript" else \
            "its operator library is written in opset 18 and does not convert down reliably"
        raise ScarletError(f"--opset {opset} is too old for the {exporter} exporter ({why}); pass --opset {lo} or newer"
                           + (", or --exporter torchscript for opsets 14-17." if exporter == "dynamo" else "."))
    if opset > hi:
        other = f", or --exporter dynamo for opsets up to {OPSETS['dynamo'][1]}." if exporter == "torchscript" else "."
        raise ScarletError(f"--opset {opset} is newer than the {exporter} exporter writes (at most {hi}); "
                           f"pass --opset {hi} or less{other}")
    return opset
