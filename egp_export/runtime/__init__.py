"""Running exported models: backends (ONNX Runtime, torch CUDA, TensorRT), the profiler, the CI latency gate, engines."""
