"""The rescale protocol and the hang watchdog against real workers (docs/reliability.md,
rows 18 and 22): the local control plane in process mode (pods are local processes running
real torchrun with the synthetic trainer, checkpoints on a simulated volume), the operator,
and for the hang Debian's Prometheus.

1. Ten capacity-confirmed scale-ups in a row (1 -> 2 -> 1 -> 2 ...) cost no restart: each
   added worker of generation g+1 is created while g runs, waits for its own store (the
   generations alternate between rendezvousPort and the next port) and joins g+1; none exits
   early, none is replaced, every generation has a fresh rendezvous id, resumes from the
   checkpoint and trains.
2. A trainer that stops making progress (`--hang-at-step`) is restarted by the watchdog
   within `restart.hangSeconds` plus a margin: event `Hung`, one restart, and the new
   generation resumes from the checkpoint written at the hang (so it is past the hang step)
   and finishes the job.

Prometheus missing: the hang test fails in CI (CI=true) and skips locally, with the reason.
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
from kubernetes import watch

from lepton_localcluster.crds import install_crds
from lepton_localcluster.procs import free_port_pair
from lepton_localcluster.prometheus import LocalPrometheus
from lepton_localcluster.pytest_plugin import require_prometheus
from lepton_operator.api.models import API_VERSION, GROUP, KIND, PLURAL, VERSION

pytestmark = [pytest.mark.locale2e, pytest.mark.timeout(900)]

OPERATOR_ARGS = ("--metrics-port", "0", "--liveness-port", "0")
# Warning events that would mean a scale-up cost something (a restart, a lost worker, ...).
TROUBLE_REASONS = {"WorkerRestart", "WorkerLost", "WorkerDisrupted", "NodeLost", "Hung", "InsufficientCapacity"}


@pytest.fixture(scope="module")
def crds(process_cluster):
    """The LeptonJob CRD for this server's version (create or replace)."""
    install_crds(process_cluster.api_client())


def _job(name: str, args: list[str], env: dict[str, str], **spec) -> dict:
    rendezvous = free_port_pair()
    body = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {
            "args": ["--synthetic", *args],
            "env": [
                {"name": "OMP_NUM_THREADS", "value": "1"},
                *({"name": k, "value": v} for k, v in env.items()),
            ],
            "resources": {"gpus": 0},
            "nprocPerNode": 1,
            "rendezvousPort": rendezvous,
            "checkpoint": {"size": "1Gi"},
            "terminationGracePeriodSeconds": 30,
        },
    }
    body["spec"].update(spec)
    assert body["spec"].get("metricsPort", 9400) not in (rendezvous, rendezvous + 1)
    return body


def _get(k8s, namespace: str, name: str) -> dict:
    return k8s.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def _status(k8s, namespace: str, name: str) -> dict:
    return _get(k8s, namespace, name).get("status") or {}


def _scale(k8s, namespace: str, name: str, replicas: int) -> None:
    """`kubectl scale lj <name> --replicas=N`: a merge patch of the scale subresource."""
    k8s.custom.patch_namespaced_custom_object_scale(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
        {"spec": {"replicas": replicas}},
        _content_type="application/merge-patch+json",
    )


def _steps(log_text: str, generation: int) -> list[int]:
    """Global steps in the progress lines a generation's trainer logged."""
    return [
        int(m.group(1))
        for m in re.finditer(rf"^step=(\d+)/\d+ loss=\S+ samples/s=\S+ world=\d+ gen={generation} ", log_text, re.M)
    ]


def _launches(log_text: str) -> dict[int, dict]:
    """Per generation, what the pod's launcher (the torchrun agent, which on worker 0 also
    hosts the generation's store) logged: start, torch imported (its rendezvous starts
    next), exit code and time (its store is gone by then). Wall-clock seconds."""
    launches: dict[int, dict] = {}
    current = None
    for line in log_text.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        event = fields.get("event")
        if event == "launcher_start":
            current = launches.setdefault(int(fields["gen"]), {"start": float(fields["t"])})
        elif current is not None and event == "torch_imported":
            current.setdefault("rendezvous", float(fields["t"]))
        elif current is not None and event == "launcher_exit":
            current.update(exit=float(fields["t"]), code=int(fields["code"]))
            current = None
    return launches


