"""A managed block in /etc/hosts per local cluster (standard library only).

Each cluster owns the lines between two markers::

    # >>> lepton-localcluster <cluster id> pid=<owner pid> >>>
    127.0.0.2 job-worker-0.job-workers job-worker-0.job-workers.ns ...
    # <<< lepton-localcluster <cluster id> <<<

The file is rewritten in place (it is often a bind mount that cannot be replaced by a
rename) under an exclusive ``flock``. Blocks whose owner pid is dead are removed by
:func:`remove_stale_blocks` (called when a cluster starts, and by the watchdog).
"""

from __future__ import annotations

import fcntl
import os
import re

HOSTS = os.environ.get("LEPTON_HOSTS_FILE", "/etc/hosts")
_BEGIN = re.compile(r"^# >>> lepton-localcluster (\S+) pid=(\d+) >>>$")


def _begin(cluster_id: str) -> str:
    return f"# >>> lepton-localcluster {cluster_id} pid={os.getpid()} >>>"


def _end(cluster_id: str) -> str:
    return f"# <<< lepton-localcluster {cluster_id} <<<"


def writable(path: str = HOSTS) -> bool:
    """True if the hosts file can be edited by this process."""
    return os.access(path, os.W_OK)


def _edit(edit, path: str) -> None:
    with open(path, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        lines = f.read().splitlines()
        new = edit(lines)
        if new != lines:
            f.seek(0)
            f.write("\n".join(new) + "\n")
            f.truncate()


def _without_blocks(lines: list[str], drop) -> list[str]:
    """Remove the managed blocks for which ``drop(cluster_id, pid)`` is true."""
    out, skipping = [], None
    for line in lines:
        if skipping is not None:
            if line == _end(skipping):
                skipping = None
            continue
        m = _BEGIN.match(line)
        if m and drop(m.group(1), int(m.group(2))):
            skipping = m.group(1)
            continue
        out.append(line)
    return out


def set_block(cluster_id: str, entries: dict[str, list[str]], path: str = HOSTS) -> None:
    """Replace this cluster's block with ``entries`` (ip -> host names)."""

    def edit(lines):
        out = _without_blocks(lines, lambda cid, pid: cid == cluster_id)
        if entries:
            out.append(_begin(cluster_id))
            out += [f"{ip} {' '.join(names)}" for ip, names in sorted(entries.items())]
            out.append(_end(cluster_id))
        return out

    _edit(edit, path)


def remove_block(cluster_id: str, path: str = HOSTS) -> None:
    """Remove this cluster's block, if any."""
    if os.path.exists(path) and writable(path):
        _edit(lambda lines: _without_blocks(lines, lambda cid, pid: cid == cluster_id), path)


def remove_stale_blocks(path: str = HOSTS) -> None:
    """Remove blocks left by clusters whose owner process is dead."""

    def dead(_cid: str, pid: int) -> bool:
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False

    if os.path.exists(path) and writable(path):
        _edit(lambda lines: _without_blocks(lines, dead), path)
