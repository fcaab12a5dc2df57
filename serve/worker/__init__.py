"""The worker process: the only place (with backends/) that imports torch, onnxruntime or CUDA."""

# In a worker's start-up failure (its Fatal message): the model itself failed to load or to warm
# up (its bundle, its code, its weights, its device), not the host. Starting it again gives the
# same failure: the parent treats it as the model's fault, not as a transient condition.
MODEL_FAILED = "the model failed to load or warm up"
