"""flows.pipeline without Prefect: thread split for parallel stages, and how one DVC stage is reproduced
(ran / not run / failed) in a throwaway git+DVC project whose stage records the threads it was given."""
import subprocess
import sys
from pathlib import Path

import pytest

from flows.pipeline import PipelineError, reproduce_stage, stage_groups, stage_threads

STAGE = """stages:
  probe:
    cmd: {python} -c "import os, sys; open('out.txt', 'w').write(os.environ.get('OMP_NUM_THREADS', '-')); sys.exit(int(open('fail').read()))"
    deps: [fail]
    outs: [out.txt]
"""


@pytest.fixture
def project(tmp_path) -> Path:
    (tmp_path / "dvc.yaml").write_text(STAGE.format(python=sys.executable))
    (tmp_path / "fail").write_text("0")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    return tmp_path


def test_stage_threads_split_the_cpus(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert stage_threads(2, cpus=2) == 1
    assert stage_threads(1, cpus=2) == 2
    assert stage_threads(3, cpus=8) == 2
    assert stage_threads(4, cpus=2) == 1  # never 0
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert stage_threads(2, cpus=2) is None  # the caller's setting wins


def test_stage_groups_run_foreach_siblings_together_and_other_stages_alone():
    ready = ["router", "compress@b", "compress@a", "evaluate", "bundle", "compress@c"]
    assert stage_groups(ready) == [["compress@a", "compress@b", "compress@c"], ["bundle"], ["evaluate"], ["router"]]
    assert stage_groups(["fetch"]) == [["fetch"]]
    assert stage_groups([]) == []


def test_reproduce_runs_then_skips_with_the_given_threads(project, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    lines = []
    assert reproduce_stage("probe", project, threads=1, log=lines.append) is None
    assert (project / "out.txt").read_text() == "1"
    assert any("Running stage 'probe'" in line for line in lines)
    skipped = reproduce_stage("probe", project, threads=1)
    assert skipped is not None and "probe" in skipped  # "Stage 'probe' didn't change, skipping"


def test_run_cache_restore_counts_as_not_run(project):
    assert reproduce_stage("probe", project, threads=2) is None
    (project / "fail").write_text("0 ")  # dependency changed: runs again
    assert reproduce_stage("probe", project, threads=2) is None
    (project / "fail").write_text("0")  # back to the first version: DVC restores it from the run-cache
    skipped = reproduce_stage("probe", project, threads=2)
    assert skipped is not None and "cached" in skipped


def test_failing_stage_names_itself(project):
    (project / "fail").write_text("3")
    with pytest.raises(PipelineError, match="stage probe failed"):
        reproduce_stage("probe", project)


TWO_STAGES = """stages:
  first:
    cmd: {python} -c "open('a.txt', 'w').write(open('x').read())"
    deps: [x]
    outs: [a.txt]
  second:
    cmd: {python} -c "open('b.txt', 'w').write(open('a.txt').read() * 2)"
    deps: [a.txt]
    outs: [b.txt]
"""


@pytest.mark.e2e
def test_flow_rechecks_downstream_of_a_run_cache_restore(tmp_path):
    """x=1, x=2, then x=1 again: `first` is restored from DVC's run-cache (not run), so `second`, which the
    initial `dvc status` found up to date, must still be reproduced; the flow ends with `dvc status` clean."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline, stale_stages

    (tmp_path / "dvc.yaml").write_text(TWO_STAGES.format(python=sys.executable))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    with prefect_test_harness(server_startup_timeout=120):
        for value in ("1", "2", "1"):
            (tmp_path / "x").write_text(value)
            result = pipeline(project=str(tmp_path), max_workers=1)
            assert (tmp_path / "b.txt").read_text() == value * 2
            assert stale_stages(tmp_path) == []
    assert result["ran"] == [] and result["cached"] == ["first", "second"]  # both restored, nothing recomputed
