"""Command lines of the control-plane components, chosen by Kubernetes version.

The cache holds Kubernetes 1.20.2, but ``$KUBEBUILDER_ASSETS`` (setup-envtest) usually
holds a newer kube-apiserver, and newer binaries refuse flags that 1.20 needs. What
differs between the versions we pass flags to (kubernetes/kubernetes):

- kube-apiserver stopped serving its insecure port in 1.20 (#95856): ``--insecure-port``
  accepts only 0 there ("This flag has no effect now and will be removed in v1.24", says
  1.20.2) and is gone in 1.24. So it is never passed.
- kube-controller-manager (1.22, #96216) and kube-scheduler (1.23, #96345) did the same
  later: ``--port`` accepts only 0 from then, and is gone in 1.24. Before that
  ``--port=0`` is what turns their insecure port (10252, 10251 by default) off, which
  two local clusters would both claim; so it is passed up to 1.23.
- Nothing else we pass changed up to 1.30: the old ``--controllers`` names stay valid as
  aliases of the renamed controllers (#115813), and the service-account issuer and
  signing key flags have been required since 1.20.
- The node lifecycle controller runs, with test timings (:data:`NODE_MONITOR_PERIOD`,
  :data:`NODE_MONITOR_GRACE_PERIOD`); both flags exist in every version. Its other flags
  are left at their defaults and not passed: ``--pod-eviction-timeout`` only acts with
  the taint manager off, and both it and ``--enable-taint-manager`` are gone in 1.27
  (#115840), so passing either would stop newer binaries at start. Eviction of the
  pods of a lost node is the taint manager's: NoExecute ``node.kubernetes.io/unreachable``
  taint, then deletion after the pods' toleration (300 s, added by the
  DefaultTolerationSeconds admission plugin).

Every function but :func:`binary_version` is pure, so the unit tests check every version.
"""

from __future__ import annotations

import re
import subprocess
from functools import lru_cache
from pathlib import Path

Version = tuple[int, int]

#: The oldest Kubernetes these command lines are known to work with.
MIN_VERSION: Version = (1, 20)
#: The first version without ``--port`` (scheduler, controller-manager).
PORT_FLAG_REMOVED: Version = (1, 24)

#: How often the node lifecycle controller checks node health (default 5 s): a lost node
#: is noticed at most this long after its grace period ends.
NODE_MONITOR_PERIOD_SECONDS = 2
#: How long a node may go without a heartbeat before it is Ready=Unknown and tainted
#: unreachable (default 40 s, 4 kubelet lease renewals of 10 s). The simulated kubelet
#: renews leases every 2 s (:data:`.kubelet.LEASE_RENEW_SECONDS`), so 16 s is 8 missed
#: renewals: a busy 2-core machine never loses a live node, and a test of node loss
#: still waits only ~16-18 s.
NODE_MONITOR_GRACE_SECONDS = 16
NODE_MONITOR_PERIOD = f"{NODE_MONITOR_PERIOD_SECONDS}s"
NODE_MONITOR_GRACE_PERIOD = f"{NODE_MONITOR_GRACE_SECONDS}s"


def parse_version(text: str) -> Version:
    """(major, minor) from ``--version`` output such as ``Kubernetes v1.20.2``."""
    found = re.search(r"\bv?(\d+)\.(\d+)\.\d+", text)
    if not found:
        raise ValueError(f"no Kubernetes version in {text.strip()!r}")
    return int(found.group(1)), int(found.group(2))


@lru_cache(maxsize=None)
def binary_version(path: Path) -> Version:
    """The version a Kubernetes binary reports (``<binary> --version``)."""
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    return parse_version(out.stdout + out.stderr)


def _check(name: str, version: Version) -> None:
    if version < MIN_VERSION:
        raise ValueError(
            f"{name} v{version[0]}.{version[1]} is older than v{MIN_VERSION[0]}.{MIN_VERSION[1]}, "
            "the oldest this control plane can start"
        )


def _insecure_port_off(version: Version) -> list[str]:
    return ["--port=0"] if version < PORT_FLAG_REMOVED else []


def etcd_args(data_dir: Path, client_url: str, peer_url: str) -> list[str]:
    """etcd (3.4 from Debian, 3.5 from setup-envtest: the same flags)."""
    return [
        "etcd",
        "--name=default",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=default={peer_url}",
        # a throwaway test store: durability is not worth the fsync latency
        "--unsafe-no-fsync=true",
        "--log-level=warn",
    ]


def apiserver_args(
    version: Version, *, etcd_url: str, cert_dir: Path, port: int, sa_key: Path, token_file: Path
) -> list[str]:
    """kube-apiserver on 127.0.0.1:``port`` (self-signed serving cert in ``cert_dir``)."""
    _check("kube-apiserver", version)
    return [
        "kube-apiserver",
        f"--etcd-servers={etcd_url}",
        f"--cert-dir={cert_dir}",
        f"--secure-port={port}",
        "--bind-address=127.0.0.1",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={sa_key}",
        f"--service-account-signing-key-file={sa_key}",
        f"--token-auth-file={token_file}",
        "--authorization-mode=RBAC",
        "--service-cluster-ip-range=10.0.0.0/24",
        "--disable-admission-plugins=ServiceAccount",
        "--allow-privileged=true",
        "--v=1",
    ]


def scheduler_args(version: Version, *, kubeconfig: Path) -> list[str]:
    """kube-scheduler, serving nothing (the apiserver is all it talks to)."""
    _check("kube-scheduler", version)
    return [
        "kube-scheduler",
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--secure-port=0",
        *_insecure_port_off(version),
        "--leader-elect=false",
        "--v=1",
    ]


def controller_manager_args(version: Version, *, kubeconfig: Path, sa_key: Path) -> list[str]:
    """kube-controller-manager, serving nothing, with a fast node lifecycle controller."""
    _check("kube-controller-manager", version)
    return [
        "kube-controller-manager",
        f"--kubeconfig={kubeconfig}",
        "--secure-port=0",
        *_insecure_port_off(version),
        "--leader-elect=false",
        # node lifecycle included: the simulated kubelet renews node leases (kubelet.py)
        "--controllers=*,-serviceaccount-token",
        f"--node-monitor-period={NODE_MONITOR_PERIOD}",
        f"--node-monitor-grace-period={NODE_MONITOR_GRACE_PERIOD}",
        f"--service-account-private-key-file={sa_key}",
        "--use-service-account-credentials=false",
        "--v=1",
    ]
