"""history/evaluations.jsonl: idempotent append, change against the previous evaluation, regression flags,
and `twinmerge report` wiring (append, then render)."""
import json
from argparse import Namespace

import pytest

from tasks import history
from tasks import report as report_step

TASKS = ["a", "b"]


def _metrics(twin, ta, tasks=TASKS):
    def row(norm):
        return {"scores": {t: v * 0.8 for t, v in zip(tasks, norm)}, "normalized": dict(zip(tasks, norm)),
                "mean_score": 0.0, "mean_normalized": sum(norm) / len(norm)}
    return {"tasks": list(tasks), "metric": {t: "accuracy" for t in tasks},
            "methods": {"experts": row([100.0] * len(tasks)), "task_arithmetic": row(ta), "twin_router": row(twin)}}


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("base: {path: base}\nexperts:\n  a: {path: ea, task: a, data: da}\n"
                                          "  b: {path: eb, task: b, data: db}\nevaluate: {regression_threshold: 2.0}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_append_is_idempotent(project):
    m = _metrics([98.0, 97.0], [80.0, 70.0])
    path = project / "history" / "evaluations.jsonl"
    assert history.append_record(history.make_record(m), path)
    assert not history.append_record(history.make_record(m), path)
    records = history.read_history(path)
    assert len(records) == 1
    r = records[0]
    assert r["time"].endswith("Z") and len(r["params_sha256"]) == 64
    assert r["methods"]["twin_router"]["normalized"] == {"a": 98.0, "b": 97.0}
    assert set(r["experts"]) == {"a", "b"} and r["experts"]["a"]["task"] == "a"
    assert history.append_record(history.make_record(_metrics([99.0, 97.0], [80.0, 70.0])), path)
    assert len(history.read_history(path)) == 2


def test_params_hash_ignores_scheduling(project):
    before = history.params_digest()
    (project / "params.yaml").write_text((project / "params.yaml").read_text() + "watch: {cron: '*/5 * * * *'}\n")
    assert history.params_digest() == before
    (project / "params.yaml").write_text((project / "params.yaml").read_text() + "seed: 1\n")
    assert history.params_digest() != before


def test_section_deltas_and_regressions(project):
    path = project / "h.jsonl"
    assert "First recorded evaluation" in history.history_section(path, _metrics([98.0, 97.0], [80.0, 70.0]), 2.0)
    history.append_record(history.make_record(_metrics([98.0, 97.0], [80.0, 70.0])), path)
    now = _metrics([95.0, 96.5, 90.0], [81.0, 60.0, 75.0], tasks=["a", "b", "c"])
    history.append_record(history.make_record(now), path)  # the report appends before it renders
    text = history.history_section(path, now, 2.0)
    assert "Experts added: c; removed: none" in text
    assert "| twin_router | 97.5 | 93.8 | -3.7 |" in text
    assert "| task_arithmetic | 75.0 | 72.0 | -3.0 |" in text
    assert "REGRESSION twin_router / a: 98.0 -> 95.0 (-3.0)" in text
    assert "REGRESSION task_arithmetic / b: 70.0 -> 60.0 (-10.0)" in text
    assert "twin_router / b" not in text  # -0.5 is within the threshold
    assert "/ c:" not in text  # a new task cannot regress
    assert "No task's normalised score fell by more than 20 points" in history.history_section(path, now, 20.0)


def test_report_appends_then_renders(project):
    (project / "history").mkdir()
    (project / "history" / "evaluations.jsonl").write_text("")
    (project / "eval").mkdir()
    args = Namespace(metrics="eval/metrics.json", out="report", params="params.yaml",
                     history="history/evaluations.jsonl", no_history=False)
    (project / "eval" / "metrics.json").write_text(json.dumps(_metrics([98.0, 97.0], [80.0, 70.0])))
    report_step.main(args)
    report_step.main(args)  # nothing changed: nothing appended
    assert len(history.read_history("history/evaluations.jsonl")) == 1
    assert "First recorded evaluation" in (project / "report" / "report.md").read_text()
    (project / "eval" / "metrics.json").write_text(json.dumps(_metrics([90.0, 97.0], [80.0, 70.0])))
    report_step.main(args)
    assert len(history.read_history("history/evaluations.jsonl")) == 2
    text = (project / "report" / "report.md").read_text()
    assert "| twin_router | 97.5 | 93.5 | -4.0 |" in text and "REGRESSION twin_router / a" in text
