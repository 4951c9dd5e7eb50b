"""One pipeline run at a time per project: the file lock `artifacts/.pipeline.lock`.

Every entry point that runs stages takes it: `twinmerge run` (flows.pipeline.main, before it touches params.yaml),
the watch flow (flows.watch.check_and_run, so `twinmerge serve` and the work-pool deployment too) and the pipeline
flow itself (flows.pipeline.pipeline, for deployments of it). It is an `fcntl.flock` on the file, so the kernel
releases it when its holder dies however it dies: a lock whose recorded holder is gone is simply taken over.
The holder writes its pid, host, command line and start time into the file; a second run is refused with one line
naming them. Re-entrant within one process (the watch flow holds it while its pipeline subflow takes it again).
"""
import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_PATH = "artifacts/.pipeline.lock"

_held: dict[Path, int] = {}  # lock file -> depth, in this process
_guard = threading.Lock()


class LockHeld(RuntimeError):
    """Another run holds the pipeline lock; the message says who and since when."""


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        info = {}
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')} ({info.get('command', '?')}) "
            f"since {info.get('since', '?')}")


@contextlib.contextmanager
def pipeline_lock(project: str | Path):
    """Hold the project's pipeline lock (non-blocking); LockHeld when another process holds it."""
    path = (Path(project) / LOCK_PATH).resolve()
    with _guard:
        if path in _held:
            _held[path] += 1
            fd = None
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise LockHeld(f"another pipeline run holds {path}: {holder}") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "command": shlex.join(sys.argv)[:300],
                                      "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode(), 0)
            _held[path] = 1
    try:
        yield path
    finally:
        with _guard:
            _held[path] -= 1
            if fd is not None:
                del _held[path]
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
