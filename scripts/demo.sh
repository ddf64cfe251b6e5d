#!/usr/bin/env bash
# README command 1: set up what is missing, then run a LeptonJob end to end on the local
# control plane (real apiserver, scheduler, controller-manager; pods as local processes),
# with Prometheus and the operator, showing live progress until the job succeeds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lepton-local demo "$@"
