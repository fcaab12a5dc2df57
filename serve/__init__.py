"""warmserve: a model-serving runtime for GPUs (import package ``serve``)."""

__version__ = "0.1.0"
