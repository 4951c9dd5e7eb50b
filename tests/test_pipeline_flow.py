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
