"""Find, cache or build the control-plane binaries (Kubernetes 1.20.2 + etcd).

A full cluster needs etcd, kube-apiserver, kube-scheduler and kube-controller-manager;
an API-only one (``api_only=True``) needs etcd and kube-apiserver. Lookup order of
:func:`ensure_binaries`:

1. ``$KUBEBUILDER_ASSETS`` when it is set (the envtest convention). It is an explicit
   choice, so nothing else is tried: setup-envtest's directory holds etcd,
   kube-apiserver and kubectl only, which runs an API-only cluster, and asking it for a
   full one raises :class:`SchedulerUnavailable`, which says so;
2. the cache, ``$LEPTON_K8S_CACHE`` or ``~/.cache/lepton-operator/k8s-v1.20.2/``
   (``etcd`` there may be a symlink to Debian's ``/usr/bin/etcd``);
3. a build from Debian 12's ``kubernetes`` source package with Go 1.19, following the
   recipe in docs/architecture.md ("The local control plane"). It installs the apt
   packages it needs (root only), builds in a temporary directory and renames the result
   into the cache, so an interrupted build never leaves a half-filled cache behind. A
   lock file keeps two concurrent callers from building twice.
"""

from __future__ import annotations

import fcntl
import os
import queue
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

K8S_VERSION = "v1.20.2"
KUBE_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
ALL_BINARIES = KUBE_BINARIES + ("etcd",)
#: What an API-only cluster runs (and all that setup-envtest ships, with kubectl).
API_BINARIES = ("etcd", "kube-apiserver")
#: What a full cluster runs besides (for pods to be scheduled and owned).
SCHEDULING_BINARIES = ("kube-scheduler", "kube-controller-manager")

#: Debian packages the build and the control plane need.
APT_PACKAGES = (
    "golang-1.19-go",
    "rsync",
    "etcd-server",
    "golang-github-modern-go-reflect2-dev",
    "openssl",
)
GO_BIN = Path("/usr/lib/go-1.19/bin")
REFLECT2_SRC = Path("/usr/share/gocode/src/github.com/modern-go/reflect2")
DEB_SRC_FILE = Path("/etc/apt/sources.list.d/lepton-deb-src.sources")
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

Progress = Callable[[str], None]


class BinariesUnavailable(RuntimeError):
    """The control-plane binaries are missing and cannot be built on this host."""


class SchedulerUnavailable(BinariesUnavailable):
    """The directory runs an API-only cluster but lacks kube-scheduler and/or
    kube-controller-manager (setup-envtest's layout), and a full cluster was asked for."""


