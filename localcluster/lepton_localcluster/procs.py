"""Process helpers for the local cluster (standard library only: the watchdog imports it).

Every process the local cluster starts (control plane, simulated pods, operators started
by the pytest plugin) carries ``LEPTON_LOCALCLUSTER=<cluster id>`` in its environment.
That marker is inherited by grandchildren (torchrun's workers, for example), so
:func:`marked_processes` finds everything a cluster left behind, whatever its process
group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import time

MARKER_ENV = "LEPTON_LOCALCLUSTER"
_PR_SET_PDEATHSIG = 1

try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # not Linux: no parent-death signal, the watchdog still cleans up
    _libc = None


def child_setup(pgid: int | None = None, death_signal: int = signal.SIGKILL):
    """Return a ``preexec_fn``: join process group ``pgid`` (or lead a new session when
    None) and ask the kernel to send ``death_signal`` when the parent thread dies."""

    def _setup() -> None:
        if pgid is None:
            os.setsid()
        else:
            try:
                os.setpgid(0, pgid)
            except OSError:  # the group's leader is gone: lead a new group instead
                os.setpgid(0, 0)
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)

    return _setup


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_pair(host: str = "0.0.0.0") -> int:
    """A port p such that p and p + 1 are both free on ``host`` right now: a LeptonJob's
    generations alternate between rendezvousPort and the next port, and torch's TCPStore
    binds every interface, so in process mode both must be free."""
    for _ in range(100):
        port = free_port(host)
        if port >= 65534:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports found")


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def marked_processes(cluster_id: str | None = None) -> list[int]:
    """Pids (other than ours) whose environment carries the cluster marker.

    With ``cluster_id=None`` any local cluster's processes are returned."""
    wanted = f"{MARKER_ENV}={cluster_id}".encode() if cluster_id else f"{MARKER_ENV}=".encode()
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        hit = any(e == wanted or (cluster_id is None and e.startswith(wanted)) for e in env)
        if hit and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def kill_marked(cluster_id: str, timeout: float = 3.0) -> list[int]:
    """SIGKILL every process of a cluster and wait for them to go; return the pids hit."""
    pids = marked_processes(cluster_id)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    return pids


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
