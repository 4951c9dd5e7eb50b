#!/usr/bin/env bash
# Installs what it needs, then runs the whole pipeline on the embedded default as a Prefect flow
# (a temporary Prefect server unless PREFECT_API_URL points at one). Extra arguments go to `twinmerge run`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
twinmerge run "$@"
twinmerge predict --bundle artifacts/twin "an utterly charming, beautifully acted film" \
  "El perro ladra a la luna." "Shares fell sharply after the bank's quarterly results."
