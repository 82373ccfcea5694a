"""The instruction stage's allocator setting: a large block that the heap cannot hold is mapped
on its own, however large a freed block raised glibc's dynamic threshold, so freeing it gives
the memory back."""

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

PROBE = """
import ctypes, ctypes.util, sys
from asclepius_r.heap import map_large_blocks

FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS.split()]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
freed = bytearray(8 << 20)  # freeing a mapped 8 MiB block raises the dynamic threshold to 8 MiB
del freed
if sys.argv[1] == "fixed":
    assert map_large_blocks()
size = libc.mallinfo2().fordblks + (2 << 20)  # more than the heap has free: it must grow, or map
mapped = libc.mallinfo2().hblkhd
block = bytearray(size)
print("mapped" if libc.mallinfo2().hblkhd >= mapped + size else "heap")
del block
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"), reason="not glibc >= 2.33")
@pytest.mark.parametrize(("threshold", "expected"), [("dynamic", "heap"), ("fixed", "mapped")])
def test_a_block_the_heap_cannot_hold_is_mapped_once_the_threshold_is_fixed(threshold, expected):
    probe = subprocess.run([sys.executable, "-c", PROBE, threshold], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == expected
