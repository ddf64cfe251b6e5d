"""A LeptonJob at `workers.max: 1000` (the schema's bound) keeps a status well under etcd's
1.5 MiB object limit (issue 15): every list in the status is bounded, and at those bounds,
with every message at its schema maximum, the status still fits with room for the spec."""

import json
from datetime import datetime, timedelta, timezone

import pytest

from lepton_operator.api import conditions
from lepton_operator.api.models import (
    CONDITION_MESSAGE_MAX_LENGTH,
    MAX_WORKERS,
    OBSERVATION_HISTORY,
    RESCALE_HISTORY_LIMIT,
    STATUS_MESSAGE_MAX_LENGTH,
    AllocationStatus,
    AutoscalingStatus,
    Condition,
    Decision,
    HangReport,
    LeptonJobStatus,
    Observation,
    RescaleInProgress,
    RescaleRecord,
)
from lepton_operator.reconcile.autoscaling import record_observation

pytestmark = pytest.mark.unit

ETCD_LIMIT = int(1.5 * 1024 * 1024)
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
CONDITION_TYPES = [v for k, v in vars(conditions).items() if k.startswith("CONDITION_")]


def observations_after_measuring_every_size(rounds: int) -> list[Observation]:
    """What the autoscaler keeps after measuring every size from 1 to MAX_WORKERS, `rounds` times over."""
    kept: list[Observation] = []
    for i in range(rounds * MAX_WORKERS):
        at = T0 + timedelta(seconds=30 * i)
        kept = record_observation(
            kept,
            Observation(
                world_size=i % MAX_WORKERS + 1,
                throughput=123456.789,
                measured_at=at,
                window_seconds=300,
                comm_fraction=0.1234,
            ),
        )
    return kept


def test_the_observations_stay_bounded_however_many_sizes_are_measured():
    kept = observations_after_measuring_every_size(rounds=2)
    assert len(kept) <= MAX_WORKERS + OBSERVATION_HISTORY
    assert {o.world_size for o in kept} == set(range(1, MAX_WORKERS + 1))  # the latest per size stays


def _record(i: int, message_length: int) -> RescaleRecord:
    return RescaleRecord.model_validate(
        {
            "from": MAX_WORKERS - 1,
            "to": MAX_WORKERS,
            "reason": "AllocatorGrow",
            "message": "m" * message_length,
            "time": (T0 + timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "downtimeSeconds": 12.5,
        }
    )


def status_at_the_bounds(message_length: int, condition_message_length: int) -> LeptonJobStatus:
    """A job of 1000 workers with every bounded list full and messages of the given lengths."""
    now = T0 + timedelta(days=30)
    return LeptonJobStatus(
        observed_generation=10**6,
        phase="Running",
        message="m" * min(message_length, STATUS_MESSAGE_MAX_LENGTH),
        conditions=[
            Condition(
                type=t,
                status="True",
                reason="SomeReason",
                message="c" * condition_message_length,
                last_transition_time=now,
                observed_generation=10**6,
            )
            for t in CONDITION_TYPES
        ],
        replicas=MAX_WORKERS,
        selector="lepton.ai/job-name=" + "j" * 52,
        worker_generation=10**4,
        world_size=MAX_WORKERS,
        generation_start_time=now,
        template_hash="h" * 64,
        restarts=10**3,
        latest_generation=10**4,
        hang=HangReport(generation=10**4, detected_at=now, message="m" * message_length),
        start_time=T0,
        rescale=RescaleInProgress.model_validate(
            {
                "from": 999,
                "to": 1000,
                "reason": "AllocatorGrow",
                "message": "m" * message_length,
                "stage": "ConfirmingCapacity",
                "startedAt": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "stoppedAt": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "notBefore": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "targetGeneration": 2,
            }
        ),
        last_rescale=_record(0, message_length),
        rescale_history=[_record(i, message_length) for i in range(RESCALE_HISTORY_LIMIT)],
        throughput=123456.789,
        progress=0.5,
        remaining_samples=1e12,
        estimated_completion_time=now,
        allocation=AllocationStatus(
            target=MAX_WORKERS,
            reason="AllocatorGrow",
            message="m" * min(message_length, 4096),
            why_not_more="w" * min(message_length, 1024),
            why_not_less="w" * min(message_length, 1024),
            time=now,
        ),
        autoscaling=AutoscalingStatus(
            observations=observations_after_measuring_every_size(rounds=1),
            last_decision=Decision(target=MAX_WORKERS, reason="r" * message_length, time=now),
            comm_fraction=0.25,
        ),
    )


def size_of(status: LeptonJobStatus) -> int:
    return len(json.dumps({"status": status.to_k8s()}, separators=(",", ":")).encode())


def test_a_status_with_every_list_full_and_messages_as_the_operator_writes_them_is_small():
    # The operator's messages are a sentence or two (a few hundred characters).
    size = size_of(status_at_the_bounds(message_length=300, condition_message_length=300))
    assert size < 256 * 1024, size


def test_even_every_message_at_its_schema_maximum_leaves_room_for_the_spec():
    size = size_of(status_at_the_bounds(message_length=4096, condition_message_length=CONDITION_MESSAGE_MAX_LENGTH))
    assert size < ETCD_LIMIT // 2, size
