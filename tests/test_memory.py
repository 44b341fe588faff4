"""client/memory.py: large blocks come from the heap (no fresh mmap per allocation) once the settings
are in force, in a worker thread too; an operator's own glibc malloc settings are left alone."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's allocator only")

# In a fresh process: optionally apply the settings, then allocate 80 MB in a new thread (as Flower's
# engine thread allocates a large activation) and report how many blocks glibc mmapped for it.
PROBE = """
import ctypes, json, sys, threading
import numpy as np
from client.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "apply" else None
seen = {}

def allocate():
    earlier = libc.mallinfo2().hblks  # mapped before (imports): not this allocation's
    block = np.ones(80 * 2**20, dtype=np.uint8)
    seen["mmapped"] = libc.mallinfo2().hblks - earlier
    seen["sum"] = int(block[::4096].sum())

thread = threading.Thread(target=allocate)
thread.start()
thread.join()
print(json.dumps({"applied": applied, **seen}))
"""


def _probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_large_blocks_come_from_the_heap_once_applied():
    before = _probe("leave")
    after = _probe("apply")
    assert before["mmapped"] >= 1  # glibc's default: an 80 MB block in a thread is a fresh mapping
    assert after["applied"] is True
    assert after["mmapped"] == 0
    assert after["sum"] == before["sum"] == 80 * 2**20 // 4096


def test_an_operators_own_malloc_settings_are_kept():
    kept = _probe("apply", MALLOC_ARENA_MAX="4")
    assert kept["applied"] is False
    assert kept["mmapped"] >= 1
