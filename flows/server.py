"""The temporary Prefect server of `twinmerge run` (and `python -m flows.watch`), dying with its parent.

With no PREFECT_API_URL, Prefect starts a temporary API server as a child process (`uvicorn`) and stops it from
an `atexit` hook, which never runs when the parent is killed (SIGKILL, or SIGTERM without a handler): the server
outlived a killed `twinmerge run` by minutes. `temporary_server()` starts that server itself, from Prefect's
own class and command, but in a child that the kernel sends SIGTERM when its parent dies (Linux
`prctl(PR_SET_PDEATHSIG)`), and points PREFECT_API_URL at it for the block. Call it from the main thread: the
kernel signals the child when the thread that started it ends.
"""
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def _die_with(parent: int):
    """preexec_fn for Popen: this child gets SIGTERM when `parent` dies (and exits at once if it already has)."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: nothing to load in the child

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)
    return preexec


def _server_class():
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class ServerDyingWithParent(SubprocessASGIServer):
        """Prefect's temporary server, started with the same command and environment as Prefect starts it."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            import prefect

            env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1",
                   **get_current_settings().to_environment_variables(exclude_unset=True)}
            return subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                 "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                 "--log-level", "error", "--lifespan", "on"],
                env=env, preexec_fn=_die_with(os.getpid()) if sys.platform.startswith("linux") else None)

    return ServerDyingWithParent


@contextlib.contextmanager
def temporary_server():
    """A Prefect API server for this block's flow runs when PREFECT_API_URL is unset (else nothing is started);
    yields the API URL in use."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    with socket.socket() as sock:  # a free port (start() moves to another one if it is taken meanwhile)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = _server_class()(port)
    try:
        server.start()
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                _send_queued_logs()
    finally:
        server.stop()


def _send_queued_logs() -> None:
    """Send the flow's last log records (its final state...) while the server still runs: Prefect's log worker
    sends them in the background, and after the server stopped it printed "--- Error logging to API --- All
    connection attempts failed" at every exit."""
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    except Exception as e:  # noqa: BLE001 - never hide the flow's own outcome behind a log flush
        logging.getLogger(__name__).debug("could not send the last log records: %s", e)
