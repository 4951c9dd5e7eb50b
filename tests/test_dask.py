"""flows.pipeline on Dask and `--push` to a DVC remote, on a tiny throwaway git+DVC project: a `foreach` family of
four `part` stages and a `join` stage downstream, each a short Python script that also records, outside the
project, its process ancestry and the OMP_NUM_THREADS it was given.

The flow tests (e2e marker: a Prefect test server, shared by the module) run the project on the thread pool and
on a real LocalCluster of two worker processes and compare dvc.lock and every output; a worker started in its
own mount namespace, where the project's folder is an empty tmpfs, is a worker without the shared filesystem.
"""
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.pipeline import (
    PipelineError,
    Slot,
    check_prefect_api,
    check_shared_filesystem,
    connect_dask,
    place,
    probe_worker,
    push_outputs,
    push_remote,
    stage_threads,
)
from tasks.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
PARAMS = "base: {path: models/base}\nexperts: {}\n"  # `twinmerge run` validates params.yaml; no stage reads it
DVC_YAML = """stages:
  part:
    foreach: [a, b, c, d]
    do:
      cmd: {python} step.py part ${{item}}
      deps: [seed, step.py]
      outs:
        - parts/${{item}}.txt
  join:
    cmd: {python} step.py join
    deps: [parts/a.txt, parts/b.txt, parts/c.txt, parts/d.txt, step.py]
    outs: [joined.txt]
"""
STEP = """import json, os, sys
from pathlib import Path

import psutil

kind = sys.argv[1]
stage = f"part@{sys.argv[2]}" if kind == "part" else kind
trace = Path("..", "trace")  # outside the project: neither a dependency nor an output
trace.mkdir(exist_ok=True)
(trace / f"{stage}.json").write_text(json.dumps({"chain": [[p.pid, p.cmdline()] for p in psutil.Process().parents()],
                                                 "threads": os.environ.get("OMP_NUM_THREADS"),
                                                 "malloc": os.environ.get("MALLOC_TRIM_THRESHOLD_")}))
if kind == "part":
    Path("parts").mkdir(exist_ok=True)
    Path("parts", sys.argv[2] + ".txt").write_text(sys.argv[2] + Path("seed").read_text() * 3)
else:
    Path("joined.txt").write_text("".join(p.read_text() for p in sorted(Path("parts").glob("*.txt"))))
"""
STAGES = ["part@a", "part@b", "part@c", "part@d", "join"]