def cache_dir() -> Path:
    """Return the cache directory for the binaries (it may not exist yet)."""
    env = os.environ.get("LEPTON_K8S_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lepton-operator" / f"k8s-{K8S_VERSION}"


def _complete(directory: Path, names: Iterable[str] = ALL_BINARIES) -> bool:
    return all((directory / n).is_file() and os.access(directory / n, os.X_OK) for n in names)


def _system_etcd() -> Path | None:
    found = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    return Path(found) if found else None


def _link_etcd(directory: Path) -> None:
    etcd = _system_etcd()
    if etcd is None:
        return
    target = directory / "etcd"
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(etcd)


def require_binaries(directory: Path, api_only: bool = False, origin: str | None = None) -> Path:
    """Return ``directory`` if it holds what a full (or API-only) cluster runs; else raise
    :class:`SchedulerUnavailable` or :class:`BinariesUnavailable` naming what it lacks.
    ``origin`` names the directory in the message (e.g. ``KUBEBUILDER_ASSETS=/x``)."""
    directory = Path(directory)
    needs = API_BINARIES if api_only else ALL_BINARIES
    missing = [n for n in needs if not _complete(directory, (n,))]
    if not missing:
        return directory
    where = origin or str(directory)
    if set(missing) <= set(SCHEDULING_BINARIES):
        named = "/".join(n for n in SCHEDULING_BINARIES if n in missing)
        raise SchedulerUnavailable(f"{where} has no {named} (setup-envtest ships etcd and kube-apiserver only)")
    raise BinariesUnavailable(f"{where} lacks {', '.join(missing)}")


def find_binaries(api_only: bool = False) -> Path | None:
    """Return a directory with the binaries a full (or API-only) cluster runs, without
    building anything, or None. Raises :class:`BinariesUnavailable` when
    ``$KUBEBUILDER_ASSETS`` is set but lacks them: building would not be used either."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        return require_binaries(Path(assets), api_only, origin=f"KUBEBUILDER_ASSETS={assets}")
    needs = API_BINARIES if api_only else ALL_BINARIES
    cache = cache_dir()
    if _complete(cache, [n for n in needs if n != "etcd"]) and not _complete(cache, ("etcd",)):
        _link_etcd(cache)  # the cache's etcd is a link to Debian's
    return cache if _complete(cache, needs) else None


def ensure_binaries(progress: Progress = print, build: bool = True, api_only: bool = False) -> Path:
    """Return a directory holding kube-apiserver, kube-controller-manager,
    kube-scheduler and etcd (only etcd and kube-apiserver with ``api_only``), building
    Kubernetes 1.20.2 into the cache if needed.

    ``progress`` receives human-readable lines (build output is streamed through it).
    With ``build=False`` nothing is installed or built. Raises
    :class:`BinariesUnavailable` with what to install or set when they cannot be had
    (:class:`SchedulerUnavailable` when ``$KUBEBUILDER_ASSETS`` runs an API-only cluster
    only).
    """
    found = find_binaries(api_only)
    if found:
        return found
    if not build:
        raise BinariesUnavailable(_help_text("building was not allowed (build=False)"))
    cache = cache_dir()
    cache.parent.mkdir(parents=True, exist_ok=True)
    lock_path = cache.parent / f".k8s-{K8S_VERSION}.lock"
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"another process is building the binaries (lock {lock_path}); waiting")
            fcntl.flock(lock, fcntl.LOCK_EX)
        found = find_binaries(api_only)  # the other process may have finished the job
        if found:
            return found
        _install_packages(progress)
        if _complete(cache, KUBE_BINARIES):  # only etcd was missing
            _link_etcd(cache)
        else:
            _build_into_cache(cache, progress)
    found = find_binaries(api_only)
    if not found:
        raise BinariesUnavailable(_help_text(f"the build finished but {cache} is incomplete"))
    return found


def import_binaries(source: Path, progress: Progress = print) -> Path:
    """Copy already built kube binaries from ``source`` into the cache (atomically)."""
    cache = cache_dir()
    missing = [n for n in KUBE_BINARIES if not (Path(source) / n).is_file()]
    if missing:
        raise BinariesUnavailable(f"{source} lacks {', '.join(missing)}")
    _publish(Path(source), cache, progress)
    return cache


def _help_text(reason: str) -> str:
    return (
        f"Kubernetes {K8S_VERSION} control-plane binaries are not available: {reason}.\n"
        "Either set KUBEBUILDER_ASSETS to a directory holding kube-apiserver, "
        "kube-controller-manager, kube-scheduler and etcd (setup-envtest's holds the first "
        "and the last only: enough for an API-only cluster), or, on Debian 12 as root, run "
        "scripts/setup.sh (it installs "
        f"{' '.join(APT_PACKAGES)} and builds them into {cache_dir()})."
    )


def _run(
    cmd: list[str], progress: Progress, cwd: Path | None = None, env: dict | None = None, heartbeat: float = 15.0
) -> int:
    """Run a command, streaming its output lines to ``progress``; return the exit code."""
    progress("$ " + " ".join(cmd))
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    started = time.monotonic()
    try:
        while True:
            try:
                line = lines.get(timeout=heartbeat)
            except queue.Empty:
                # Go links for minutes without a word: say we are alive.
                progress(f"  ... still running ({time.monotonic() - started:.0f} s)")
                continue
            if line is None:
                return proc.wait()
            progress("  " + line.rstrip())
    except BaseException:
        # Interrupted (Ctrl-C): don't leave make or apt running behind us.
        proc.kill()
        proc.wait()
        raise


def _apt_env() -> dict:
    env = dict(os.environ)
    env["DEBIAN_FRONTEND"] = "noninteractive"
    return env


def _needed_packages() -> list[str]:
    present = {
        "golang-1.19-go": (GO_BIN / "go").exists(),
        "rsync": shutil.which("rsync") is not None,
        "etcd-server": _system_etcd() is not None,
        "golang-github-modern-go-reflect2-dev": REFLECT2_SRC.is_dir(),
        "openssl": shutil.which("openssl") is not None,
    }
    return [p for p in APT_PACKAGES if not present[p]]


def _install_packages(progress: Progress) -> None:
    missing = _needed_packages()
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise BinariesUnavailable(_help_text(f"apt-get is missing, cannot install {' '.join(missing)}"))
    if os.geteuid() != 0:
        raise BinariesUnavailable(
            _help_text(f"installing {' '.join(missing)} needs root (run scripts/setup.sh as root)")
        )
    progress(f"installing apt packages: {' '.join(missing)}")
    _run(["apt-get", "update"], progress, env=_apt_env())  # a stale index is not fatal
    rc = _run(["apt-get", "install", "-y", "--no-install-recommends", *missing], progress, env=_apt_env())
    if rc != 0:
        raise BinariesUnavailable(_help_text(f"apt-get install {' '.join(missing)} failed ({rc})"))


def _debian_mirror() -> str:
    """The Debian mirror already configured on this host (falls back to deb.debian.org)."""
    candidates = list(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in candidates:
        if path == DEB_SRC_FILE:
            continue
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("URIs:"):
                uri = line.split(":", 1)[1].strip().split()[0]
                if "security" not in uri:
                    return uri
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]:
                return parts[1] if not parts[1].startswith("[") else parts[2]
    return "http://deb.debian.org/debian"


def _download_source(workdir: Path, progress: Progress) -> Path:
    """Download Debian 12's kubernetes source package into ``workdir``; return the tarball."""
    existing = sorted(workdir.glob("kubernetes_*.orig.tar.gz"))
    if existing:
        return existing[0]
    if not shutil.which("apt-get"):
        raise BinariesUnavailable(_help_text("apt-get is missing, cannot fetch the kubernetes source"))
    if not DEB_SRC_FILE.exists():
        if os.geteuid() != 0:
            raise BinariesUnavailable(_help_text(f"writing {DEB_SRC_FILE} needs root"))
        DEB_SRC_FILE.write_text(
            "Types: deb-src\n"
            f"URIs: {_debian_mirror()}\n"
            "Suites: bookworm\n"
            "Components: main\n"
            f"Signed-By: {DEBIAN_KEYRING}\n"
        )
        _run(["apt-get", "update"], progress, env=_apt_env())
    rc = _run(["apt-get", "source", "--download-only", "kubernetes"], progress, cwd=workdir, env=_apt_env())
    if rc != 0:
        # The index may predate the deb-src entry: refresh once and retry.
        _run(["apt-get", "update"], progress, env=_apt_env())
        rc = _run(["apt-get", "source", "--download-only", "kubernetes"], progress, cwd=workdir, env=_apt_env())
    found = sorted(workdir.glob("kubernetes_*.orig.tar.gz"))
    if rc != 0 or not found:
        raise BinariesUnavailable(_help_text("`apt-get source --download-only kubernetes` failed"))
    return found[0]


def _build_into_cache(cache: Path, progress: Progress) -> None:
    started = time.monotonic()
    # Downloads survive an interrupted build (they sit next to the cache); the source
    # tree is extracted fresh each time so a broken tree never poisons a retry.
    downloads = cache.parent / f".k8s-{K8S_VERSION}-src"
    downloads.mkdir(parents=True, exist_ok=True)
    tarball = _download_source(downloads, progress)
    with tempfile.TemporaryDirectory(prefix="k8s-build-", dir=cache.parent) as tmp:
        tree = Path(tmp) / "k"
        tree.mkdir()
        progress(f"extracting {tarball.name}")
        with tarfile.open(tarball) as tar:
            members = []
            for member in tar.getmembers():
                parts = member.name.split("/", 1)
                if len(parts) == 2 and parts[1]:
                    member.name = parts[1]  # like tar --strip-components=1
                    if member.islnk():  # hard links name archive paths: strip too
                        member.linkname = member.linkname.split("/", 1)[-1]
                    members.append(member)
            safe = {"filter": "tar"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tree, members=members, **safe)
        # reflect2 v1.0.1 built with Go >= 1.18 crashes the apiserver (SIGSEGV in
        # mapiterinit) on the first /openapi/v2 read: use Debian's 1.0.2 instead.
        vendored = tree / "vendor/github.com/modern-go/reflect2"
        shutil.rmtree(vendored, ignore_errors=True)
        vendored.mkdir(parents=True)
        for src in list(REFLECT2_SRC.glob("*.go")) + list(REFLECT2_SRC.glob("*.s")):
            if not src.name.endswith("_test.go"):
                shutil.copy2(src, vendored / src.name)
        env = dict(os.environ)
        env["PATH"] = f"{GO_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
        env.pop("GOFLAGS", None)
        make = [
            "make",
            "WHAT=cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler",
            "KUBE_BUILD_PLATFORMS=linux/amd64",
        ]
        progress("building Kubernetes 1.20.2 (about 5 minutes on 2 cores the first time)")
        rc = _run(make, progress, cwd=tree, env=env)
        if rc != 0:
            # A failed first make can leave an empty _output/bin/prerelease-lifecycle-gen
            # that breaks the next one: start over from a clean _output.
            progress(f"make failed ({rc}); removing _output and retrying once")
            shutil.rmtree(tree / "_output", ignore_errors=True)
            rc = _run(make, progress, cwd=tree, env=env)
        if rc != 0:
            raise BinariesUnavailable(_help_text(f"make failed with exit code {rc}"))
        _publish(tree / "_output" / "bin", cache, progress)
    progress(f"built in {time.monotonic() - started:.0f} s")


def _publish(bin_dir: Path, cache: Path, progress: Progress) -> None:
    """Copy the three kube binaries (and an etcd link) into ``cache`` atomically."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared by users of the host
    try:
        for name in KUBE_BINARIES:
            shutil.copy2(bin_dir / name, staging / name)
        _link_etcd(staging)
        if cache.exists() or cache.is_symlink():
            old = cache.with_name(cache.name + f".old-{os.getpid()}")
            cache.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        staging.rename(cache)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"binaries cached in {cache}")
