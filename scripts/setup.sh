#!/usr/bin/env bash
# Idempotent set-up: Python packages (torch pinned to the local CPU wheel), offline-friendly settings.
# Sourced by scripts/main.sh and scripts/test.sh.
set -euo pipefail
export DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=false
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
if ! python -c "import twinmerge, tasks, flows" 2>/dev/null || [ "${TWINMERGE_REINSTALL:-0}" = 1 ]; then
  python -m pip install -q -e "$root"
fi
git -C "$root" rev-parse --git-dir >/dev/null 2>&1 && (cd "$root" && dvc config --local core.analytics false 2>/dev/null || true)
