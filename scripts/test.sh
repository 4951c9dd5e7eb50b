#!/usr/bin/env bash
# Installs what the tests need, then runs the whole suite (unit tests + one small end-to-end test on real data)
# in two processes (pytest-xdist; whole files per process, the slow ones first: tests/conftest.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
python -m pytest -q -n 2 --dist loadfile "$@"
