#!/usr/bin/env bash
# README command 1: set up what is missing, then run a LeptonJob end to end on the local
# control plane (real apiserver, scheduler, controller-manager; pods as local processes),
# with Prometheus and the operator, showing live progress until the job succeeds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lepton-local demo "$@"
echo "==> monitoring (README.md, \"Monitoring\"), for your own Prometheus and Grafana:"
echo "    rules: $PWD/monitoring/rules/{recording,alerts}.yaml (list under rule_files:; Helm: --set monitoring.rules.enabled=true)"
echo "    dashboard: $PWD/monitoring/dashboards/lepton-jobs.json (Grafana: Dashboards > New > Import; Helm: --set monitoring.dashboard.enabled=true)"
