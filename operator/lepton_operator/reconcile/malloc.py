"""The C allocator under the operator: which one, its settings, and its own statistics.

The operator image preloads jemalloc (operator/Dockerfile: LD_PRELOAD). Under job churn,
glibc's malloc kept growing the operator's RSS (+10.7 to +13.7 MiB/h after the first 10
minutes) while Python's own objects stayed flat (tracemalloc and the container table in
memprofile); under jemalloc the same churn levels off (+2 to +6 MiB/h; benchmarks/
RESULTS.md, "Churn"). Where jemalloc is not preloaded (a pip install, the tests), glibc's
malloc is tuned instead: at most 2 arenas, and freed memory handed back every 30 s.
Everything here does nothing where it does not apply (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from typing import Optional

# glibc's mallopt parameter for the most malloc arenas (malloc.h).
M_ARENA_MAX = -8

# How often freed heap memory is handed back to the kernel (malloc_trim).
MALLOC_TRIM_SECONDS = 30.0


def jemalloc():
    """jemalloc's `mallctl` when jemalloc is the process's allocator (preloaded), else None."""
    try:
        mallctl = ctypes.CDLL(None).mallctl  # the process's symbols: a preloaded allocator's first
    except (OSError, AttributeError):
        return None
    # int mallctl(const char *name, void *oldp, size_t *oldlenp, void *newp, size_t newlen)
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    mallctl.restype = ctypes.c_int
    return mallctl


def glibc():
    """The C library if it is glibc (mallopt, malloc_trim, mallinfo2), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def allocator() -> str:
    """ "jemalloc", "glibc" or "other": which malloc serves the process."""
    if jemalloc() is not None:
        return "jemalloc"
    return "glibc" if glibc() is not None else "other"


def cap_malloc_arenas(arenas: int = 2) -> bool:
    """Let glibc's malloc use at most `arenas` arenas, unless MALLOC_ARENA_MAX says otherwise.

    By default glibc gives each thread that allocates concurrently an arena of its own, up
    to 8 per core: the `--api-threads` threads decoding JSON would hold up to 8 x cores
    arenas of freed memory that is never given back. Python's own allocator does not need
    them. Called before any thread starts; False where it does not apply (not glibc, or
    jemalloc preloaded)."""
    libc = glibc()
    if libc is None or jemalloc() is not None or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))


def trim_malloc_heap_periodically(every: float = MALLOC_TRIM_SECONDS) -> bool:
    """Hand glibc's freed heap memory back to the kernel every `every` seconds
    (malloc_trim, from a daemon thread). Measured under churn, it helped within the
    spread of the runs; jemalloc, which returns freed memory on its own, is what made
    RSS level off. False where it does not apply (not glibc, or jemalloc preloaded)."""
    libc = glibc()
    if libc is None or jemalloc() is not None:
        return False

    def trim() -> None:
        while True:
            time.sleep(every)
            libc.malloc_trim(0)

    threading.Thread(target=trim, name="lepton-malloc-trim", daemon=True).start()
    return True


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (malloc.h, glibc >= 2.33): every field a size_t."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",  # bytes the arenas took from the system (brk/mmap)
            "ordblks",  # free chunks
            "smblks",  # free fastbin chunks
            "hblks",  # mmapped blocks
            "hblkhd",  # bytes in mmapped blocks
            "usmblks",
            "fsmblks",  # bytes in free fastbin chunks
            "uordblks",  # bytes in use (arenas)
            "fordblks",  # bytes free (arenas)
            "keepcost",  # releasable bytes at the top of the heap
        )
    ]


def _jemalloc_stat(mallctl, name: str) -> int:
    value, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
    if mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
        raise OSError(f"mallctl {name} failed")
    return value.value


def heap_stats() -> Optional[dict[str, int]]:
    """The allocator's own account of the C heap, in bytes, with "allocator" naming it:
    jemalloc: allocated (live), active (pages holding them), resident, retained (mapped,
    not resident); glibc (mallinfo2): in_use, free (kept, not returned), mmapped,
    top_releasable. None where neither answers (musl, glibc < 2.33, jemalloc without stats).

    tracemalloc sees only Python's allocators; what C libraries (OpenSSL, pydantic-core)
    allocate shows here, and a heap whose "free" grows while "in use" stays flat is
    fragmentation, not live data."""
    mallctl = jemalloc()
    if mallctl is not None:
        try:
            epoch = ctypes.c_uint64(1)  # jemalloc refreshes its statistics on an epoch write
            mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch))
            stats = {k: _jemalloc_stat(mallctl, f"stats.{k}") for k in ("allocated", "active", "resident", "retained")}
        except OSError:
            return None
        return {"allocator": "jemalloc", **stats}
    libc = glibc()
    mallinfo2 = getattr(libc, "mallinfo2", None) if libc is not None else None
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {
        "allocator": "glibc",
        "arenas": info.arena,
        "in_use": info.uordblks,
        "free": info.fordblks,
        "mmapped": info.hblkhd,
        "top_releasable": info.keepcost,
    }


def heap_line() -> str:
    """heap_stats() as one line of text (MiB)."""
    stats = heap_stats()
    if stats is None:
        return f"C heap ({allocator()}): no statistics"
    mib = {k: v / 2**20 for k, v in stats.items() if k != "allocator"}
    if stats["allocator"] == "jemalloc":
        return (
            f"C heap (jemalloc): allocated {mib['allocated']:.1f} MiB, active {mib['active']:.1f} MiB, "
            f"resident {mib['resident']:.1f} MiB, retained {mib['retained']:.1f} MiB"
        )
    return (
        f"C heap (glibc): arenas {mib['arenas']:.1f} MiB, in use {mib['in_use']:.1f} MiB, "
        f"free but kept {mib['free']:.1f} MiB (top {mib['top_releasable']:.1f}), mmapped {mib['mmapped']:.1f} MiB"
    )
