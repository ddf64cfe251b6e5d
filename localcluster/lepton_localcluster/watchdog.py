"""Clean up after a local cluster whose owner died without calling ``stop()``.

Started by :class:`LocalCluster` as ``python watchdog.py <cluster id> [<temp workdir>]`` in
its own session, with stdin a pipe whose only writer is the owner. When the owner exits,
however it exits (SIGKILL included), the pipe closes; the watchdog then SIGKILLs every
process that carries the cluster's marker (control plane, pods and their children),
removes the cluster's /etc/hosts block and removes the cluster's temporary workdir. It
imports only the standard library and its two siblings, so it starts fast and works
while the package is half torn down.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hostsfile  # noqa: E402
import procs  # noqa: E402


def main() -> None:
    cluster_id = sys.argv[1]
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, KeyboardInterrupt):
        pass
    procs.kill_marked(cluster_id)
    try:
        hostsfile.remove_block(cluster_id)
    except OSError:
        pass
    if len(sys.argv) > 2:
        import shutil

        shutil.rmtree(sys.argv[2], ignore_errors=True)


if __name__ == "__main__":
    main()
