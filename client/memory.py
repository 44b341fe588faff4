"""Host memory for CPU training: keep freed blocks for reuse instead of handing them back to the OS.

torch allocates every activation, gradient and temporary on the CPU with ``malloc``. glibc serves a
block above its mmap threshold (128 KB, rising with use to at most 32 MB) with a fresh ``mmap`` and
returns it with ``munmap`` on free, and a thread other than the main one gets its own arena, whose
heaps hold at most 64 MB, so anything larger is mapped afresh every time. A fresh mapping is zeroed
page by page on first touch: a DP step that needs the same 67 MB activation each time (the CNN at
128 px, batch 64) spent most of its time faulting pages in, and how much depended on the heap's layout
of the moment, so the same run varied from start to start. With the settings below the CNN at 128 px
trained up to 1.7x faster on 2 CPU cores, in the main thread and in a worker thread alike, and the
default ScatterNet study's rounds ~3% (README, "DP-SGD speed"; ``tests/test_memory.py`` checks the
settings' effect on the allocator, not the speed). The price: the process keeps its peak memory
until it exits.

Settings (``mallopt``, process-wide, on Linux with glibc only):

- ``M_MMAP_MAX = 0``: no block is mmapped where a heap can serve it;
- ``M_TRIM_THRESHOLD`` = 2 GB (mallopt takes an int): the heap's free top is kept up to that;
- ``M_ARENA_MAX = 1``: threads that have not yet allocated share the main arena (a thread arena's 64 MB
  heaps cannot hold the large blocks), which the simulation's engine thread, where the inline
  backend trains, needs: so call this before that thread starts.

An operator who set any of glibc's malloc variables (``MALLOC_ARENA_MAX``, ``GLIBC_TUNABLES`` ...) keeps
them: nothing is changed then.
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_ARENA_MAX, 1))
OPERATOR_VARIABLES = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST", "MALLOC_MMAP_MAX_",
                      "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_")

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings above once per process; True if they are in force (False on other C
    libraries, or where the operator set glibc's own)."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(os.environ.get(name) for name in OPERATOR_VARIABLES):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
