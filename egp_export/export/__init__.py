"""ONNX export with fallbacks and the ONNX Runtime check of the written file."""
