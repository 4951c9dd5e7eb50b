"""twinmerge.progress: a tqdm bar on a terminal, a few log lines when output is not a terminal."""
import io
import logging

from twinmerge import progress as P


class _Clock:
    """A fake time.monotonic that advances `tick` seconds per call."""

    def __init__(self, tick):
        self.now, self.tick = 0.0, tick

    def __call__(self):
        self.now += self.tick
        return self.now


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "twinmerge.progress"]


def test_non_tty_logs_about_every_tenth_not_every_item(caplog, monkeypatch):
    """10,000 iterations over ~100 s: silent for the first 30 s, then a line per 10% and the closing line."""
    monkeypatch.setattr(P.time, "monotonic", _Clock(0.01))
    caplog.set_level(logging.INFO, logger="twinmerge.progress")
    items = list(P.progress_bar(range(10_000), desc="train toy", stream=io.StringIO()))
    assert items == list(range(10_000))
    lines = _lines(caplog)
    assert 5 <= len(lines) <= 10
    assert lines[0].startswith("train toy: 3000/10000 it (30%)") and lines[1].startswith("train toy: 4000/10000")
    assert lines[-1].startswith("train toy: done 10000/10000 it (100%)")


def test_non_tty_long_steps_log_every_interval_and_bar_interface(caplog, monkeypatch):
    """A slow loop of unknown length logs by time; update/set_postfix/close work as on tqdm."""
    monkeypatch.setattr(P.time, "monotonic", _Clock(10.0))
    caplog.set_level(logging.INFO, logger="twinmerge.progress")
    with P.progress_bar(desc="steps", stream=io.StringIO(), unit="step") as bar:
        for _ in range(9):
            bar.update(1)
            bar.set_postfix(loss="0.123")
    lines = _lines(caplog)
    assert 3 <= len(lines) <= 5  # ~90 s at a line per 30 s, plus the closing line
    assert lines[-1].startswith("steps: done 9 step") and lines[-1].endswith("loss=0.123")


def test_short_loop_and_early_break_and_disable(caplog, monkeypatch):
    """A loop shorter than the interval logs nothing; a broken-off loop still closes; disable is silent."""
    caplog.set_level(logging.INFO, logger="twinmerge.progress")
    monkeypatch.setattr(P.time, "monotonic", _Clock(0.2))
    assert sum(P.progress_bar(range(100), desc="fast", stream=io.StringIO())) == 4950  # 20 s
    assert _lines(caplog) == []
    monkeypatch.setattr(P.time, "monotonic", _Clock(1.0))
    bar = P.progress_bar(range(100), desc="early", stream=io.StringIO())
    for i in bar:
        if i == 40:
            break
    assert _lines(caplog)[-1].startswith("early: done 40/100")
    caplog.clear()
    list(P.progress_bar(range(100), desc="off", stream=io.StringIO(), disable=True))
    assert _lines(caplog) == []


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_tty_gets_a_tqdm_bar(caplog):
    stream = _Tty()
    caplog.set_level(logging.INFO, logger="twinmerge.progress")
    assert list(P.progress_bar(range(5), desc="bar", stream=stream)) == list(range(5))
    assert "bar" in stream.getvalue() and _lines(caplog) == []
