"""ONNX / TensorRT export (grows with the export issue)."""
