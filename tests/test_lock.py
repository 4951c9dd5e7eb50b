"""flows/lock.py and its entry points: one pipeline run at a time per project, a refusal in one line naming the
holder, a dead holder's lock taken over; `twinmerge run --params` validated, then written atomically under the lock.
`tasks.cli.main` is called in-process; the flow and the Prefect server are replaced (no server, no DVC run)."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flows import lock as lock_mod
from flows import pipeline as pipeline_mod
from flows import server as server_mod
from flows.lock import LOCK_PATH, LockHeld, pipeline_lock
from tasks.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
PARAMS = "base: {path: models/base}\nexperts: {}\n"


@contextlib.contextmanager
def held_by_another_process(project: Path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from flows.lock import pipeline_lock
        with pipeline_lock({str(project)!r}):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def _try_lock(project) -> subprocess.CompletedProcess:
    """Another process tries to take the project's pipeline lock."""
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                           f"from flows.lock import pipeline_lock; pipeline_lock({str(project)!r}).__enter__()"],
                          capture_output=True, text=True)


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(PARAMS)
    runs = []

    def fake_pipeline(project, max_workers):
        assert _try_lock(project).returncode != 0  # the lock is held while the flow runs
        runs.append((Path(project) / "params.yaml").read_text())
        return {"ran": [], "cached": [], "seconds": 0.0}

    monkeypatch.setattr(pipeline_mod, "pipeline", fake_pipeline)
    monkeypatch.setattr(server_mod, "temporary_server", contextlib.nullcontext)
    return tmp_path, runs


def test_run_refuses_in_one_line_naming_the_holder(project, capsys):
    root, runs = project
    with held_by_another_process(root) as holder:
        assert cli(["run", "--project", str(root)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and not runs
    assert err.startswith(f"twinmerge run: another pipeline run holds {(root / LOCK_PATH).resolve()}: "
                          f"pid {holder.pid} on {socket.gethostname()} (")
    assert " since 20" in err and "rwlock" not in err
    assert cli(["run", "--project", str(root)]) == 0 and len(runs) == 1  # released when its holder died


def test_run_params_is_validated_then_written_under_the_lock(project, capsys):
    root, runs = project
    bad = root / "bad.yaml"
    bad.write_text("base: {path: models/base}\nexperts: {x: {path: p}}\n")  # task and data missing
    assert cli(["run", "--project", str(root), "--params", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"twinmerge run: error: {bad}: experts.x") and "\n" not in err
    assert (root / "params.yaml").read_text() == PARAMS and not runs

    good = root / "good.yaml"
    good.write_text("seed: 3\n" + PARAMS)
    with held_by_another_process(root):
        assert cli(["run", "--project", str(root), "--params", str(good)]) == 1
    assert (root / "params.yaml").read_text() == PARAMS and not runs  # not while another run holds the lock
    assert cli(["run", "--project", str(root), "--params", str(good)]) == 0
    assert runs == ["seed: 3\n" + PARAMS] and (root / "params.yaml").read_text() == good.read_text()
    assert [p.name for p in root.iterdir() if p.name.startswith(".params")] == []


def test_dead_holders_lock_is_taken_over_and_reentrant_in_process(tmp_path):
    path = tmp_path / LOCK_PATH
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": 999999, "host": "gone", "command": "twinmerge run", "since": "2000"}))
    with pipeline_lock(tmp_path) as held:
        with pipeline_lock(tmp_path):  # the watch flow's pipeline subflow, in the same process
            assert json.loads(held.read_text())["pid"] == os.getpid()
        assert json.loads(held.read_text())["pid"] == os.getpid()  # still held after the inner block
        child = _try_lock(tmp_path)
        assert child.returncode != 0 and f"pid {os.getpid()} on {socket.gethostname()}" in child.stderr
    assert lock_mod._held == {}
    assert path.read_text() == ""  # released and emptied
