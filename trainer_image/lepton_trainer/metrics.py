"""Every Prometheus collector the trainer exports (the operator's PromQL depends on
these names; change them only together with the operator).

One endpoint per pod, served by local rank 0, counting the whole node's work. No job or
namespace labels here: Prometheus adds them from the pod's labels when it scrapes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class TrainerMetrics:
    """The trainer's collectors, in their own registry."""

    def __init__(self, comm: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.samples = Counter(
            "lepton_trainer_samples", "Samples processed by this pod (all its ranks)", registry=self.registry
        )
        self.steps = Counter("lepton_trainer_steps", "Global optimizer steps completed", registry=self.registry)
        self.loss = Gauge("lepton_trainer_loss", "Mean training loss of the last global step", registry=self.registry)
        self.world_size = Gauge(
            "lepton_trainer_world_size", "Workers (pods) in this generation", registry=self.registry
        )
        self.generation = Gauge(
            "lepton_trainer_generation", "Generation of the job this worker belongs to", registry=self.registry
        )
        # The run's position and its end, in samples of the global batch: every pod of a job
        # exports the same values, and they survive restarts (the position comes back from the
        # checkpoint), unlike lepton_trainer_samples_total, which starts at 0 in every new pod.
        self.trained_samples = Gauge(
            "lepton_trainer_trained_samples",
            "Position of the run in samples (global step x global batch), restored from the checkpoint on resume",
            registry=self.registry,
        )
        self.target_samples = Gauge(
            "lepton_trainer_target_samples",
            "Samples of the whole run (--max-steps x global batch)",
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "lepton_trainer_step_seconds",
            "Wall time of one global step, pacing included",
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.compute_seconds: Histogram | None = None
        self.comm_seconds: Histogram | None = None
        self.allreduce_seconds: Histogram | None = None
        if comm:
            # Registered only when measured (real training, no --pace-curve): a series that
            # is absent tells the operator "no split", where zeros would claim "no comm".
            self.compute_seconds = Histogram(
                "lepton_trainer_compute_seconds",
                "Per global step: forward, backward compute and optimizer time, exposed communication excluded",
                buckets=STEP_BUCKETS,
                registry=self.registry,
            )
            self.comm_seconds = Histogram(
                "lepton_trainer_comm_seconds",
                "Per global step: exposed communication, i.e. the wait for the gradient all-reduce after "
                "backward's compute was done plus the step's stats all-reduce",
                buckets=STEP_BUCKETS,
                registry=self.registry,
            )
            self.allreduce_seconds = Histogram(
                "lepton_trainer_allreduce_seconds",
                "Per global step: launch-to-completion time of every gradient bucket's all-reduce, summed "
                "(the part overlapped with backward included)",
                buckets=STEP_BUCKETS,
                registry=self.registry,
            )
        self._server = None

    def serve(self, addr: str, port: int) -> None:
        """Serve /metrics on addr:port in a daemon thread."""
        self._server, _ = start_http_server(port, addr=addr, registry=self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def set_membership(self, world_size: int, generation: int) -> None:
        self.world_size.set(world_size)
        self.generation.set(generation)

    def set_run(self, target_samples: int, position: int) -> None:
        """The run's end and its position at start (0, or where the checkpoint left it)."""
        self.target_samples.set(target_samples)
        self.trained_samples.set(position)

    def observe_step(self, samples: int, seconds: float, loss: float, position: int | None = None) -> None:
        """Record one completed global step of which this pod processed ``samples``;
        ``position`` is the run's position in samples after it."""
        self.samples.inc(samples)
        if position is not None:
            self.trained_samples.set(position)
        self.steps.inc()
        self.loss.set(loss)
        self.step_seconds.observe(seconds)

    def observe_split(self, compute: float, comm: float, allreduce: float) -> None:
        """Record one step's split (seconds); nothing unless built with ``comm=True``."""
        if self.comm_seconds is None:
            return
        self.compute_seconds.observe(compute)
        self.comm_seconds.observe(comm)
        self.allreduce_seconds.observe(allreduce)
