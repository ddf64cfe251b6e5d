"""Conditions of a LeptonJob's status: the one implementation of set, get and transition.

Conditions have the standard Kubernetes shape (`type, status, reason, message,
lastTransitionTime, observedGeneration`); `lastTransitionTime` moves only when the status
flips. The core (`plan`) and the autoscaler both go through these functions. Condition
types and reasons are defined in `lepton_operator.api.conditions`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Optional

from lepton_operator.api.models import Condition, LeptonJobStatus

MAX_MESSAGE = 32768


def get_condition(status: LeptonJobStatus, type_: str) -> Optional[Condition]:
    """The condition of this type, or None."""
    return next((c for c in status.conditions if c.type == type_), None)


def condition_is_true(status: LeptonJobStatus, type_: str) -> bool:
    cond = get_condition(status, type_)
    return cond is not None and cond.status == "True"


def set_condition(
    status: LeptonJobStatus,
    type_: str,
    value: bool,
    reason: str,
    message: str,
    now: datetime,
    observed_generation: Optional[int],
) -> bool:
    """Set a condition in `status`; `lastTransitionTime` moves only when its status flips.

    Returns True when the status flipped (or the condition is new and True), which is
    when an event about it is worth posting.
    """
    wanted = "True" if value else "False"
    current = get_condition(status, type_)
    flipped = current is None or current.status != wanted
    new = Condition(
        type=type_,
        status=wanted,
        reason=reason,
        message=message[:MAX_MESSAGE],
        last_transition_time=now if flipped else current.last_transition_time,
        observed_generation=observed_generation,
    )
    if current is None:
        status.conditions.append(new)
        return value
    status.conditions[status.conditions.index(current)] = new
    return flipped


def conditions_patch(
    status: LeptonJobStatus,
    type_: str,
    value: bool,
    reason: str,
    message: str,
    now: datetime,
    observed_generation: Optional[int],
) -> Optional[list[dict]]:
    """The whole conditions list (wire form) with one condition set, for a merge patch
    that changes only it; None when that condition already says the same."""
    current = get_condition(status, type_)
    if current is not None and current.status == ("True" if value else "False") and current.message == message:
        return None
    copy = status.model_copy(deep=True)
    set_condition(copy, type_, value, reason, message, now, observed_generation)
    return [c.to_k8s() for c in copy.conditions]