def _read(path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _trouble_events(k8s, namespace: str, name: str) -> list[str]:
    return [
        f"{e.reason}: {e.message}"
        for e in k8s.events(namespace, name)
        if e.type == "Warning" or e.reason in TROUBLE_REASONS
    ]


class PodRecorder:
    """Every version of every pod in a namespace, from a watch (so that no short-lived
    replacement pod goes unseen): by uid, its name, generation, creation time, environment
    and the exit codes its containers reported."""

    def __init__(self, k8s, namespace: str):
        self.k8s, self.namespace = k8s, namespace
        self.pods: dict[str, dict] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        initial = k8s.core.list_namespaced_pod(namespace)
        for pod in initial.items:
            self._record(pod)
        self._version = initial.metadata.resource_version
        self._thread = threading.Thread(target=self._run, name="pod-recorder", daemon=True)
        self._thread.start()

    def _record(self, pod) -> None:
        meta = pod.metadata
        labels = meta.labels or {}
        with self._lock:
            rec = self.pods.setdefault(
                meta.uid,
                {
                    "name": meta.name,
                    "generation": int(labels.get("lepton.ai/generation", "0")),
                    "index": int(labels.get("lepton.ai/worker-index", "-1")),
                    "created": meta.creation_timestamp,
                    "env": {e.name: e.value for e in (pod.spec.containers[0].env or []) if e.value is not None},
                    "ports": {p.name: p.container_port for p in (pod.spec.containers[0].ports or [])},
                    "exit_codes": [],
                    "deletion": None,
                },
            )
            if meta.deletion_timestamp and rec["deletion"] is None:
                rec["deletion"] = meta.deletion_timestamp
            for cs in (pod.status and pod.status.container_statuses) or []:
                term = cs.state and cs.state.terminated
                if term is not None and term.exit_code not in rec["exit_codes"]:
                    rec["exit_codes"].append(term.exit_code)

    def _run(self) -> None:
        while not self._stop.is_set():
            w = watch.Watch()
            try:
                for event in w.stream(
                    self.k8s.core.list_namespaced_pod,
                    self.namespace,
                    resource_version=self._version,
                    timeout_seconds=5,
                ):
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        raise RuntimeError(str(obj))
                    self._record(obj)
                    self._version = obj.metadata.resource_version
                    if self._stop.is_set():
                        break
            except Exception as exc:  # expired version, connection reset: re-list, go on
                self.errors.append(repr(exc)[:200])
                try:
                    fresh = self.k8s.core.list_namespaced_pod(self.namespace)
                    for pod in fresh.items:
                        self._record(pod)
                    self._version = fresh.metadata.resource_version
                except Exception as exc2:
                    self.errors.append(repr(exc2)[:200])
                    time.sleep(0.5)
            finally:
                w.stop()

    def of_generation(self, generation: int) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self.pods.values() if r["generation"] == generation]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)


# ------------------------------------------------------------------ 1. ten scale-ups


SCALE_UPS = 10
# A step of the one-worker generation takes 32 / 8 = 4 s (--pace-curve). The trainer reads
# its stop flag before it paces (most of a step), so SIGTERM usually ends it only after the
# step under way and the next one: the old generation, and the store its worker 0 hosts,
# outlive the stop request by about one slow step or more. The added worker starts its rendezvous (towards worker 0's
# name) a few seconds after it is created, so it does while the old store is still up:
# the situation that used to cost a restart. Two workers step fast (400 samples/s).
PACE_CURVE = {"1": 8, "2": 400}


