"""The ONNX opsets an export may use: here, not in onnx_export, so that `scarlet --help` needs no torch."""
DEFAULT_OPSET = 17
MIN_OPSET = 14  # HardSwish
MAX_OPSET = 20  # the newest opset torch.onnx's TorchScript exporter writes (torch.onnx._constants)