def _dvc(args: list[str], cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {args}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def _project(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "dvc.yaml").write_text(DVC_YAML.format(python=sys.executable))
    (root / "step.py").write_text(STEP)
    (root / "seed").write_text("x")
    (root / "params.yaml").write_text(PARAMS)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _dvc(["init", "-q"], root)
    _dvc(["config", "core.analytics", "false"], root)
    return root


def _outputs(root: Path) -> dict:
    """dvc.lock (parsed: its stages are in the order they finished) and every output's text. (`join` depends on
    the four files, not on parts/: DVC writes parts/.gitignore in the order the stages finished, and a folder
    dependency's hash includes it.)"""
    names = ["joined.txt", *(f"parts/{i}.txt" for i in "abcd")]
    return {"dvc.lock": yaml.safe_load((root / "dvc.lock").read_text()),
            **{name: (root / name).read_text() for name in names}}


def _traces(root: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (root.parent / "trace").glob("*.json")}


@contextlib.contextmanager
def _cluster(n_workers: int):
    """A LocalCluster of one-thread worker processes. Its nannies, in this process, write the workers'
    OMP_NUM_THREADS=1 & co into this process's environment: restored once the workers started, and at the end."""
    from distributed import LocalCluster

    saved = dict(os.environ)

    def restore():
        os.environ.clear()
        os.environ.update(saved)

    try:
        with LocalCluster(n_workers=n_workers, processes=True, threads_per_worker=1, dashboard_address=":0") as cluster:
            restore()
            yield cluster
    finally:
        restore()


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_place_on_one_host_is_the_thread_pools_split(monkeypatch):
    """Interchangeable slots of one host: each stage started gets cpu_count // min(limit, running + ready), as
    the flow computed before placement existed, and never more stages than slots or the limit."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for limit in (1, 2, 3):
        slots = [Slot(host="here", cpus=8)] * limit
        for running in range(limit + 1):
            for n_ready in range(5):
                busy = {i: f"r{i}" for i in range(running)}
                ready = [f"s{i}" for i in range(n_ready)]
                starts = place(ready, slots, busy, limit)
                assert [s for s, _, _ in starts] == ready[:limit - running]
                assert {i for _, i, _ in starts}.isdisjoint(busy)
                assert all(t == stage_threads(min(limit, running + n_ready), cpus=8) for _, _, t in starts)


def test_place_spreads_over_hosts_and_splits_each_hosts_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    slots = [Slot("big", 16, "tcp://b:1"), Slot("big", 16, "tcp://b:2"), Slot("small", 2, "tcp://s:1")]
    starts = place(["x", "y", "z"], slots, {}, limit=3)
    assert [(s, slots[i].host, t) for s, i, t in starts] == [("x", "big", 8), ("y", "big", 8), ("z", "small", 2)]
    starts = place(["x", "y"], slots, {0: "running"}, limit=3)  # 16/2 on big beats 2/1 on small
    assert [(s, i, t) for s, i, t in starts] == [("x", 1, 8), ("y", 2, 2)]
    assert place(["x"], slots, {}, limit=3, environ={"OMP_NUM_THREADS": "3"}) == [("x", 0, None)]  # caller's


def test_probe_worker_needs_the_token_at_the_same_path(tmp_path):
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / ".dask-probe-1").write_text("t1")
    assert probe_worker(str(tmp_path), "artifacts/.dask-probe-1", "t1")["sees_project"]
    assert not probe_worker(str(tmp_path), "artifacts/.dask-probe-1", "other")["sees_project"]  # another tree
    answer = probe_worker(str(tmp_path / "elsewhere"), "artifacts/.dask-probe-1", "t1")
    assert not answer["sees_project"] and answer["cpus"] == os.cpu_count() and answer["pid"] == os.getpid()


def test_workers_on_other_hosts_need_a_prefect_api_they_can_reach():
    here = {"tcp://10.0.0.1:1": {"host": socket.gethostname()}}
    there = {**here, "tcp://10.0.0.2:1": {"host": "node-b"}, "tcp://10.0.0.3:1": {"host": "node-a"}}
    check_prefect_api(here, None)  # one machine: the temporary server on 127.0.0.1 is fine
    check_prefect_api(there, "http://prefect.example:4200/api")
    with pytest.raises(PipelineError, match=r"^dask workers on node-a, node-b cannot reach the Prefect API at a "
                                            r"temporary server on 127\.0\.0\.1: start `prefect server start"):
        check_prefect_api(there, None)
    with pytest.raises(PipelineError, match="cannot reach the Prefect API at http://localhost:4200/api"):
        check_prefect_api(there, "http://localhost:4200/api")


def test_unreachable_scheduler_is_one_line():
    with pytest.raises(PipelineError, match=r"^cannot reach the dask scheduler at tcp://127\.0\.0\.1:9: ") as e:
        connect_dask("tcp://127.0.0.1:9", timeout=2)
    assert "\n" not in str(e.value)


def test_bad_run_options_are_refused_before_anything(tmp_path, capsys):
    project = _project(tmp_path / "proj")
    with pytest.raises(SystemExit) as e:
        cli(["run", "--project", str(project), "--dask-workers", "2", "--dask-address", "tcp://127.0.0.1:9"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["run", "--project", str(project), "--dask-workers", "0"])
    assert "at least 1" in capsys.readouterr().err
    assert cli(["run", "--project", str(project), "--remote", "store"]) == 2
    assert capsys.readouterr().err == "twinmerge run: error: --remote NAME needs --push\n"
    assert cli(["run", "--project", str(project), "--push"]) == 1  # no default remote: nothing runs
    assert capsys.readouterr().err == (f"twinmerge run: --push: {project} has no default DVC remote: add one with "
                                       "`dvc remote add -d NAME URL`, or pass --remote NAME\n")
    assert not (project / "dvc.lock").exists() and not (project / "parts").exists()


def test_push_remote_resolution_and_a_failed_push_names_stage_and_remote(tmp_path):
    project = _project(tmp_path / "proj")
    _dvc(["remote", "add", "store", str(tmp_path / "store")], project)
    with pytest.raises(PipelineError, match="no default DVC remote"):
        push_remote(project)
    assert push_remote(project, "store") == "store"
    with pytest.raises(PipelineError, match=r"no DVC remote named 'nope' in .* \(remotes: store; "):
        push_remote(project, "nope")
    _dvc(["remote", "add", "-d", "--local", "broken", str(tmp_path / "a-file" / "store")], project)
    assert push_remote(project) == "broken"  # the default, from .dvc/config.local
    _dvc(["repro", "part@a"], project)
    assert push_outputs(project, "store", "part@a") == "1 file pushed"
    (tmp_path / "a-file").write_text("a file where the remote's folder should be")
    with pytest.raises(PipelineError) as e:
        push_outputs(project, "broken", "part@a")
    assert str(e.value).startswith("stage part@a: dvc push to remote 'broken' failed: ")
    assert "\n" not in str(e.value)


@pytest.mark.e2e
def test_dask_run_matches_the_thread_pool_runs_in_the_workers_and_pushes(tmp_path, harness, monkeypatch, capsys):
    """The same project on the thread pool (pipeline()) and through `twinmerge run --dask-address --push` on a
    LocalCluster of two worker processes: same dvc.lock, same outputs, every stage's `dvc repro` a child of a
    worker process (both workers used), each host's cores split as on the thread pool, every output on the
    remote, no environment variable of the workers' nannies in a stage; then a push that fails on a worker stops
    the run in one line. Then the thread-pool copy again on a LocalCluster the flow starts (`dask_workers=1`) with push:
    nothing runs, and the final push sends what was never pushed."""
    from distributed import Client

    from flows.pipeline import pipeline, stale_stages

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    environ = dict(os.environ)
    ref = tmp_path / "threads" / "proj"
    shutil.copytree(_project(tmp_path / "fresh"), ref)
    first = pipeline(project=str(ref), max_workers=2)
    assert sorted(first["ran"]) == sorted(STAGES) and first["cached"] == []

    on_dask = tmp_path / "dask" / "proj"
    shutil.copytree(tmp_path / "fresh", on_dask)
    _dvc(["remote", "add", "-d", "--local", "store", str(tmp_path / "store")], on_dask)
    with _cluster(2) as cluster, Client(cluster.scheduler_address, set_as_default=False) as client:
        workers = set(client.run(os.getpid).values())
        capsys.readouterr()
        assert cli(["run", "--project", str(on_dask), "--dask-address", cluster.scheduler_address, "--push"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        outputs, traces = _outputs(on_dask), {ref: _traces(ref), on_dask: _traces(on_dask)}
        assert json.loads(_dvc(["status", "--cloud", "--json"], on_dask)) == {}  # every output on the remote
        assert stale_stages(on_dask) == []

        # a push that fails on a worker stops the run, in one line naming the stage and the remote
        (tmp_path / "a-file").write_text("a file where the remote's folder should be")
        _dvc(["remote", "add", "-d", "--local", "broken", str(tmp_path / "a-file" / "store")], on_dask)
        (on_dask / "seed").write_text("y")
        assert cli(["run", "--project", str(on_dask), "--dask-address", cluster.scheduler_address, "--push"]) == 1
        assert re.fullmatch(r"twinmerge run: stage part@[a-d]: dvc push to remote 'broken' failed: ERROR: .*",
                            capsys.readouterr().err.strip().splitlines()[-1])
    assert sorted(result["ran"]) == sorted(STAGES) and result["cached"] == [] and result["pushed"] == "store"
    assert outputs == _outputs(ref)
    assert list((on_dask / "artifacts").iterdir()) == [on_dask / "artifacts" / ".pipeline.lock"]  # probe deleted

    cpus = os.cpu_count()
    for root, parents in ((ref, {os.getpid()}), (on_dask, workers)):
        trace = traces[root]
        assert set(trace) == set(STAGES)
        dvc_parents = {stage: _parent_of_dvc_repro(t["chain"]) for stage, t in trace.items()}
        assert set(dvc_parents.values()) == parents, root  # the flow's own process, or both workers
        assert trace["join"]["threads"] == str(cpus)  # alone on the host
        assert trace["part@a"]["threads"] == trace["part@b"]["threads"] == str(max(1, cpus // 2))
        assert {t["malloc"] for t in trace.values()} == {os.environ.get("MALLOC_TRIM_THRESHOLD_")}  # not the nanny's
    assert os.getpid() not in workers

    _dvc(["remote", "add", "-d", "--local", "store", str(tmp_path / "store2")], ref)
    again = pipeline(project=str(ref), dask_workers=1, push=True)
    assert again["ran"] == [] and sorted(again["cached"]) == sorted(STAGES) and again["pushed"] == "store"
    assert json.loads(_dvc(["status", "--cloud", "--json"], ref)) == {}  # cached stages pushed at the end
    assert dict(os.environ) == environ  # the flow's LocalCluster left this process's environment as it was


def _parent_of_dvc_repro(chain: list[list]) -> int:
    """The pid of the process that started `dvc repro`, from a stage command's ancestors [[pid, argv], ...]
    (nearest first). DVC runs the command through $SHELL, or /bin/sh when SHELL is unset: bash execs a single
    command, dash keeps a shell process in between, so `dvc repro` is not always the direct parent."""
    at = next(i for i, (_, argv) in enumerate(chain) if "dvc" in argv and "repro" in argv)
    return chain[at + 1][0]


def _can_hide_folders() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True).returncode == 0


@pytest.mark.e2e
@pytest.mark.skipif(not _can_hide_folders(), reason="needs `unshare -rm` (user + mount namespaces) and tmpfs")
def test_worker_without_the_shared_filesystem_stops_the_run_in_one_line(tmp_path, capsys):
    """One worker of a LocalCluster sees the project; another runs in its own mount namespace where the
    project's parent folder is an empty tmpfs (a host without the shared filesystem). `twinmerge run
    --dask-address` names that worker in one line, exits 1, and no stage runs; the probe token is gone."""
    from distributed import Client

    project = _project(tmp_path / "shared" / "proj")
    with _cluster(1) as cluster, Client(cluster.scheduler_address, set_as_default=False) as client:
        blind = subprocess.Popen(
            ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(tmp_path / "shared"),
             sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address, "--nthreads", "1",
             "--name", "blind", "--no-dashboard", "--no-nanny"],
            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client.wait_for_workers(2, timeout=120)
            address = next(a for a, w in client.scheduler_info(n_workers=-1)["workers"].items() if w["name"] == "blind")
            capsys.readouterr()
            assert cli(["run", "--project", str(project), "--dask-address", cluster.scheduler_address]) == 1
            err = capsys.readouterr().err
            assert err == (f"twinmerge run: dask worker {address} cannot see the project at {project.resolve()} "
                           "(the workers need a shared filesystem at the same path)\n")
            with pytest.raises(PipelineError, match=f"dask worker {address} cannot see the project"):
                check_shared_filesystem(client, project)  # what the flow itself checks first
        finally:
            blind.terminate()
            blind.wait(timeout=30)
    assert not (project / "dvc.lock").exists() and not (project / "parts").exists()
    assert [p.name for p in (project / "artifacts").iterdir()] == [".pipeline.lock"]
