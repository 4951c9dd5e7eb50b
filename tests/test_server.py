"""flows/server.py: the temporary Prefect server of `twinmerge run` dies with it, and outlives the flow's last logs.

`twinmerge run` runs in a subprocess on a one-stage project whose stage waits; once the stage runs (so the
server is up and serving the flow), the run's process alone gets SIGKILL (no atexit, no signal handler), and
its server process must be gone within seconds.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
STAGE = """stages:
  wait:
    cmd: {python} -c "import time; open('started', 'w').close(); time.sleep(120)"
    always_changed: true
"""


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _project(tmp_path: Path, dvc_yaml: str) -> dict[str, str]:
    """A git+DVC project in `tmp_path` with this dvc.yaml; returns the environment of a `twinmerge run` there
    (no PREFECT_API_URL: it starts its temporary server)."""
    (tmp_path / "dvc.yaml").write_text(dvc_yaml)
    (tmp_path / "params.yaml").write_text("base: {path: base}\n")  # `twinmerge run` validates it first
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp_path / ".prefect"), DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    return env


def test_killed_run_takes_its_temporary_server_with_it(tmp_path):
    env = _project(tmp_path, STAGE.format(python=sys.executable))
    run = subprocess.Popen([sys.executable, "-m", "tasks.cli", "run", "--project", str(tmp_path)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        _wait(lambda: (tmp_path / "started").exists() or run.poll() is not None, 240, "the stage to start")
        assert run.poll() is None, "twinmerge run ended before its stage started"
        tree = psutil.Process(run.pid).children(recursive=True)
        servers = [p for p in tree if "uvicorn" in " ".join(p.cmdline())]
        assert len(servers) == 1, [p.cmdline() for p in tree]
        run.send_signal(signal.SIGKILL)
        run.wait()
        _wait(lambda: _gone(servers[0]), 20, f"the server (pid {servers[0].pid}) to die with its parent")
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        for proc in tree:  # the stage's processes (dvc, the waiting command) outlive the run: end them
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def test_a_finished_run_sends_its_last_logs_before_the_server_stops(tmp_path):
    """The flow's last records (its final state) reach the temporary server before it stops: before, Prefect's
    background log worker sent them after, and every `twinmerge run` ended with "--- Error logging to API ---"."""
    env = _project(tmp_path, "stages:\n  quick:\n    cmd: echo done > out.txt\n    outs: [out.txt]\n")
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "run", "--project", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Finished in state Completed()" in done.stderr
    assert "Error logging to API" not in done.stderr + done.stdout, done.stderr[-2000:]
