"""README command 1 stays true: `lepton-local demo` runs a job to success end to end.

The demo's own example takes about 5 minutes; this runs the same code path (its own
local control plane in process mode, Debian's Prometheus, the operator, live progress,
summary, plot) on the small `examples/cpu-job.yaml`: 2 workers really training with DDP
over the simulated cluster's DNS, 200 steps.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lepton_localcluster.prometheus import prometheus_binary

pytestmark = [pytest.mark.locale2e, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]


def test_demo_trains_a_job_to_success_and_writes_its_plot(tmp_path):
    if prometheus_binary() is None:
        reason = "Debian's prometheus is not installed (scripts/setup.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    plot = tmp_path / "demo.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lepton_localcluster.cli",
            "demo",
            "--example",
            str(ROOT / "examples" / "cpu-job.yaml"),
            "--plot",
            str(plot),
            "--timeout",
            "400",
        ],
        capture_output=True,
        text=True,
        timeout=500,
        start_new_session=True,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "job cpu-job: Succeeded" in out, out[-5000:]
    assert "step=200/200" in out or "at step 200" in out, out[-3000:]
    assert "loss " in out and "->" in out  # the summary's first -> last loss
    # The summary's status line (`final world size N, generations G, restarts R`, read from
    # the job's final status): a job that trains to success costs no restart.
    final = re.search(r"final world size (\d+), generations (\d+), restarts (\d+)", out)
    assert final, out[-3000:]
    assert int(final.group(3)) == 0, final.group(0) + "\n" + out[-5000:]
    # min = max = 2: no size change, so anything but the first generation was a restart
    # or a disruption.
    assert int(final.group(2)) == 1, final.group(0) + "\n" + out[-5000:]
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
