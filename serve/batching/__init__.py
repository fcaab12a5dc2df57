"""Dynamic batching: an async queue per model that forms batches for the worker pool."""

from serve.batching.batcher import BatchExecutor, BatchResult, DynamicBatcher, WorkerLease

__all__ = ["BatchExecutor", "BatchResult", "DynamicBatcher", "WorkerLease"]
