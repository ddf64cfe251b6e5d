"""Learning rate as a pure function of the global step.

Defined per global step (not per epoch or per sample seen by a rank), so a job resumed
at another world size continues on exactly the same schedule.
"""

import math


def lr_at(step: int, base_lr: float, max_steps: int, warmup_steps: int, min_lr_ratio: float = 0.1) -> float:
    """LR for the step with 0-based index ``step``: linear warm-up, then cosine decay to
    ``base_lr * min_lr_ratio`` at ``max_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    min_lr = base_lr * min_lr_ratio
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
