"""reconcile/malloc.py: which allocator serves the operator, glibc's tuning where it is
glibc, and the allocator's own statistics, which see what C code allocates outside
Python's allocators. jemalloc is checked in a child process that preloads it, as the
operator image does (operator/Dockerfile)."""

import ctypes
import json
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lepton_operator.reconcile import malloc

pytestmark = pytest.mark.unit

on_glibc = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or malloc.jemalloc() is not None, reason="glibc's malloc only"
)
JEMALLOC = Path(f"/usr/lib/{platform.machine()}-linux-gnu/libjemalloc.so.2")


def _grow_c_heap_by(n_bytes: int, stats) -> tuple[dict, dict]:
    """stats() before and while `n_bytes` are malloc'd directly (invisible to tracemalloc)."""
    libc = ctypes.CDLL(None)  # the process's malloc: a preloaded one comes first
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = stats()
    blocks = [libc.malloc(64 * 1024) for _ in range(n_bytes // (64 * 1024))]
    for b in blocks:
        ctypes.memset(b, 1, 64 * 1024)  # touched, so resident too
    try:
        return before, stats()
    finally:
        for b in blocks:
            libc.free(b)


@on_glibc
def test_glibc_heap_stats_count_what_c_code_allocates():
    before, during = _grow_c_heap_by(4 * 2**20, malloc.heap_stats)
    assert before["allocator"] == "glibc" and malloc.allocator() == "glibc"
    grew = (during["in_use"] + during["mmapped"]) - (before["in_use"] + before["mmapped"])
    assert grew >= 4 * 2**20
    assert malloc.heap_line().startswith("C heap (glibc): arenas ")


@on_glibc
def test_malloc_arenas_are_capped_unless_the_environment_says_otherwise(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert malloc.cap_malloc_arenas() is False  # the administrator's setting stands
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert malloc.cap_malloc_arenas() is True


@on_glibc
def test_freed_heap_memory_is_trimmed_periodically_on_glibc():
    before = set(threading.enumerate())
    assert malloc.trim_malloc_heap_periodically(every=3600) is True
    trimmer = [t for t in set(threading.enumerate()) - before if t.name == "lepton-malloc-trim"]
    assert trimmer and trimmer[0].daemon  # never keeps the process from exiting


CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from lepton_operator.reconcile import malloc
from tests.unit.test_malloc import _grow_c_heap_by
before, during = _grow_c_heap_by(8 * 2**20, malloc.heap_stats)
print(json.dumps({
    "allocator": malloc.allocator(), "before": before, "during": during, "line": malloc.heap_line(),
    "arenas_capped": malloc.cap_malloc_arenas(), "trimming": malloc.trim_malloc_heap_periodically(3600),
}))
"""


@pytest.mark.skipif(not JEMALLOC.exists(), reason="libjemalloc2 is not installed (scripts/setup.sh installs it)")
def test_under_a_preloaded_jemalloc_its_own_statistics_are_read_and_glibc_is_left_alone():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "LD_PRELOAD": str(JEMALLOC)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(root)], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    got = json.loads(out.stdout)
    assert got["allocator"] == "jemalloc"
    assert got["during"]["allocator"] == "jemalloc"
    assert got["during"]["allocated"] - got["before"]["allocated"] >= 7 * 2**20  # of the 8 MiB (the rest moves)
    assert got["during"]["resident"] >= got["during"]["active"] >= got["during"]["allocated"]
    assert got["line"].startswith("C heap (jemalloc): allocated ")
    assert got["arenas_capped"] is False and got["trimming"] is False  # glibc's knobs do not apply
