#!/usr/bin/env bash
# README command 2: install everything the tests need, lint, then run every test tier.
# Tiers that need Docker (kind) skip with the reason printed; all others run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "==> lint (ruff check, ruff format --check)"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> running the test suite (unit, integration on the local control plane, local end-to-end, kind)"
exec .venv/bin/python -m pytest tests -ra "$@"
