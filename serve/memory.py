"""Large buffers stay in the process's heap instead of fresh memory mappings.

glibc gives an allocation above its mmap threshold (128 KiB at first, raised as such blocks are
freed) a mapping of its own, and hands free memory at the top of the heap back to the kernel
beyond a trim threshold (twice the mmap threshold). A server that moves image-sized tensors
allocates and frees many such blocks per call: the request bytes, the frame they came in, the
protobuf copy, the batch. Each block that comes back from the kernel is zero-filled page by page
on first write. On the 2-vCPU dev VM, with 64 callers sending 150 KB requests, that was about 10
page faults per call in the serving process behind relays and 25 without them (2 with this
tuning).

``keep_large_buffers_in_heap`` raises both thresholds once at process start, as servers commonly
do with jemalloc or tcmalloc settings. Memory a process has used stays with it up to the trim
threshold, which is bounded (TRIM_THRESHOLD) and small beside a model's weights. Set
``WARMSERVE_MALLOC_TUNING=0`` to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import logging

from serve.config import malloc_tuning_from_env

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit; bigger blocks are mapped
TRIM_THRESHOLD = 128 << 20  # free memory kept at the top of the heap before it is returned


def keep_large_buffers_in_heap() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if they were set."""
    if not malloc_tuning_from_env():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1)
    done = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1) and done
    if not done:
        log.warning("mallopt refused the thresholds; large buffers keep glibc's defaults")
    return done
