#!/usr/bin/env bash
# Idempotent setup for development and CI (Debian 12, root, no stdin needed):
#   1. apt packages the local control plane needs (only those missing);
#   2. the virtualenv .venv with torch (pinned: a bare `torch` pulls a multi-GB CUDA
#      build), this project with its test extra, and localcluster/ (dev tooling);
#   3. the Kubernetes 1.20.2 control-plane binaries, built once (about 5 minutes on
#      2 cores) into ~/.cache/lepton-operator/k8s-v1.20.2/ or reused from there
#      (or from $KUBEBUILDER_ASSETS).
# Re-running it does only what is missing. Usage: scripts/setup.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LEPTON_VENV:-$ROOT/.venv}"
TORCH_VERSION="2.13.0"
export DEBIAN_FRONTEND=noninteractive

log() { printf '[setup] %s\n' "$*"; }

# --- 1. apt packages ---------------------------------------------------------------
# package -> a file it installs (a cheap "is it there?" test without dpkg-query races)
declare -A CHECK=(
  [golang-1.19-go]=/usr/lib/go-1.19/bin/go
  [rsync]=/usr/bin/rsync
  [etcd-server]=/usr/bin/etcd
  [golang-github-modern-go-reflect2-dev]=/usr/share/gocode/src/github.com/modern-go/reflect2/reflect2.go
  [prometheus]=/usr/bin/prometheus
  [openssl]=/usr/bin/openssl
  # the operator image's allocator (operator/Dockerfile), for tests/unit/test_malloc.py
  # and the benchmarks' --operator-env LD_PRELOAD=...
  [libjemalloc2]=/usr/lib/$(uname -m)-linux-gnu/libjemalloc.so.2
)
missing=()
for pkg in "${!CHECK[@]}"; do
  [ -e "${CHECK[$pkg]}" ] || missing+=("$pkg")
done
if ! python3 -c 'import ensurepip, venv' 2>/dev/null && [ ! -x "$VENV/bin/python" ]; then
  missing+=(python3-venv)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    log "missing ${missing[*]} and there is no apt-get: install them, or set KUBEBUILDER_ASSETS"
  elif [ "$(id -u)" -ne 0 ]; then
    log "missing ${missing[*]}: run this script as root (or install them) "
    exit 1
  else
    log "installing apt packages: ${missing[*]}"
    apt-get update -q || log "apt-get update failed; trying with the current index"
    apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
  fi
else
  log "apt packages present"
fi

# --- 2. virtualenv -------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  log "torch $TORCH_VERSION present"
else
  log "installing torch==$TORCH_VERSION"
  "${PIP[@]}" install -q "torch==$TORCH_VERSION"
fi
log "installing the operator (editable, test extra) and the local cluster tooling (editable)"
"${PIP[@]}" install -q -e "$ROOT[test]" -e "$ROOT/localcluster"

# --- 3. control-plane binaries ---------------------------------------------------------
log "control-plane binaries (build or reuse)"
"$VENV/bin/lepton-local" binaries
log "done; run the tests with: $VENV/bin/python -m pytest"
