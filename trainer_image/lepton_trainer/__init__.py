"""lepton_trainer: an elastic, checkpointing PyTorch DDP trainer for LeptonJob workers.

Modules:
    __main__    the launcher (``python -m lepton_trainer``): runs torchrun from PET_* env
    train       the per-rank training loop (real GPT or --synthetic), SIGTERM handling
    config      trainer arguments, each also settable as LEPTON_<NAME> env
    data        bundled byte corpus, world-size independent global sampler
    model       a tiny GPT-style byte-level language model
    schedule    learning rate as a function of the global step
    pace        the --pace-curve throughput cap
    checkpoint  atomic checkpoint files, keep-last-K, skip corrupt ones
    metrics     every Prometheus collector the trainer exports
    exitcodes   the exit codes the operator interprets
"""

__version__ = "0.1.0"
