"""ONNX export of the single-step model, parity checks and the ONNX Runtime session wrapper."""
