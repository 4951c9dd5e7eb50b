"""A step killed while its temporaries exist leaves nothing that DVC or the next run sees.

Temporaries of atomic writes (twinmerge/io.py) sit beside their target as `.<target>.tmp-<pid>-*`; `.dvcignore`
keeps them out of the hashes of directory dependencies, and the next write of the same target deletes those of
dead processes. The kill tests run each writing stage of a tiny git+DVC project (tiny random BERT experts, the
repository's dvc.yaml without evaluate/report) under `dvc repro -f`, SIGKILL the whole process group while the
step waits just before renaming a complete temporary into place (io.PAUSE_ENV), then rerun `dvc repro`: DVC is
clean, dvc.lock is the uninterrupted run's and artifacts/ holds exactly the uninterrupted run's files.
"""
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks.params import Params
from test_pipeline_steps import _task_tables, _write_tokenizer
from tiny_models import make_base, make_experts
from twinmerge import io

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _run(cmd, cwd, env=ENV) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout


def _dvc(*args, cwd) -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd)


def _git_dvc_init(root: Path) -> None:
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    _run(["git", "init", "-q"], root)
    _dvc("init", "-q", cwd=root)
    _dvc("config", "core.analytics", "false", cwd=root)


def _listing(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones included) -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- the temporaries' names, the sweep, .dvcignore

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_sweep_removes_only_dead_temporaries_of_its_own_target(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    own_dead = tmp_path / f".a.safetensors.tmp-{dead}-x1"
    own_dead_dir = tmp_path / f".a.safetensors.tmp-{dead}-x2"
    own_live = tmp_path / f".a.safetensors.tmp-{live}-x3"
    sibling_dead = tmp_path / f".b.safetensors.tmp-{dead}-x4"  # compress@b's: not this writer's business
    own_dead.write_text("partial")
    (own_dead_dir / "nested").mkdir(parents=True)
    own_live.write_text("being written")
    sibling_dead.write_text("partial")
    io.save_safetensors_atomic({"w": __import__("torch").zeros(2)}, tmp_path / "a.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["a.safetensors", own_live.name, sibling_dead.name])
    with io.atomic_dir(tmp_path / "b.safetensors") as staged:  # any target name: folders are swept the same way
        (staged / "x").write_text("x")
    assert not sibling_dead.exists() and own_live.exists()


def test_temporaries_carry_the_writer_pid(tmp_path):
    with io.atomic_dir(tmp_path / "out") as staged:
        assert staged.name.startswith(f".out{io.TEMP_MARK}{os.getpid()}-")
    seen = []
    io.atomic_write(tmp_path / "f.json", lambda tmp: seen.append(Path(tmp).name) or Path(tmp).write_text("{}"))
    assert seen[0].startswith(f".f.json{io.TEMP_MARK}{os.getpid()}-")


def test_sweep_under_a_folder_removes_dead_temporaries_at_any_depth(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    stale = [tmp_path / "checkpoints" / f".alpha{io.TEMP_MARK}{dead}-ab", tmp_path / f".twin{io.TEMP_MARK}{dead}-cd"]
    (stale[0] / f".config.json{io.TEMP_MARK}{dead}-ef").mkdir(parents=True)  # nested in a stale folder
    stale[1].write_text("partial")
    kept = [tmp_path / "exclusive" / f".beta.safetensors{io.TEMP_MARK}{live}-gh",  # a live writer's
            tmp_path / "exclusive" / "alpha.safetensors", tmp_path / ".pipeline.lock"]
    for path in kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert sorted(io.sweep_stale_temps_under(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


DIR_DEP = """stages:
  count:
    cmd: {python} -c "import os; open('n.txt', 'w').write(str(len(os.listdir('d'))))"
    deps: [d]
    outs: [n.txt]
"""


def test_dvcignore_keeps_temporaries_out_of_directory_dependencies(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.safetensors").write_text("factors")
    (tmp_path / "dvc.yaml").write_text(DIR_DEP.format(python=sys.executable))
    _git_dvc_init(tmp_path)
    _dvc("repro", cwd=tmp_path)
    lock = (tmp_path / "dvc.lock").read_text()
    (tmp_path / "d" / f".b.safetensors.tmp-{_dead_pid()}-abc").write_text("left by a SIGKILL")
    half = tmp_path / "d" / f".c.tmp-{_dead_pid()}-def"
    half.mkdir()
    (half / "model.safetensors").write_text("half a checkpoint")
    assert _dvc("status", "--json", cwd=tmp_path).strip() in ("{}", "")
    _dvc("repro", cwd=tmp_path)
    assert (tmp_path / "dvc.lock").read_text() == lock


# ---- SIGKILL of each writing stage at its worst moment, then a plain rerun

NUM_LABELS = {"alpha": 2, "beta": 3}
# stage -> the target whose write is interrupted (the stage's last one: earlier ones are already in place)
KILLS = {"download@alpha": "alpha", "modularize": "shared", "compress@alpha": "alpha.stats.json",
         "router": "report.json", "bundle": "twin"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project reproduced once without interruption: (root, artifacts listing, dvc.lock text)."""
    root = tmp_path_factory.mktemp("kill")
    for folder in ("tasks", "twinmerge"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for stage in ("evaluate", "report"):  # not writing steps under test; they would only cost time
        del stages["stages"][stage]
    stages["stages"]["bundle"]["deps"].remove("artifacts/eval/metrics.json")  # evaluate's: a card without scores
    (root / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    base = make_base(root / "models", "bert", bare_backbone=True)
    _write_tokenizer(base)
    make_experts(root / "models", base, list(NUM_LABELS.values()), names=list(NUM_LABELS))
    rng = random.Random(0)
    for i, name in enumerate(NUM_LABELS):
        _task_tables(root, i, NUM_LABELS[name], rng)
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "README").write_text("the embedded default's sources are not used here\n")
    params = {"seed": 0, "base": {"path": "models/base"},
              "data": {"raw_dir": "data/raw", "tasks_dir": "data/tasks", "tasks": []}, "hub_sources": {},
              "experts": {n: {"path": f"models/{n}", "task": n, "data": f"data/tasks/t{i}"}
                          for i, n in enumerate(NUM_LABELS)},
              "compress": {"rank": {"mode": "fraction", "value": 0.25}, "dtype": "float32"},
              "router": {"epochs": 5, "patience": 5, "batch_size": 16, "max_length": 16},
              "evaluate": {"max_length": 16}}
    full = Params.model_validate(params).model_dump(mode="json")  # DVC needs every key a stage names
    full["data"].update(pypi={}, debian={})
    (root / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    (root / ".gitignore").write_text("/models/\n")
    _git_dvc_init(root)
    _dvc("commit", "-f", "fetch", "prepare", cwd=root)
    _dvc("repro", cwd=root)
    return root, _listing(root / "artifacts"), (root / "dvc.lock").read_text()


def _kill_while_renaming(root: Path, stage: str, target: str) -> str:
    """`dvc repro -f --single-item <stage>` until the step waits before renaming `target`'s complete
    temporary into place; then SIGKILL of DVC and the step together. Returns the temporary's path."""
    env = {**ENV, io.PAUSE_ENV: target}
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-f", "--single-item", stage], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(f"{io.PAUSE_ENV}: "):
                temporary = line.split(": ", 1)[1].strip()
                assert Path(root, temporary).exists()
                return temporary
        pytest.fail(f"{stage} ended without pausing before renaming {target}:\n{''.join(seen[-20:])}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


@pytest.mark.parametrize("stage", list(KILLS))
def test_kill_at_the_worst_moment_then_a_rerun_is_clean(project, stage):
    """The rerun as `twinmerge run` does it: stale temporaries swept at the flow's start, then DVC (which restores
    the killed stage's outputs from its run-cache: the step itself does not run)."""
    root, listing, lock = project
    temporary = _kill_while_renaming(root, stage, KILLS[stage])
    assert f"{KILLS[stage]}{io.TEMP_MARK}" in temporary
    _wait_gone(root, "twinmerge")  # the step's process, killed with DVC, is gone before the rerun
    assert (root / temporary).exists()
    assert _dvc("status", "--json", cwd=root).strip() not in ("{}", "")  # the killed stage is stale
    io.sweep_stale_temps_under(root / "artifacts")  # flows.pipeline.pipeline's first act
    _dvc("repro", cwd=root)
    assert _dvc("status", "--json", cwd=root).strip() in ("{}", "")
    assert (root / "dvc.lock").read_text() == lock
    assert _listing(root / "artifacts") == listing


def test_killed_step_rerun_by_dvc_alone_sweeps_its_own_temporaries(project):
    """DVC alone reruns the step (forced: unforced, DVC restores its outputs from the cache without running it):
    its atomic writes sweep the killed run's temporaries of the same targets; DVC never hashed them."""
    root, listing, lock = project
    temporary = _kill_while_renaming(root, "compress@alpha", "alpha.stats.json")
    _wait_gone(root, "twinmerge")
    _dvc("repro", "-f", "--single-item", "compress@alpha", cwd=root)
    assert not (root / temporary).exists()
    assert _dvc("status", "--json", cwd=root).strip() in ("{}", "")
    assert (root / "dvc.lock").read_text() == lock
    assert _listing(root / "artifacts") == listing


def _wait_gone(root: Path, name: str, timeout: float = 10) -> None:
    import psutil

    deadline = time.monotonic() + timeout
    while any(p.info["cwd"] == str(root) and name in " ".join(p.info["cmdline"] or [])
              for p in psutil.process_iter(["cwd", "cmdline"])):
        assert time.monotonic() < deadline, f"a {name} process still runs in {root}"
        time.sleep(0.1)
