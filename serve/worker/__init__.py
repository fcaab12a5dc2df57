"""The worker process: the only place (with backends/) that imports torch, onnxruntime or CUDA."""
