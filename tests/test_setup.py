"""scripts/setup.sh decides whether to install by asking the installed environment (scripts/install_state.py),
not by importing from the work tree, where the current directory is on sys.path and every import succeeds."""
import importlib.util
import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("install_state", ROOT / "scripts" / "install_state.py")
install_state = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install_state)


def test_bare_virtualenv_is_not_taken_for_installed(tmp_path):
    venv.create(tmp_path / "venv", with_pip=False)
    python = tmp_path / "venv" / "bin" / "python"
    # the old check: run from the repository root, the work tree's packages import without any install
    assert subprocess.run([str(python), "-c", "import twinmerge, tasks, flows"], cwd=ROOT).returncode == 0
    check = [str(python), "scripts/install_state.py", str(ROOT), "check"]
    assert subprocess.run(check, cwd=ROOT).returncode == 1


def test_install_is_current_only_with_this_pyproject(tmp_path, monkeypatch):
    """This environment (set up by scripts/setup.sh) is installed; recorded from an older pyproject.toml (a
    dependency added since) it is not, and without a record it is not."""
    stamp = tmp_path / "twinmerge-install.sha256"
    monkeypatch.setattr(install_state, "_stamp", lambda: stamp)
    assert not install_state.installed(ROOT)
    stamp.write_text(install_state._pyproject_hash(ROOT) + "\n")
    assert install_state.installed(ROOT)
    stamp.write_text("0" * 64 + "\n")
    assert not install_state.installed(ROOT)
