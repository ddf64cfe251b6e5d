"""Where the operator's memory goes: tracemalloc, dumped on SIGUSR1 (a diagnostic, off by default).

With `LEPTON_TRACEMALLOC=1` (or a number: the frames kept per allocation, default 1) in its
environment, `lepton-operator run` starts `tracemalloc` as it starts, and each SIGUSR1
writes a report to `LEPTON_TRACEMALLOC_PATH` (default `/tmp/lepton-memprofile-<pid>.txt`;
`{n}` in it is replaced by the dump's number, so a series of dumps keeps every one):

- the process's RSS, the memory tracemalloc sees (current and peak) and its own overhead;
- the C allocator's own account of its heap (`malloc.heap_stats`: jemalloc's or
  glibc's), which sees what tracemalloc does not: C libraries' memory, fragmentation;
- the top allocations by file and line, and by file (kopf's, ours, the Kubernetes
  client's, the standard library's);
- the lines whose memory grew most since the previous dump (per-job costs, when the
  dumps are taken at different job counts) and since the first (what churn left behind);
- the most numerous live objects by type (`gc.get_objects()`: dicts, asyncio tasks,
  kopf's per-object memories), which says *what* the lines above allocated;
- the largest containers (dicts, lists, sets, deques) with who holds each (the object and
  attribute, or the module global) and how their length changed since the previous dump:
  a table keyed by job or object that never forgets shows up here, by name.

The report is written by a thread of its own, so the signal handler returns at once; the
snapshot itself holds the GIL for a moment (about a second per 100 MiB traced). tracemalloc
costs memory and CPU (roughly +50% traced memory with one frame): measure RSS without it.

`benchmarks/control_plane.py --profile-memory` sets the variables and sends the signal at
each job count it holds idle. The import in `cli.run()` installs it; without the variable it
does nothing.
"""

from __future__ import annotations

import gc
import linecache
import logging
import os
import signal
import sys
import threading
import time
import tracemalloc
import types
from collections import Counter, deque

from lepton_operator.reconcile import malloc

ENV = "LEPTON_TRACEMALLOC"
ENV_PATH = "LEPTON_TRACEMALLOC_PATH"
TOP_LINES = 40
TOP_FILES = 25
TOP_TYPES = 30
TOP_CONTAINERS = 20
CONTAINER_TYPES = (dict, list, set, deque)

log = logging.getLogger("lepton_operator.memprofile")
_lock = threading.Lock()
_dumps = 0
_previous: tracemalloc.Snapshot | None = None  # the last dump's, for the growth table
_first: tracemalloc.Snapshot | None = None  # the first dump's: what stays after churn
_previous_containers: dict[str, int] = {}  # holder -> length at the last dump


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def _short(path: str) -> str:
    """A file name from the package on: `kopf/_core/...`, `lepton_operator/...`, `asyncio/...`."""
    for marker in ("site-packages/", "/operator/"):
        if marker in path:
            return path.split(marker, 1)[1]
    for prefix in sys.path:
        if prefix and path.startswith(prefix.rstrip("/") + "/"):
            return path[len(prefix.rstrip("/")) + 1 :]
    return path


def type_counts(limit: int = TOP_TYPES) -> list[tuple[str, int]]:
    """The most numerous live objects tracked by the garbage collector, by type name."""
    counts = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
    return counts.most_common(limit)


def _name_in(container: object, obj: object) -> str | None:
    """The key, attribute or slot under which `container` holds `obj` (None: not by name)."""
    names = container if isinstance(container, dict) else getattr(container, "__dict__", None)
    if isinstance(names, dict):
        for key, value in names.items():
            if value is obj:
                return str(key)
    for slot in getattr(type(container), "__slots__", ()):
        if getattr(container, slot, None) is obj:
            return slot
    return None


