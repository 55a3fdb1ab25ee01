"""headmaster.embedding.heap: freed blocks stay in the heap for reuse, and can be handed back."""

import subprocess
import sys

import pytest

from headmaster.embedding import heap

SCRIPT = """
import numpy as np
from headmaster.embedding.heap import keep_freed_memory, release_freed_memory

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:"))

def held_after_free():
    before = rss_mib()
    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, every page written
    del block
    return rss_mib() - before

plain = held_after_free()
kept = keep_freed_memory()
held = held_after_free()
again = held_after_free()  # the kept pages serve the next block: no growth
before_release = rss_mib()
release_freed_memory()
print(plain, int(kept), held, again, before_release - rss_mib())
"""


@pytest.mark.skipif(heap._LIBC is None, reason="glibc only")
def test_kept_memory_is_reused_then_released():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    plain, kept, held, again, released = (int(v) for v in out.split())
    assert kept == 1
    assert plain < 16  # glibc's default: a freed 64 MiB block goes straight back to the kernel
    assert held >= 48  # kept: it stays in the heap, ready for the next batch's activations
    assert again < 16  # and is reused, not added to
    assert released >= 48  # release_freed_memory hands it back


def test_release_without_keep_is_harmless():
    heap.release_freed_memory()  # must not raise, whatever the platform
