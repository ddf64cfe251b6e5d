"""Condition types and the reasons that go with them: the one place they are defined.

A reason names why a condition has its status, why an event was posted, or why a
rescale happened (`status.rescaleHistory[].reason`). Each reason sits under the condition
it belongs to; reasons that only appear in events or rescale records are listed last.
Reasons are CamelCase words (`kubectl describe` shows them; alerts match on them), so
renaming one is an API change.
"""

from __future__ import annotations

# --- Ready: every worker of the current generation is ready --------------------------
CONDITION_READY = "Ready"
REASON_WORKERS_STARTING = "WorkersStarting"
REASON_WORKERS_READY = "WorkersReady"

# --- Rescaling: a rescale (new generation of another size) is under way --------------
CONDITION_RESCALING = "Rescaling"
REASON_MANUAL_SCALE = "ManualScale"
REASON_AUTOSCALE_UP = "ScaleUpPaysOff"
REASON_AUTOSCALE_DOWN = "ScaleDownLastStepDidNotPay"
REASON_INSUFFICIENT_CAPACITY = "InsufficientCapacity"
REASON_SCALE_UP_ABANDONED = "ScaleUpAbandoned"
REASON_RESCALED = "Rescaled"

# --- Suspended: spec.suspend stopped the workers --------------------------------------
CONDITION_SUSPENDED = "Suspended"
REASON_SUSPENDED = "Suspended"
REASON_RESUMED = "Resumed"

# --- Succeeded / Failed: the job finished ---------------------------------------------
CONDITION_SUCCEEDED = "Succeeded"
CONDITION_FAILED = "Failed"
REASON_ALL_SUCCEEDED = "AllWorkersSucceeded"
REASON_WORKER_FAILED = "WorkerFailed"
REASON_RESTARTS_EXHAUSTED = "RestartBudgetExhausted"
REASON_DEADLINE_EXCEEDED = "DeadlineExceeded"

# --- InvalidSpec: the spec cannot be carried out as written --------------------------
CONDITION_INVALID_SPEC = "InvalidSpec"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_IMMUTABLE_FIELD = "ImmutableFieldChanged"
REASON_SPEC_VALID = "SpecValid"

# --- PolicyViolation: a running job's spec breaks the admin policy (api/policy.py) -----
# (A job that never started fails with InvalidSpec instead.) Its workers are kept; no
# new generation starts until the spec complies again.
CONDITION_POLICY_VIOLATION = "PolicyViolation"
REASON_POLICY_VIOLATION = "PolicyViolation"
REASON_POLICY_SATISFIED = "PolicySatisfied"

# --- MetricsUnavailable: the autoscaler cannot read throughput -------------------------
CONDITION_METRICS_UNAVAILABLE = "MetricsUnavailable"
REASON_METRICS_UNAVAILABLE = "MetricsUnavailable"
REASON_METRICS_AVAILABLE = "MetricsAvailable"

# --- NameTaken: objects the job does not own hold names of its children ----------------
# Found when a create is answered 409 (a Warning event NameTaken names each); the foreign
# objects are left alone and the creates are retried every pass.
CONDITION_NAME_TAKEN = "NameTaken"
REASON_NAME_TAKEN = "NameTaken"
REASON_NAMES_FREE = "NamesFree"

# --- restarts: a new generation at the same size, counted in status.restarts ----------
# (Ready turns False with these.) The job's own fault, as far as anyone can tell.
REASON_WORKER_RESTART = "WorkerRestart"
REASON_HUNG = "Hung"

# --- disruptions: a new generation at the same size, counted in status.disruptions -----
# The cluster took workers away (never the job's fault): the restart budget is not spent.
REASON_WORKER_LOST = "WorkerLost"
REASON_WORKER_DISRUPTED = "WorkerDisrupted"
REASON_NODE_LOST = "NodeLost"
REASON_NODE_DRAINING = "NodeDraining"
DISRUPTION_REASONS = frozenset({REASON_WORKER_LOST, REASON_WORKER_DISRUPTED, REASON_NODE_LOST, REASON_NODE_DRAINING})

# --- capacity: a generation whose workers cannot all be placed -------------------------
REASON_SHRUNK_FOR_CAPACITY = "ShrunkForCapacity"
REASON_WAITING_FOR_CAPACITY = "WaitingForCapacity"
REASON_GROWING_BACK = "GrowingBack"  # a scale-up back to the requested size after a shrink

# --- events only ------------------------------------------------------------------------
REASON_RESCALING = "Rescaling"
REASON_FOREIGN_POD = "ForeignPod"
REASON_API_REQUEST_REFUSED = "ApiRequestRefused"

# --- autoscaler decisions (status.autoscaling.lastDecision.reason) ----------------------
# A scale-up or -down decision uses REASON_AUTOSCALE_UP / REASON_AUTOSCALE_DOWN; a hold
# says why it held.
HOLD_RESCALING = "RescaleInProgress"
HOLD_WARMUP = "WarmingUp"
HOLD_NO_DATA = "NoFreshThroughput"
HOLD_COOLDOWN = "Cooldown"
HOLD_BUDGET = "RescaleBudgetSpent"
HOLD_BACKOFF = "CapacityBackoff"
HOLD_AT_KNEE = "AtKnee"
HOLD_AT_BOUND = "AtBound"
HOLD_NOT_WORTH_RESTART = "RestartCostExceedsGain"
REASON_OUT_OF_BOUNDS = "OutsideBounds"

# --- Admitted: the cluster allocator admitted the job (gang admission) ----------------
# False while the job is Queued: its `min` workers do not fit yet; it has no pods.
CONDITION_ADMITTED = "Admitted"
REASON_ADMITTED = "Admitted"
REASON_QUEUED = "Queued"  # its min workers do not fit, even after shrinking others to their min
REASON_QUEUED_BEHIND = "QueuedBehindStarvingJob"  # an earlier job waited too long: it goes first
REASON_NO_MATCHING_NODES = "NoMatchingNodes"  # its node pool has too few GPUs for its min, ever
REASON_WAITING_FOR_SHRINK = "WaitingForShrink"  # admitted once the jobs shrunk for it free their GPUs

# --- allocator decisions (status.allocation.reason) --------------------------------------
REASON_ALLOCATOR_GROW = "AllocatorGrow"
REASON_ALLOCATOR_SHRINK = "AllocatorShrink"  # GPUs go to a job that completes faster with them
REASON_ALLOCATOR_FLOOR = "BelowEfficiencyFloor"  # the last workers add less than efficiencyThreshold
REASON_ALLOCATOR_HOLD = "AllocatorHold"
REASON_ALLOCATOR_WAITING = "WaitingForGPUs"  # a grow waits for shrinking jobs to free GPUs
REASON_ALLOCATOR_FIXED = "FixedSize"  # autoscaling disabled: admitted at its size, never resized
