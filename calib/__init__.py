"""INT8 post-training quantization: calibration statistics, Q/DQ ONNX for onnxruntime and TensorRT."""
