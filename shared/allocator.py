"""Make freed tensor memory go back to the operating system.

glibc serves large allocations with mmap, but by default it raises that threshold to the size
of every mmapped block it frees (up to 32 MB). After the first training step almost every
activation then comes from the heap, and the heap keeps what was freed resident: a worker that
ran one SmolLM2 backprop step stayed at 3.7 GB RSS afterwards instead of 0.95 GB, and peaks
grew by up to 1 GB with it. A fixed threshold turns the adjustment off, so blocks above it are
unmapped the moment torch frees them. (Equivalent to MALLOC_MMAP_THRESHOLD_, which only works
when set before the process starts.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_GLIBC_MAX_THRESHOLD = 32 * 1024 * 1024  # HEAP_MAX_SIZE / 2 on 64-bit: mallopt refuses more


def set_mmap_threshold(threshold_bytes: int) -> bool:
    """Serve allocations of at least `threshold_bytes` with mmap, always; 0 leaves glibc's default.

    Returns whether the threshold is now in force (False off glibc, e.g. on musl or macOS).
    """
    if threshold_bytes <= 0:
        return False
    if threshold_bytes > _GLIBC_MAX_THRESHOLD:
        raise ValueError(f"mmap threshold {threshold_bytes} is above glibc's maximum {_GLIBC_MAX_THRESHOLD}")
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt in %s: allocator left as it is", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