def test_ten_capacity_confirmed_scale_ups_cost_no_restart(process_cluster, crds, k8s, namespace, run_operator):
    """1 -> 2 -> 1 -> ... -> 2 by `kubectl scale`: ten scale-ups, nine scale-downs, all with
    real torchrun workers. After every scale-up: Running at 2 with both workers ready and
    both trainers stepping in the new generation; restarts == 0, disruptions == 0; the
    added worker was created before the new worker 0 (capacity first), is the same pod that
    then trained (never replaced, never exited early), waited on the other port than the
    generation before, and the rendezvous id is new."""
    t_start = time.monotonic()
    name = "flip"
    body = _job(
        name,
        ["--synthetic-samples-per-second", "400", "--pace-curve", json.dumps(PACE_CURVE)],
        {
            "LEPTON_MAX_STEPS": "1000000",
            "LEPTON_LOG_EVERY_SECONDS": "0.5",
            "LEPTON_CHECKPOINT_EVERY_STEPS": "100",
        },
        workers={"min": 1, "max": 2},
        restart={"maxRestarts": 3, "backoffSeconds": 10},
        autoscaling={"enabled": False, "capacityTimeoutSeconds": 60},
    )
    rendezvous = body["spec"]["rendezvousPort"]
    recorder = PodRecorder(k8s, namespace)
    operator = run_operator(*OPERATOR_ARGS)
    logs = {i: process_cluster.pod_log_path(namespace, f"{name}-worker-{i}") for i in range(2)}
    timings: list[tuple[str, int, float]] = []
    overlaps: list[float] = []

    def explain(what: str):
        def message():
            st = _status(k8s, namespace, name)
            keep = {k: st.get(k) for k in ("phase", "message", "workerGeneration", "worldSize", "workers", "rescale")}
            keep.update(restarts=st.get("restarts"), disruptions=st.get("disruptions"))
            return (
                f"{what}\nstatus: {keep}\nevents: {_trouble_events(k8s, namespace, name)}\n"
                f"worker-0 log tail:\n{_read(logs[0])[-1500:]}\nworker-1 log tail:\n{_read(logs[1])[-1500:]}\n"
                f"operator log tail:\n{operator.log_text()[-3000:]}"
            )

        return message

    def settled(generation: int, size: int, min_step: int) -> tuple[dict, int]:
        """Running at `size` in `generation`, every worker ready, every trainer stepping past
        `min_step` in this generation; returns the status and the last step seen."""

        def ok():
            st = _status(k8s, namespace, name)
            if st.get("restarts") or st.get("disruptions"):  # no point waiting: it already cost one
                pytest.fail(explain(f"generation {generation} at {size}: a restart or disruption was counted")())
            if not (
                st.get("phase") == "Running"
                and st.get("workerGeneration") == generation
                and st.get("worldSize") == size
                and (st.get("workers") or {}).get("ready") == size
                and not st.get("rescale")
            ):
                return None
            stepped = [_steps(_read(logs[i]), generation) for i in range(size)]
            if not all(s and s[-1] > min_step for s in stepped):
                return None
            return st, stepped[0][-1]

        return k8s.wait_for(
            ok, 150, 0.5, explain(f"generation {generation} Running at {size}, trainers past step {min_step}")
        )

    try:
        k8s.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        uid = _get(k8s, namespace, name)["metadata"]["uid"]
        t0 = time.monotonic()
        st, last_step = settled(1, 1, 0)
        timings.append(("start", 1, time.monotonic() - t0))
        generation, rendezvous_ids, ups = 1, {f"{uid}-g1"}, 0
        while ups < SCALE_UPS:
            for size in (2, 1):
                if size == 1 and ups == SCALE_UPS:
                    break
                t0 = time.monotonic()
                _scale(k8s, namespace, name, size)
                generation += 1
                st, step = settled(generation, size, last_step)
                timings.append((f"-> {size}", generation, time.monotonic() - t0))
                assert st.get("restarts", 0) == 0 and st.get("disruptions", 0) == 0, (generation, st)
                assert st.get("latestGeneration") == generation, st  # no attempt abandoned or skipped
                record = st["lastRescale"]
                assert (record["from"], record["to"], record["reason"]) == (3 - size, size, "ManualScale"), record
                assert not _trouble_events(k8s, namespace, name)

                # The new generation resumed from the old one's checkpoint (rank 0, on
                # whichever worker it landed, logs one `resumed` per generation after the
                # first) and trained on: every step it logged is past the old generation's.
                texts = [_read(logs[i]) for i in range(2)]
                resumed = sum(len(re.findall(r"^event=resumed step=\d+ ", t, re.M)) for t in texts)
                assert resumed == generation - 1, (generation, resumed)
                new_steps = [s for t in texts for s in _steps(t, generation)]
                assert min(new_steps) > last_step, (generation, last_step, new_steps[:5])
                last_step = step

                pods = recorder.of_generation(generation)
                by_index = {}
                for pod in pods:
                    assert pod["index"] not in by_index, f"worker {pod['index']} of {generation} replaced: {pods}"
                    by_index[pod["index"]] = pod
                assert sorted(by_index) == list(range(size)), pods
                rdzv_id = f"{uid}-g{generation}"
                assert rdzv_id not in rendezvous_ids
                rendezvous_ids.add(rdzv_id)
                port = rendezvous + (generation - 1) % 2
                for pod in pods:
                    assert pod["env"]["PET_RDZV_ID"] == rdzv_id, pod["env"]
                    assert pod["env"]["PET_RDZV_ENDPOINT"].endswith(f":{port}"), pod["env"]
                    assert pod["env"]["PET_NNODES"] == str(size)
                    assert pod["exit_codes"] == [], pod  # nobody of the running generation exited
                if size == 2:
                    ups += 1
                    added, first = by_index[1], by_index[0]
                    # Capacity first: the added worker existed before the new worker 0 was
                    # created, while the old generation still ran (its worker 0 was deleted
                    # only after the added worker had been created).
                    assert added["created"] <= first["created"], (added, first)
                    (old_first,) = [p for p in recorder.of_generation(generation - 1) if p["index"] == 0]
                    assert old_first["deletion"] is not None and added["created"] <= old_first["deletion"]
                    assert old_first["ports"]["rendezvous"] != port  # the store it could have reached
                    # The added worker's trainer stepped in this generation of two.
                    assert re.search(rf"^step=\d+/\d+ .* world=2 gen={generation} ", _read(logs[1]), re.M)
                    # Its launcher started its rendezvous (towards worker 0's name) how long
                    # before the old generation's worker 0, whose agent hosted the old
                    # store, exited? > 0: the old store was still up (the old hazard).
                    added_launch = _launches(_read(logs[1]))[generation]
                    old_launch = _launches(_read(logs[0]))[generation - 1]
                    assert old_launch["code"] == 143, old_launch  # stopped by SIGTERM, checkpointed
                    overlaps.append(old_launch["exit"] - added_launch["rendezvous"])

        st = _status(k8s, namespace, name)
        assert st.get("restarts", 0) == 0 and st.get("disruptions", 0) == 0, st
        assert len(rendezvous_ids) == generation == 2 * SCALE_UPS, rendezvous_ids
        ups_done = [r for r in st["rescaleHistory"] if (r["from"], r["to"]) == (1, 2)]
        assert len(ups_done) == SCALE_UPS, st["rescaleHistory"]
        assert not [r for r in st["rescaleHistory"] if r["from"] == r["to"]]  # no restart recorded
        # Every scale-up exercised the situation that used to cost a restart.
        assert all(o > 0 for o in overlaps), f"the old store did not outlive the added worker's start: {overlaps}"
    finally:
        recorder.close()
        total = time.monotonic() - t_start
        lines = [f"{what:>6} gen {g:>2}: {secs:5.1f}s" for what, g, secs in timings]
        print("\nscale-up test timings:\n  " + "\n  ".join(lines) + f"\n  total {total:.1f}s", flush=True)
        print("old store up after the added worker's rendezvous began (s): " + " ".join(f"{o:.1f}" for o in overlaps))
    assert total < 600, f"ten scale-ups took {total:.0f}s"


