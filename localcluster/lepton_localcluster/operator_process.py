"""The operator (``python -m lepton_operator.cli run``) as a subprocess against a
:class:`LocalCluster`: for the tests (the ``run_operator`` fixture) and the benchmarks.

It runs in its own process group and carries the cluster's environment marker, so
stopping it stops what it started, and the cluster's leftover check covers it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import procs
from .controlplane import LocalCluster


class OperatorProcess:
    """The operator (``lepton-operator run``) as a subprocess in its own process group."""

    def __init__(self, cluster: LocalCluster, namespace: str, args: list[str], env: dict | None, log_path: Path):
        self.cluster = cluster
        self.namespace = namespace
        self.args = list(args)
        self.extra_env = dict(env or {})
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def command(self) -> list[str]:
        """The command line used to start the operator."""
        return [sys.executable, "-m", "lepton_operator.cli", "run", "--namespace", self.namespace, *self.args]

    @property
    def pid(self) -> int | None:
        """Pid of the running operator, or None."""
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        """Start the operator (appending to its log)."""
        env = dict(os.environ)
        env.update(self.cluster.env())
        env[procs.MARKER_ENV] = self.cluster.cluster_id  # leftover check covers it
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        with open(self.log_path, "ab") as log:
            log.write(f"--- start: {' '.join(self.command)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=procs.child_setup(None),
            )

    def running(self) -> bool:
        """True while the operator process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM the operator's process group; SIGKILL after ``timeout``; return its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            procs.signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                procs.signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        procs.signal_group(self.proc.pid, signal.SIGKILL)  # anything it left behind
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL the operator's process group at once (a crash, as seen by the cluster)."""
        if self.proc is None:
            return None
        procs.signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return self.proc.returncode

    def restart(self) -> None:
        """Stop (gracefully) and start again with the same arguments."""
        self.stop()
        self.start()

    def log_text(self) -> str:
        """Everything the operator has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 30) -> str:
        """Wait until ``text`` appears in the log; return the log, or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log_text()
            if text in log:
                return log
            if not self.running():
                break
            time.sleep(0.2)
        raise TimeoutError(f"operator log lacks {text!r} after {timeout} s; log tail:\n{self.log_text()[-3000:]}")
