"""`keep_freed_memory`: after it, a large block comes from the process's heap (kept when freed)
instead of fresh pages mapped for it and unmapped on free."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# In a fresh interpreter: where does a 64 MiB block live, before and after the call? glibc's
# mallinfo2 counts mmapped bytes in `hblkhd`.
PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util
    from specray.workers.engine.host_memory import keep_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2

    def mapped_while_held():
        block = bytearray(64 << 20)
        mapped = libc.mallinfo2().hblkhd
        del block
        return mapped

    before = mapped_while_held()
    kept = keep_freed_memory()
    print(before >= 64 << 20, kept, mapped_while_held() < 64 << 20)
    """
)


def test_a_large_block_comes_from_the_heap_after_the_call():
    if sys.platform != "linux":
        pytest.skip("glibc's mallopt: Linux only")
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "True", "the probe's 64 MiB block was not mmapped before the call (glibc default)"
    assert out[1] == "True", "mallopt refused the thresholds"
    assert out[2] == "True", "a 64 MiB block was still mmapped after keep_freed_memory()"
