"""The instruction stage's memory release: free pages inside glibc's heap, pinned there by a
live block above them, go back to the system."""

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

PROBE = """
import sys
from asclepius_r.instructions.heap import release_free_memory

def resident_mb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024

# 60 KB blocks come from the heap (under glibc's first mmap threshold, 128 KB), each followed by a
# small block that stays, so that freeing the large ones cannot shrink the heap from its top
large, kept = [], []
for _ in range(2000):
    large.append(bytearray(60_000))
    kept.append(bytearray(600))
held = resident_mb()
del large
freed = resident_mb()
if sys.argv[1] == "release":
    assert release_free_memory()
print(held, freed, resident_mb())
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim"), reason="not glibc")
@pytest.mark.parametrize("release", [False, True])
def test_free_pages_between_live_blocks_go_back_only_when_released(release):
    command = [sys.executable, "-c", PROBE, "release" if release else "keep"]
    held, freed, after = map(int, subprocess.run(command, capture_output=True, text=True, check=True).stdout.split())
    assert held - freed < 20  # free() alone keeps the pages: live blocks lie above them
    if release:
        assert held - after > 90  # of the 120 MB freed
    else:
        assert held - after < 20
