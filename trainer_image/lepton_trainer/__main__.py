"""The launcher: ``python -m lepton_trainer [trainer args]`` (the image's entrypoint).

Outside torchrun it runs torchrun (``torch.distributed.run``) in this process, taking every
torchrun setting from the ``PET_*`` environment the operator sets (torchrun's argparse
reads ``PET_<FLAG>`` itself), with ``lepton_trainer.train`` as the module each rank runs
and the trainer args passed through. Without ``PET_NNODES``/``PET_RDZV_ENDPOINT`` (plain
local use) it runs a single-node standalone job with ``PET_NPROC_PER_NODE`` ranks
(default 1). Inside torchrun (``LOCAL_RANK`` or ``TORCHELASTIC_RUN_ID`` set) it is the
training module itself.

SIGTERM: torchrun's agent catches it, forwards it to every worker and waits for them
(``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, default 30 s, then SIGKILL); the workers finish their
step, checkpoint and exit 143. The launcher then exits 143 too.

Exit code of the pod (see ``exitcodes``): the workers' codes combined (a permanent
1-127 code wins), 143 after a SIGTERM, 171 if the rendezvous failed.
"""

from __future__ import annotations

import os
import sys
import time

_LAUNCHER_START = time.time()

TRAINING_MODULE = "lepton_trainer.train"


def inside_torchrun(environ=None) -> bool:
    """True when torchrun already started this process as a rank."""
    environ = os.environ if environ is None else environ
    return "LOCAL_RANK" in environ or "TORCHELASTIC_RUN_ID" in environ


def torchrun_argv(trainer_argv: list[str], environ=None) -> list[str]:
    """torchrun's command line: only what PET_* cannot say, then module and args."""
    environ = os.environ if environ is None else environ
    argv: list[str] = []
    if not (environ.get("PET_NNODES") or environ.get("PET_RDZV_ENDPOINT")):
        argv += ["--standalone", "--nnodes=1", f"--nproc-per-node={environ.get('PET_NPROC_PER_NODE') or 1}"]
    return argv + ["--module", TRAINING_MODULE, *trainer_argv]


def _log(**fields) -> None:
    print(" ".join(f"{k}={v}" for k, v in fields.items()), flush=True)


def run_torchrun(argv: list[str]) -> int:
    """Run torchrun in this process and turn its outcome into the pod's exit code."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    from . import exitcodes

    _log(event="torch_imported", t=f"{time.time():.3f}")  # the rendezvous starts next
    try:
        torchrun.run(torchrun.parse_args(argv))
        return exitcodes.OK
    except ChildFailedError as exc:
        codes = [exc.failures[rank].exitcode for rank in sorted(exc.failures)]
        _log(
            event="workers_failed",
            codes=",".join(f"{rank}:{exc.failures[rank].exitcode}" for rank in sorted(exc.failures)),
        )
        return exitcodes.combine(codes)
    except SignalException as exc:
        # The agent already forwarded the signal to the workers and waited for them.
        return 128 + int(exc.sigval)
    except RendezvousError as exc:
        _log(event="rendezvous_failed", error=repr(str(exc)[:300]))
        return exitcodes.RENDEZVOUS_FAILED


def main(argv: list[str] | None = None) -> int:
    """The ``python -m lepton_trainer`` / ``lepton-trainer`` entry point."""
    argv = sys.argv[1:] if argv is None else argv
    if inside_torchrun():
        from .train import main as train_main

        return train_main(argv)
    from .config import parse_args

    parse_args(argv)  # fail fast (exit 2) on bad args, before any rendezvous
    _log(
        event="launcher_start",
        pid=os.getpid(),
        t=f"{_LAUNCHER_START:.3f}",
        job=os.environ.get("LEPTON_JOB_NAME", "-"),
        gen=os.environ.get("LEPTON_GENERATION", "0"),
        worker=os.environ.get("LEPTON_WORKER_INDEX", os.environ.get("LEPTON_JOB_WORKER_INDEX", "0")),
    )
    code = run_torchrun(torchrun_argv(argv))
    _log(event="launcher_exit", code=code, t=f"{time.time():.3f}")
    # The workers are gone and every file is closed; skip the interpreter's teardown of
    # torch (seconds on a busy node) so that a stopping pod frees its slot sooner.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
