"""Large buffers stay in the process's heap instead of fresh memory mappings; start-up's
long-lived objects leave the garbage collector's full passes.

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

``freeze_long_lived`` moves every object alive at that moment (imported modules, the model, the
server's own structures) into the collector's permanent generation (``gc.freeze``). CPython's
full collection walks every tracked object: with the serving process's ~44,000 objects after
start-up, each one stopped the event loop for 18–30 ms on the 2-vCPU dev VM, and it was the
slowest call of every 10-second run. Frozen, a full pass walks only what was made since (under
1 ms). Each process freezes once it is set up: the serving process and each relay when they
take traffic, the worker template before it forks (a child's collections then never write to
the pages it shares with the template, which is what the CPython documentation advises for
fork servers), and each worker once warm. ``WARMSERVE_GC_FREEZE=0`` turns it off.

A frozen object is never collected while frozen. Most live as long as the process; a model
version's do not: its service, batcher, pool and latency windows are reference cycles that the
collector must free once the version is stopped. So stopping a version asks for
``refreeze_soon``: a second later (once the stopping code has let go) the frozen objects are
unfrozen, one full collection frees the dead version, and what is left is frozen again. That
one pause, at an unload or a version switch, stands in for one at every full collection.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging

from serve.config import gc_freeze_from_env, malloc_tuning_from_env

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit; bigger blocks are mapped
TRIM_THRESHOLD = 128 << 20  # free memory kept at the top of the heap before it is returned
REFREEZE_AFTER_S = 1.0  # after a model version stopped: its last references are gone by then

_refreeze: asyncio.TimerHandle | None = None  # the refreeze asked for, not done yet


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


def freeze_long_lived(where: str) -> int:
    """Collect what is garbage now, then freeze every object still alive out of the
    collector's passes (module doc); logged with ``where``. The objects frozen so far (0 when
    WARMSERVE_GC_FREEZE=0)."""
    if not gc_freeze_from_env():
        return 0
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info(
        "%s: %d long-lived objects frozen out of the garbage collector's passes", where, frozen
    )
    return frozen


def refreeze_soon(why: str) -> None:
    """Objects frozen earlier may be garbage now (``why``: a model version stopped): in
    REFREEZE_AFTER_S, unfreeze everything, collect, and freeze what is left (module doc). Once
    for several asks meanwhile; nothing when nothing is frozen or no event loop runs."""
    global _refreeze
    if gc.get_freeze_count() == 0 or _refreeze is not None:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    _refreeze = loop.call_later(REFREEZE_AFTER_S, refreeze, why)


def refreeze(why: str) -> int:
    """Unfreeze, collect what became garbage among the frozen objects, freeze the rest; logged.
    The objects freed."""
    global _refreeze
    _refreeze = None
    was = gc.get_freeze_count()
    gc.unfreeze()
    freed = gc.collect()
    gc.freeze()
    log.info(
        "%s: %d objects freed among the %d frozen ones; %d frozen again",
        why,
        freed,
        was,
        gc.get_freeze_count(),
    )
    return freed
