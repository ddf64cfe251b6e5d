"""README command 1 stays true: `lepton-local demo` runs its jobs to success end to end.

The demo's own examples take about 7 minutes; this runs the same code path (its own
local control plane in process mode with 2 x 8 simulated GPUs, Debian's Prometheus, the
operator with its cluster allocator, live progress, allocator decisions, summary, plot)
on two small jobs it writes itself, applied 5 s apart: `small-a` (3 workers x 4 GPUs)
and `small-b` (2 workers x 4 GPUs) do not fit side by side in 16 GPUs, so `small-b`
waits Queued until `small-a` finishes and hands its GPUs on. Both really train with DDP
over the simulated cluster's DNS, 300 steps each.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from lepton_localcluster.pytest_plugin import require_prometheus
from lepton_operator.api.models import API_VERSION, KIND

pytestmark = [pytest.mark.locale2e, pytest.mark.timeout(600)]

STEPS = 300


def _manifest(name: str, workers: int) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {
            "image": "lepton-ai/lepton-trainer:0.1.0",
            "workers": {"min": workers, "max": workers},
            "nprocPerNode": 1,
            "resources": {"gpus": 4, "cpu": "1", "memory": "2Gi"},
            "env": [
                {"name": "LEPTON_MAX_STEPS", "value": str(STEPS)},
                {"name": "LEPTON_LOG_EVERY_SECONDS", "value": "2"},
                {"name": "OMP_NUM_THREADS", "value": "1"},
            ],
            "restart": {"maxRestarts": 2},
            "terminationGracePeriodSeconds": 30,
        },
    }


def test_demo_runs_two_jobs_sharing_the_gpus_to_success_and_writes_its_plot(tmp_path):
    require_prometheus()
    examples = []
    for name, workers in (("small-a", 3), ("small-b", 2)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_manifest(name, workers)))
        examples += ["--example", str(path)]
    plot = tmp_path / "demo.png"
    proc = subprocess.run(
        [sys.executable, "-m", "lepton_localcluster.cli", "demo", *examples, "--stagger", "5"]
        + ["--plot", str(plot), "--timeout", "420"],
        capture_output=True,
        text=True,
        timeout=540,
        start_new_session=True,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for name in ("small-a", "small-b"):
        assert f"job {name}: Succeeded" in out, out[-6000:]
        assert re.search(rf"s {name} +Running +workers=\d/\d", out), out[-6000:]  # its live line
        assert f"** {name} admitted at" in out, out[-6000:]  # the allocator's admission, printed
    # 12 + 8 GPUs do not fit in 16: small-b waits Queued (no pods) until small-a is done.
    assert "** small-b queued" in out, out[-6000:]
    assert re.search(r"s small-b +Queued", out), out[-6000:]
    assert out.index("** small-b queued") < out.index("** small-b admitted at")
    # The summary's status lines (`final world size N, generations G, restarts R`, read from
    # the jobs' final status): jobs that train to success cost no restart, and a fixed
    # size means anything but the first generation was a restart or a disruption.
    finals = re.findall(r"final world size (\d+), generations (\d+), restarts (\d+)", out)
    assert [(int(n), int(g), int(r)) for n, g, r in finals] == [(3, 1, 0), (2, 1, 0)], out[-6000:]
    assert f"at step {STEPS}" in out, out[-3000:]  # the summary's first -> last loss
    # The dashboard's Throughput panel query, answered by the recording rules the demo loads.
    panel = re.findall(r"dashboard Throughput panel \(5 min rate\): last ([0-9.]+), peak ([0-9.]+)", out)
    assert len(panel) == 2 and all(float(peak) > 0 for _, peak in panel), out[-6000:]
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_plot_draws_every_job_and_the_gpus_in_use(tmp_path):
    """The plot alone, from made-up traces: two jobs' workers and throughput, rescales marked."""
    from lepton_localcluster.demo import JobTrace, Progress, Sample, write_plot

    def trace(name, sizes):
        samples = [Sample(t, n, 50.0 * n, None, t, 2.0, "Running", 45.0 * n) for t, n in enumerate(sizes)]
        rescales = [
            {"t": t, "from": sizes[t - 1], "to": n, "reason": "X"}
            for t, n in enumerate(sizes)
            if t and n != sizes[t - 1]
        ]
        return JobTrace(name=name, gpus_per_worker=4, progress=Progress(samples=samples), rescales=rescales)

    sizes_a, sizes_b = [1, 1, 4, 4, 2, 2, 2, 4, 4], [0, 0, 0, 0, 0, 2, 2, 0, 0]
    gpus = [(t, 4 * (sizes_a[t] + sizes_b[t])) for t in range(len(sizes_a))]
    a, b = trace("a", sizes_a), trace("b", sizes_b)
    path = tmp_path / "plot.png"
    write_plot([a, b], gpus, 16, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
