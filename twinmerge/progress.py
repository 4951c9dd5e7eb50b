"""Progress of long loops: a tqdm bar on a terminal, a few log lines otherwise.

When stderr is not a terminal (a DVC stage under the Prefect flow, a CI log) every tqdm refresh would become
a log line, hundreds per stage. There `progress_bar` logs instead, at INFO on the `twinmerge.progress` logger:
once a loop has run for `interval` seconds (default 30), a line every `interval` seconds or sooner when another
`step` of the total is done (default 10%, at most one line per tenth of `interval`), plus a closing line.
Loops shorter than `interval` (the many prediction passes of `evaluate`) log nothing.
"""
import logging
import sys
import time
from collections.abc import Iterable

log = logging.getLogger("twinmerge.progress")


class _LogProgress:
    """The part of tqdm's interface the project uses (iterate, update, set_postfix, close, `with`), as log lines."""

    def __init__(self, iterable, desc, total, unit, step, interval):
        self.iterable, self.desc, self.unit = iterable, desc or "progress", unit
        self.step, self.interval = step, interval
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix, self.closed = 0, "", False
        self.start = self.last = time.monotonic()
        self.reported = 0  # progress at the last line

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:  # also when the loop breaks early (the generator is closed)
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, **kwargs) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        since = now - self.last
        stepped = bool(self.total) and (self.n - self.reported) >= self.step * self.total
        finished = bool(self.total) and self.n >= self.total  # the closing line reports it
        long = now - self.start >= self.interval
        if not finished and long and (since >= self.interval or (stepped and since >= self.interval / 10)):
            self._emit(now)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            now = time.monotonic()
            if now - self.start >= self.interval:
                self._emit(now, done=True)

    def _emit(self, now: float, done: bool = False) -> None:
        self.last, self.reported = now, self.n
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        log.info("%s: %s%s %s%s in %.0f s%s", self.desc, "done " if done else "", count, self.unit, share,
                 now - self.start, extra)


def progress_bar(iterable: Iterable | None = None, desc: str | None = None, total: int | None = None,
                 disable: bool = False, unit: str = "it", stream=None, step: float = 0.1, interval: float = 30.0):
    """tqdm(iterable, desc, total) when `stream` (default sys.stderr) is a terminal, else coarse log lines.

    `disable=True` reports nothing; with `iterable=None` use the result as a bar (`update`, `close`, `with`).
    """
    from tqdm.auto import tqdm

    stream = stream or sys.stderr
    if disable:
        return tqdm(iterable, desc=desc, total=total, disable=True)
    if hasattr(stream, "isatty") and stream.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=stream)
    return _LogProgress(iterable, desc, total, unit, step, interval)