def _holder(referrer: object, obj: object, skip: set[int], depth: int = 3) -> str:
    """Who holds `obj`: `module.name` for a module global, `module.Class.attribute` for an
    instance attribute; a tuple, a list or a dict that is not an object's `__dict__` is followed to
    its own holder (`builtins.tuple in kopf...`) up to `depth` steps. `skip`: ids of the
    caller's own lists and tuples, which refer to everything they look at."""
    name = _name_in(referrer, obj)
    if isinstance(referrer, dict):  # a module's or an instance's __dict__
        for owner in gc.get_referrers(referrer):
            if getattr(owner, "__dict__", None) is referrer:
                referrer = owner
                break
    if isinstance(referrer, types.ModuleType):
        return f"{referrer.__name__}.{name or '__dict__'}"
    kind = f"{type(referrer).__module__}.{type(referrer).__qualname__}" + (f".{name}" if name else "")
    if isinstance(referrer, (tuple, list, dict)) and depth > 0:
        outers = [o for o in gc.get_referrers(referrer) if id(o) not in skip and o is not obj]
        # An object or a module names the place best; then the containers around it.
        outers.sort(key=lambda o: type(o) in (tuple, list, dict))
        for outer in outers:
            if type(outer).__module__ != "builtins" or type(outer) in (tuple, list, dict):
                return f"{kind} in {_holder(outer, referrer, skip | {id(outers)}, depth - 1)}"
    return kind


def largest_containers(limit: int = TOP_CONTAINERS) -> list[tuple[int, str, str]]:
    """The longest dicts, lists, sets and deques held by an object the garbage collector
    tracks, as (length, type, holder), longest first. Containers are found through their
    holders, so a dict of only strings and numbers (which the collector does not track)
    is found too. tracemalloc's own snapshots are left out."""
    longest: dict[int, tuple[int, object, object]] = {}  # id -> (length, container, holder)
    for referrer in gc.get_objects():
        if type(referrer).__module__ == "tracemalloc":
            continue
        for ref in gc.get_referents(referrer):
            if type(ref) in CONTAINER_TYPES and id(ref) not in longest:
                longest[id(ref)] = (len(ref), ref, referrer)
    top = sorted(longest.values(), key=lambda entry: entry[0], reverse=True)[:limit]
    longest.clear()  # its references keep every container alive
    skip = {id(top), *(id(entry) for entry in top)}
    found = [(n, type(container).__name__, _holder(referrer, container, skip)) for n, container, referrer in top]
    top.clear()
    return found


def _by_caller(snapshot: tracemalloc.Snapshot) -> list:
    """Traced memory by the innermost frame in a third-party package or ours (json, copy and
    asyncio lines say little; kopf's watcher or our index function calling them does)."""
    totals: dict[tuple[str, int], list[int]] = {}
    for trace in snapshot.traces:
        where = None
        for frame in reversed(trace.traceback):  # most recent first
            if "site-packages/" in frame.filename or "lepton_operator" in frame.filename:
                where = (frame.filename, frame.lineno)
                break
        if where is None:
            where = (trace.traceback[-1].filename, trace.traceback[-1].lineno)
        entry = totals.setdefault(where, [0, 0])
        entry[0] += trace.size
        entry[1] += 1
    return sorted(((k, tuple(v)) for k, v in totals.items()), key=lambda kv: -kv[1][0])


