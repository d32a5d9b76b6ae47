"""Build SCARLET/Lite0 models, load checkpoints, fold BN/LET and export ONNX."""
