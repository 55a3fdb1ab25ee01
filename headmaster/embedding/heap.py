"""The C heap under a CPU forward pass: keep freed memory for the next batch instead of returning it.

glibc's malloc hands large freed blocks straight back to the kernel (munmap, or trimming the top of
the heap). A CPU forward pass allocates and frees a few hundred MB of activations per batch, so with
decoding in between, every batch faulted in ~300 MB of fresh zeroed pages again: 80k page faults and
12-18% of the forward pass's time (measured on CLIP B/32 geometry, batch 16; see bench/RESULTS.md).
Raising the mmap and trim thresholds makes freed blocks stay in the heap and be reused;
`release_freed_memory` gives them back once the work is done (the daemon lives on after a burst).

Only glibc has these knobs; elsewhere both functions do nothing.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BELOW = 1 << 30  # blocks up to 1 GiB come from (and go back to) the heap


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
        libc.gnu_get_libc_version  # glibc only (musl has no mallopt thresholds)
        libc.mallopt
        libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()
_kept = False


def keep_freed_memory() -> bool:
    """Stop returning freed blocks to the kernel (process-wide, idempotent); False where unsupported."""
    global _kept
    if _LIBC is None:
        return False
    if not _kept:
        # the mmap threshold first: setting only the trim threshold would also fix the mmap threshold at
        # its current (small) value, which is worse than glibc's default
        _kept = bool(_LIBC.mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(_LIBC.mallopt(M_TRIM_THRESHOLD, KEEP_BELOW))
    return _kept


def release_freed_memory() -> None:
    """Hand the heap's free memory back to the kernel now (a no-op unless `keep_freed_memory` took effect)."""
    if _LIBC is not None and _kept:
        _LIBC.malloc_trim(0)