def report(snapshot: tracemalloc.Snapshot | None = None) -> str:
    """The text of one dump (see the module docstring)."""
    lines = [f"lepton-operator memory profile, pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    lines.append(f"RSS {_rss_mib():.1f} MiB")
    lines.append(malloc.heap_line())
    if snapshot is None and tracemalloc.is_tracing():
        snapshot = tracemalloc.take_snapshot()
    if snapshot is not None:
        current, peak = tracemalloc.get_traced_memory()
        lines.append(
            f"traced {current / 2**20:.1f} MiB (peak {peak / 2**20:.1f} MiB), "
            f"tracemalloc's own {tracemalloc.get_tracemalloc_memory() / 2**20:.1f} MiB"
        )
        snapshot = snapshot.filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, linecache.__file__)]
        )
        stats = snapshot.statistics("lineno")
        total = sum(s.size for s in stats)
        lines.append(f"\n## top {TOP_LINES} lines (of {total / 2**20:.1f} MiB in {len(stats)} lines)")
        lines.append("KiB | blocks | avg B | where | code")
        for s in stats[:TOP_LINES]:
            frame = s.traceback[0]
            code = linecache.getline(frame.filename, frame.lineno).strip()[:90]
            lines.append(
                f"{s.size / 1024:9.1f} | {s.count:7d} | {s.size // max(1, s.count):5d} | "
                f"{_short(frame.filename)}:{frame.lineno} | {code}"
            )
        if tracemalloc.get_traceback_limit() > 1:
            lines.append(f"\n## top {TOP_LINES} callers outside the standard library (innermost kopf/client/our frame)")
            lines.append("KiB | blocks | where | code")
            for (filename, lineno), (size, count) in _by_caller(snapshot)[:TOP_LINES]:
                code = linecache.getline(filename, lineno).strip()[:90]
                lines.append(f"{size / 1024:9.1f} | {count:7d} | {_short(filename)}:{lineno} | {code}")
        global _previous
        if _previous is not None:
            lines.append(f"\n## top {TOP_LINES} lines by growth since the previous dump")
            lines.append("KiB now | KiB growth | blocks growth | where | code")
            for d in snapshot.compare_to(_previous, "lineno")[:TOP_LINES]:
                frame = d.traceback[0]
                code = linecache.getline(frame.filename, frame.lineno).strip()[:90]
                lines.append(
                    f"{d.size / 1024:9.1f} | {d.size_diff / 1024:+9.1f} | {d.count_diff:+7d} | "
                    f"{_short(frame.filename)}:{frame.lineno} | {code}"
                )
        global _first
        if _first is not None and _first is not _previous:
            lines.append(f"\n## top {TOP_LINES} lines by growth since the first dump")
            lines.append("KiB now | KiB growth | blocks growth | where | code")
            for d in snapshot.compare_to(_first, "lineno")[:TOP_LINES]:
                frame = d.traceback[0]
                code = linecache.getline(frame.filename, frame.lineno).strip()[:90]
                lines.append(
                    f"{d.size / 1024:9.1f} | {d.size_diff / 1024:+9.1f} | {d.count_diff:+7d} | "
                    f"{_short(frame.filename)}:{frame.lineno} | {code}"
                )
        if _first is None:
            _first = snapshot
        _previous = snapshot
        by_file = snapshot.statistics("filename")
        lines.append(f"\n## top {TOP_FILES} files")
        lines.append("KiB | blocks | file")
        for s in by_file[:TOP_FILES]:
            lines.append(f"{s.size / 1024:9.1f} | {s.count:7d} | {_short(s.traceback[0].filename)}")
    else:
        lines.append("tracemalloc is off (set LEPTON_TRACEMALLOC=1 before the operator starts)")
    lines.append(f"\n## top {TOP_TYPES} live object types (gc)")
    for name, count in type_counts():
        lines.append(f"{count:9d} | {name}")
    global _previous_containers
    lines.append(f"\n## top {TOP_CONTAINERS} containers by length (gc)")
    lines.append("length | change since the previous dump | type | held by")
    now = {}
    for n, kind, by in largest_containers():
        key = f"{kind} {by}"
        was = _previous_containers.get(key)
        change = "new" if was is None else f"{n - was:+d}"
        lines.append(f"{n:9d} | {change:>8} | {kind} | {by}")
        now[key] = n
    _previous_containers = now
    return "\n".join(lines) + "\n"


def dump(path: str | None = None) -> str:
    """Write one report; return the path written."""
    global _dumps
    with _lock:
        _dumps += 1
        n = _dumps
        target = (path or os.environ.get(ENV_PATH) or f"/tmp/lepton-memprofile-{os.getpid()}.txt").replace(
            "{n}", str(n)
        )
        text = report()
        tmp = f"{target}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, target)  # a reader never sees half a report
    log.info(f"memory profile written to {target}")
    return target


def _on_signal(signum, frame) -> None:
    threading.Thread(target=_safe_dump, name="lepton-memprofile", daemon=True).start()


def _safe_dump() -> None:
    try:
        dump()
    except Exception:  # a diagnostic must never hurt the operator
        log.exception("memory profile failed")


def install_from_env(environ=None) -> bool:
    """Start tracemalloc and the SIGUSR1 dump when LEPTON_TRACEMALLOC is set (not 0); True if so."""
    value = (environ if environ is not None else os.environ).get(ENV, "").strip()
    if not value or value in ("0", "false", "no"):
        return False
    try:
        frames = max(1, int(value))
    except ValueError:
        frames = 1
    if threading.current_thread() is not threading.main_thread():
        return False  # signal handlers can only be set from the main thread
    if not tracemalloc.is_tracing():
        tracemalloc.start(frames)
    signal.signal(signal.SIGUSR1, _on_signal)
    return True


install_from_env()