# --------------------------------------------------------------------------- 2. hang

HANG_SECONDS = 20
HANG_AT_STEP = 30
MAX_STEPS = 120


def test_hung_trainer_gets_a_new_generation_that_resumes_past_the_hang(
    process_cluster, crds, k8s, namespace, run_operator, tmp_path
):
    """Generation 1 stops stepping at step 30 (alive, /metrics still served). Within
    hangSeconds + a margin the watchdog reports it and the core starts generation 2
    (event Hung, restarts 1). SIGTERM made generation 1 checkpoint step 30, so
    generation 2 resumes at step 30, its first step is 31 (the hang step is behind it) and
    it finishes the job: Succeeded, restarts still 1."""
    require_prometheus()
    name = "stuck"
    body = _job(
        name,
        ["--hang-at-step", str(HANG_AT_STEP), "--synthetic-samples-per-second", "100"],
        {
            "LEPTON_MAX_STEPS": str(MAX_STEPS),
            "LEPTON_LOG_EVERY_SECONDS": "1",
            "LEPTON_CHECKPOINT_EVERY_STEPS": "10",
        },
        workers={"min": 1, "max": 1},
        restart={"maxRestarts": 2, "backoffSeconds": 0, "hangSeconds": HANG_SECONDS},
        autoscaling={"enabled": False, "warmupSeconds": 5},
    )
    log = process_cluster.pod_log_path(namespace, f"{name}-worker-0")
    prom = LocalPrometheus(
        process_cluster.server, process_cluster.token, str(process_cluster.ca_file), tmp_path / "prom"
    )
    prom.start()
    operator = None
    try:
        operator = run_operator("--prometheus-url", prom.url, *OPERATOR_ARGS)

        def explain(what: str):
            def message():
                st = _status(k8s, namespace, name)
                keep = {k: st.get(k) for k in ("phase", "message", "workerGeneration", "restarts", "hang", "rescale")}
                return (
                    f"{what}\nstatus: {keep}\nevents: {_trouble_events(k8s, namespace, name)}\n"
                    f"worker-0 log tail:\n{_read(log)[-2000:]}\noperator log tail:\n{operator.log_text()[-4000:]}\n"
                    f"prometheus:\n{prom.log_tail(10)}"
                )

            return message

        k8s.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        k8s.wait_for(
            lambda: re.search(rf"^event=hang_injected step={HANG_AT_STEP} ", _read(log), re.M),
            180,
            0.5,
            explain(f"generation 1 to hang at step {HANG_AT_STEP}"),
        )
        hung_at = time.monotonic()
        st = _status(k8s, namespace, name)
        assert st["workerGeneration"] == 1 and st.get("restarts", 0) == 0, st

        k8s.wait_for(
            lambda: _status(k8s, namespace, name).get("restarts") == 1,
            HANG_SECONDS + 60,
            0.5,
            explain("the watchdog's restart"),
        )
        detected = time.monotonic() - hung_at
        print(f"\nhang at step {HANG_AT_STEP} -> restart seen after {detected:.1f}s (hangSeconds {HANG_SECONDS})")
        # The window must see no samples for hangSeconds; the watchdog looks every 5 s.
        assert HANG_SECONDS - 2 <= detected <= HANG_SECONDS + 40, detected
        hung = k8s.wait_for(lambda: k8s.events(namespace, name, "Hung"), 30, 0.5, explain("the Hung event"))
        assert "processed no samples" in hung[0].message and "generation 1" in hung[0].message, hung[0].message
        assert re.search(rf"^event=stopping reason=sigterm step={HANG_AT_STEP}$", _read(log), re.M), _read(log)[-2000:]

        st = k8s.wait_for(
            lambda: (s := _status(k8s, namespace, name)).get("phase") in ("Succeeded", "Failed") and s,
            240,
            0.5,
            explain("the job to finish"),
        )
        text = _read(log)
        assert st["phase"] == "Succeeded", (st.get("message"), text[-2000:])
        assert st["restarts"] == 1 and st.get("disruptions", 0) == 0 and st["workerGeneration"] == 2, st
        assert not st.get("hang"), st["hang"]  # acted on once, cleared
        assert [r["reason"] for r in st["rescaleHistory"]] == ["Hung"], st["rescaleHistory"]
        assert len(k8s.events(namespace, name, "Hung")) == 1
        # Generation 2 resumed at the hang step (from generation 1's SIGTERM checkpoint),
        # so its first step was past it, and it trained to the end.
        assert re.search(rf"^event=resumed step={HANG_AT_STEP} ", text, re.M), text[-2000:]
        assert text.count("event=hang_injected") == 1
        steps = _steps(text, 2)
        assert steps and steps[0] > HANG_AT_STEP and steps[-1] == MAX_STEPS, steps
        assert re.search(rf"^event=finished step={MAX_STEPS} ", text, re.M)
    finally:
        if operator is not None:
            operator.stop()
        prom.close()
