"""Exit codes of the trainer and the launcher, as the operator reads them.

The operator's rule (training-operator ``ExitCode`` policy): 0 = success, 1-127 =
permanent failure (the job fails), 128-255 = retryable (a new generation starts,
counted against ``maxRestarts``).
"""

OK = 0
"""max-steps reached and the final checkpoint written."""

ERROR = 1
"""An unexpected error in the trainer (a bug, a bad corpus): permanent."""

USAGE = 2
"""Invalid arguments or environment (argparse's own code): permanent."""

STOPPED = 143
"""Stopped by SIGTERM after writing a checkpoint (128 + SIGTERM). A planned stop is not
success (the job has not finished), so it must not be 0; 143 is what Kubernetes reports
for a container killed by SIGTERM anyway, and the operator treats it as retryable."""

PEER_LOST = 170
"""A collective failed because another worker went away (evicted, killed, failed):
this worker is healthy, so the failure is retryable; the peer's own code says why."""

RENDEZVOUS_FAILED = 171
"""torchrun could not complete the rendezvous (peers missing, store unreachable):
retryable, the next generation may succeed."""

FENCED = 172
"""Refused to write a checkpoint because a newer generation owns the checkpoint directory
(this worker is a leftover of an old generation, e.g. alive behind a network partition).
Not a failure of the job: the operator has already moved on and ignores this pod. Not 0
either (this worker did not finish the job), so it is retryable: should the operator not
have moved on, retrying is still safer than failing the job or calling it done."""

STORAGE_ERROR = 173
"""The checkpoint storage kept failing with transient I/O errors (EIO, ESTALE, ...), or
checkpoints exist but none could be read: retryable, the storage may recover. Starting
fresh instead would bury those checkpoints under newer ones."""


def is_permanent(code: int) -> bool:
    """True for codes the operator treats as a permanent failure (1-127)."""
    return 1 <= code <= 127


def combine(codes: list[int]) -> int:
    """Reduce the exit codes of a node's workers (rank order) to the pod's exit code.

    A permanent failure anywhere wins (it is the root cause, and retrying would repeat it).
    Among retryable codes, a rank's own failure (say 137, OOM-killed) beats STOPPED (143:
    torchrun's agent SIGTERMs the surviving ranks once one failed) and PEER_LOST (the
    survivors' collectives broke): those are consequences, not causes. Negative codes
    (killed by signal N) become 128 + N, the shell convention Kubernetes also uses.
    """
    normalised = [128 - c if c < 0 else c for c in codes]
    for wanted in (
        is_permanent,
        lambda c: c not in (OK, STOPPED, PEER_LOST),
        lambda c: c == STOPPED,
        lambda c: c != OK,
    ):
        for code in normalised:
            if wanted(code):
                return code
    return OK
