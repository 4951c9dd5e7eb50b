"""The whole pipeline as a Prefect flow that drives DVC.

DVC decides what is stale: every stage of `dvc.yaml` (per-expert `foreach` stages included) becomes one
Prefect task run. A stage that `dvc status` reports up to date finishes in a `Cached` state without running;
a stale one runs `dvc repro --single-item <stage>`, which executes the same `twinmerge <step>` command that
`dvc repro` runs and records it in `dvc.lock`. Stages are scheduled by the DVC graph: every stage whose
upstream stages are done is ready; up to `max_workers` ready stages run side by side (thread pool), the next
one starting as soon as one finishes (larger `foreach` families first: `stage_groups`), so a family's last
stage does not hold back the stages of another that are ready (`static@*` beside `compress@*`, ...).
Parallel stages split the CPU: each stage process gets cpu_count // (stages at once when it starts)
BLAS/OpenMP threads (unless the caller set OMP_NUM_THREADS); two torch processes that each take every core spin against each other
(two parallel `compress` stages took 192 s instead of 4.7 s on 2 cores). Siblings of one family take about the
same time, so splitting the cores between them loses little; a process cannot change its thread count, so a
stage started beside another keeps its share after the other ends (the last stage of a run may finish on a
fraction of the cores).
No tensors pass through Prefect: tasks take stage names and return small dicts.

On a Dask cluster (`--dask-address` of a running scheduler, or `--dask-workers N` for a LocalCluster the flow
starts and closes) the same loop places each ready stage on a free worker thread (prefect_dask.DaskTaskRunner,
the task pinned to that worker) and splits each host's cores between the stages running on that host. The
workers run `dvc repro --single-item` in the project folder itself, so they must see it at the same absolute
path (a shared filesystem): checked before any stage runs. With `--push`, each stage's outputs go to a DVC
remote right after the stage ran, and everything once more at the end.
"""
import concurrent.futures
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.lock import LockHeld, pipeline_lock


class PipelineError(RuntimeError):
    """A DVC stage failed; the message names the stage and ends with its last output line."""


def _dvc(args: list[str], project: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True)


def stage_graph(project: Path) -> dict[str, set[str]]:
    """Stage name -> names of the stages it depends on, read from DVC's own graph of `dvc.yaml`.

    Names are addressed from the project root, as `dvc status`/`dvc repro` run there see them (`train@a` for
    the root dvc.yaml, `sub/dvc.yaml:x` for a nested one), whatever the caller's working directory.
    """
    from dvc.repo import Repo

    root = Path(project).resolve()

    def name(stage) -> str:
        dvcfile = Path(stage.path).resolve()
        return stage.name if dvcfile.parent == root else f"{dvcfile.relative_to(root)}:{stage.name}"

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        return {name(s): {name(d) for d in graph.successors(s)} for s in graph.nodes}


def stale_stages(project: Path, stages: list[str] | None = None) -> list[str]:
    """Names of the stages `dvc status` reports as changed (all stages when `stages` is None)."""
    proc = _dvc(["status", "--json", *(stages or [])], project)
    if proc.returncode != 0:
        raise PipelineError(f"dvc status failed in {project}: {proc.stderr.strip().splitlines()[-1:]}")
    return sorted(json.loads(proc.stdout or "{}"))


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# What `dvc repro --single-item` prints when it does not run the command: up to date, or restored from the
# run-cache (outputs checked out, command not run).
RESTORED = "is cached - skipping run"
NOT_RUN = ("didn't change, skipping", RESTORED)


def stage_threads(concurrent: int, cpus: int | None = None, environ=None) -> int | None:
    """BLAS/OpenMP threads per stage process when `concurrent` stages run at once: max(1, cpus // concurrent);
    None when the caller already set OMP_NUM_THREADS (kept as it is) in `environ` (default: os.environ)."""
    if "OMP_NUM_THREADS" in (os.environ if environ is None else environ):
        return None
    return max(1, (cpus or os.cpu_count() or 1) // max(1, concurrent))


def stage_groups(ready: list[str]) -> list[list[str]]:
    """Ready stages grouped by `foreach` family (the name before '@'), largest group first, then by name: the
    order in which the flow starts them."""
    families: dict[str, list[str]] = {}
    for stage in sorted(ready):
        families.setdefault(stage.split("@")[0], []).append(stage)
    return sorted(families.values(), key=lambda group: (-len(group), group[0]))


def _nanny_environ() -> set[str]:
    """Names a Dask nanny wrote into this worker process's environment for its own numpy tasks
    (distributed.nanny.pre-spawn-environ: MALLOC_TRIM_THRESHOLD_=65536, OMP/MKL/OPENBLAS_NUM_THREADS=1, and
    PYTHONHASHSEED); empty outside a nanny's worker. A stage process must not inherit them: the thread counts
    are the flow's to set, and a set MALLOC_TRIM_THRESHOLD_ turns off glibc's dynamic mmap threshold (a torch
    loop allocating 1.5 MB tensors ran 20-30% slower with it here)."""
    if "distributed" not in sys.modules:  # never imported: not a Dask worker (and no import on the thread pool)
        return set()
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        return set()
    if not getattr(worker, "nanny", None):
        return set()
    import dask

    return set(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}) | {"PYTHONHASHSEED"}


def _thread_env(threads: int | None) -> dict[str, str]:
    dropped = _nanny_environ()
    env = {name: value for name, value in os.environ.items() if name not in dropped}
    if threads is not None:
        env.update({var: str(threads) for var in THREAD_VARS})
    return env


def _dvc_command(args: list[str], wait_for_lock: bool) -> list[str]:
    return [sys.executable, "-m", "dvc", *(["--wait-for-lock"] if wait_for_lock else []), *args]


def reproduce_stage(stage: str, project: Path, threads: int | None = None, log=None,
                    wait_for_lock: bool = False) -> str | None:
    """`dvc repro --single-item <stage>` in `project` with `threads` BLAS/OpenMP threads (None: inherited).

    Returns None when the command ran, or DVC's line saying why it did not (unchanged, or restored from the
    run-cache). Every output line goes to `log(line)`. Raises PipelineError naming the stage on failure.
    `wait_for_lock`: wait for DVC's repo lock (`dvc --wait-for-lock`) instead of failing after DVC's 3 s of
    retries; the flow sets it when pushes (which hold that lock while they upload) or many workers compete for it.
    """
    proc = subprocess.Popen(_dvc_command(["repro", "--single-item", stage], wait_for_lock), cwd=project,
                            env=_thread_env(threads), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    tail: list[str] = []
    skipped = None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            if log:
                log(line)
            tail = (tail + [line])[-5:]
            skipped = skipped or (line if any(marker in line for marker in NOT_RUN) else None)
    if proc.wait() != 0:
        last = next((t for t in reversed(tail) if "error" in t.lower()), tail[-1] if tail else "no output")
        raise PipelineError(f"stage {stage} failed: {last}")
    return skipped


def push_outputs(project: Path, remote: str, stage: str | None = None, log=None) -> str:
    """`dvc push -r <remote> [<stage>]`: the stage's cached outputs (every output of the project when `stage` is
    None) to the DVC remote. Waits for DVC's repo lock (a push beside running stages must not fail on it).
    Returns DVC's last line ("1 file pushed", "Everything is up to date."); every line goes to `log(line)`.
    Raises PipelineError naming the stage and the remote on failure."""
    proc = subprocess.run(_dvc_command(["push", "-r", remote, *([stage] if stage else [])], True), cwd=project,
                          capture_output=True, text=True)
    lines = [line.rstrip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    for line in lines:
        if log:
            log(line)
    if proc.returncode != 0:
        last = next((t for t in reversed(lines) if "error" in t.lower()), lines[-1] if lines else "no output")
        what = f"stage {stage}: dvc push" if stage else "dvc push"
        raise PipelineError(f"{what} to remote {remote!r} failed: {last}")
    return lines[-1] if lines else ""


def push_remote(project: Path, remote: str | None = None) -> str:
    """The DVC remote that `--push` uses: `remote` when the project's DVC config (all levels: system, global,
    .dvc/config, .dvc/config.local) defines it, else the default remote (`dvc remote add -d`). PipelineError in
    one line when there is none, before any stage runs."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        names = sorted(repo.config.get("remote", {}))
        name = remote or repo.config.get("core", {}).get("remote")
    if remote and remote not in names:
        raise PipelineError(f"--push: no DVC remote named {remote!r} in {project} "
                            f"(remotes: {', '.join(names) or 'none'}; add one with `dvc remote add NAME URL`)")
    if not name:
        raise PipelineError(f"--push: {project} has no default DVC remote: add one with "
                            "`dvc remote add -d NAME URL`, or pass --remote NAME")
    if name not in names:
        raise PipelineError(f"--push: the default DVC remote {name!r} of {project} is not defined "
                            f"(remotes: {', '.join(names) or 'none'})")
    return name


@task(name="dvc-stage", task_run_name="{stage}")
def run_stage(stage: str, project: str, recheck: bool = True, threads: int | None = None,
              push_to: str | None = None, wait_for_lock: bool = False):
    """Reproduce one DVC stage unless it is up to date (then the task run ends as `Cached`).

    `recheck=False` means the flow already knows the stage is up to date (the flow's initial `dvc status`
    found it clean and no upstream stage changed its outputs): DVC is not called at all. Otherwise
    `dvc repro --single-item` decides (`reproduce_stage`); when it does not run the command, the task run ends
    as `Cached`. `push_to`: a DVC remote that gets the stage's outputs once they were computed or restored from
    the run-cache (the flow pushes everything once more at the end). The result says which host and process
    ran the task (a Dask worker, or the flow's own process).
    """
    logger = get_run_logger()
    where = {"host": socket.gethostname(), "pid": os.getpid()}
    if not recheck:
        logger.info("%s is up to date", stage)
        return Completed(name="Cached", message=f"{stage}: up to date (dvc status)",
                         data={"stage": stage, "ran": False, **where})
    start = time.perf_counter()

    def log(line: str) -> None:
        logger.info("%s | %s", stage, line[-500:])

    skipped = reproduce_stage(stage, Path(project), threads, log, wait_for_lock=wait_for_lock or bool(push_to))
    restored = bool(skipped) and RESTORED in skipped  # outputs checked out from the run-cache: downstream rechecks
    if push_to and (not skipped or restored):
        push_outputs(Path(project), push_to, stage, log)
    if skipped:
        return Completed(name="Cached", message=skipped,
                         data={"stage": stage, "ran": False, "restored": restored, **where})
    return {"stage": stage, "ran": True, "seconds": round(time.perf_counter() - start, 1), **where}


DEFAULT_MAX_WORKERS = 2  # stages at once on the thread pool when --max-workers is not given


@dataclass(frozen=True)
class Slot:
    """One place where a stage can run: a thread of the flow's own pool, or one thread of a Dask worker."""
    host: str
    cpus: int | None = None  # cores of that host; None: this machine's (os.cpu_count(), as stage_threads does)
    worker: str | None = None  # the Dask worker's address; None for the thread pool


def place(ready: list[str], slots: list[Slot], busy: dict[int, str], limit: int,
          environ=None) -> list[tuple[str, int, int | None]]:
    """Which of the `ready` stages start now, in that order: [(stage, slot index, BLAS/OpenMP threads)].

    `busy` maps the slots in use to their stages. At most `limit` stages run at once, each on a free slot; a
    stage goes to the free slot where it gets the most cores (its host's cores // stages on that host, itself
    included), so stages spread over hosts. Each gets `stage_threads(stages on its host once these have
    started, that host's cores, `environ`)`. With one host of interchangeable slots (the thread pool) that is
    cpu_count // min(limit, running + ready), the split the flow has always made.
    """
    load: dict[str, int] = {}
    for index in busy:
        load[slots[index].host] = load.get(slots[index].host, 0) + 1

    def share(i: int) -> float:
        return (slots[i].cpus or os.cpu_count() or 1) / (load.get(slots[i].host, 0) + 1)

    free = [i for i in range(len(slots)) if i not in busy]
    starts = []
    for stage in ready:
        if not free or len(busy) + len(starts) >= limit:
            break
        index = min(free, key=lambda i: (-share(i), slots[i].host, i))
        free.remove(index)
        load[slots[index].host] = load.get(slots[index].host, 0) + 1
        starts.append((stage, index))
    return [(stage, i, stage_threads(load[slots[i].host], slots[i].cpus, environ)) for stage, i in starts]


def probe_worker(project: str, token_name: str, token: str) -> dict:
    """Runs on each Dask worker (client.run): does it see `project` at this same absolute path, holding the token
    file the flow wrote just before? Also reports the worker's host name and cores (threads are split per host)."""
    try:
        sees = (Path(project) / token_name).read_text() == token
    except OSError:
        sees = False
    return {"sees_project": sees, "host": socket.gethostname(), "cpus": os.cpu_count() or 1, "pid": os.getpid()}


def check_shared_filesystem(client, project: Path) -> dict[str, dict]:
    """Before any stage runs: every worker of `client` (a dask.distributed Client) must see `project` at the same
    absolute path, since it runs `dvc repro` there. Writes artifacts/.dask-probe-<uuid> (a fresh name: no NFS
    client can answer from a cached "no such file"), runs `probe_worker` on every worker, deletes the token.
    Returns {worker address: probe_worker's answer}; PipelineError in one line naming a worker that cannot
    see the project, cannot run the probe, or when the scheduler has no workers."""
    token = uuid.uuid4().hex
    path = project / "artifacts" / f".dask-probe-{token}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token)
    try:
        seen = client.run(probe_worker, str(project), str(path.relative_to(project)), token, on_error="return")
    finally:
        path.unlink(missing_ok=True)
    if not seen:
        raise PipelineError(f"the dask scheduler at {client.scheduler.address} has no workers")
    failed = sorted((addr, answer) for addr, answer in seen.items() if isinstance(answer, BaseException))
    if failed:
        addr, error = failed[0]
        raise PipelineError(f"dask worker {addr} cannot run the flow's code ({type(error).__name__}: {error}); "
                            "the workers need this project's Python environment")
    blind = sorted(addr for addr, answer in seen.items() if not answer["sees_project"])
    if blind:
        more = f" (and {len(blind) - 1} more)" if len(blind) > 1 else ""
        raise PipelineError(f"dask worker {blind[0]}{more} cannot see the project at {project} "
                            "(the workers need a shared filesystem at the same path)")
    return seen


def _prefect_api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def check_prefect_api(probes: dict[str, dict], api_url: str | None) -> None:
    """Task runs on Dask workers report to the Prefect API themselves: workers on other hosts than this one cannot
    reach an API on this machine's loopback (the temporary server of `twinmerge run` listens on 127.0.0.1).
    PipelineError in one line, before any stage, when that is the case (`api_url` None: the temporary server)."""
    from urllib.parse import urlparse

    others = sorted({answer["host"] for answer in probes.values()} - {socket.gethostname()})
    host = (urlparse(api_url).hostname or "") if api_url else "127.0.0.1"
    if others and (host in ("localhost", "::1") or host.startswith("127.")):
        raise PipelineError(f"dask workers on {', '.join(others)} cannot reach the Prefect API at "
                            f"{api_url or 'a temporary server on 127.0.0.1'}: start `prefect server start --host "
                            "0.0.0.0` on a host they reach and set PREFECT_API_URL to it")


def dask_slots(nthreads: dict[str, int], probes: dict[str, dict]) -> list[Slot]:
    """One Slot per thread of every probed worker, with the host name and cores that worker reported."""
    return [Slot(host=probes[addr]["host"], cpus=probes[addr]["cpus"], worker=addr)
            for addr in sorted(set(nthreads) & set(probes)) for _ in range(nthreads[addr])]


def connect_dask(address: str, timeout: float = 30):
    """A dask.distributed Client of the scheduler at `address` (not made the default client); PipelineError in one
    line when it cannot be reached within `timeout` seconds."""
    from distributed import Client

    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, ValueError, TypeError) as e:
        raise PipelineError(f"cannot reach the dask scheduler at {address}: {e}") from None


def _caller_threads(environ) -> int | None:
    """OMP_NUM_THREADS as the caller set it (stage_threads keeps it): Dask workers replace their own environment's
    with 1 (distributed.nanny.pre-spawn-environ), so on Dask the flow hands the caller's value to every stage."""
    value = environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


@contextlib.contextmanager
def _environ_kept():
    """Undo what this block writes into os.environ: a LocalCluster's nannies run in this process and set their
    workers' OMP_NUM_THREADS=1, PYTHONHASHSEED... (distributed.nanny.pre-spawn-environ) in it for good."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


@contextlib.contextmanager
def _stage_runner(project: Path, max_workers: int | None, dask_address: str | None, dask_workers: int | None):
    """Yields (Prefect task runner, slots, most stages at once). Without Dask options: a ThreadPoolTaskRunner of
    `max_workers` (default 2) threads on this machine. With them: a DaskTaskRunner on the scheduler at
    `dask_address`, or on a LocalCluster of `dask_workers` processes of one thread each (closed on exit); its
    workers are probed first (check_shared_filesystem) and there is a slot per worker thread; at most
    `max_workers` (default: all slots) stages run at once."""
    if not (dask_address or dask_workers):
        limit = max_workers or DEFAULT_MAX_WORKERS
        with ThreadPoolTaskRunner(max_workers=limit) as runner:
            yield runner, [Slot(host=socket.gethostname())] * limit, limit
        return
    from prefect_dask import DaskTaskRunner

    if dask_address:
        connect_dask(dask_address).close()  # one line when unreachable (DaskTaskRunner would raise a traceback)
        runner = DaskTaskRunner(address=dask_address)
    else:
        runner = DaskTaskRunner(cluster_class="distributed.LocalCluster",
                                cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1, "processes": True,
                                                "dashboard_address": ":0"})  # any free port, not 8787
    with runner:
        with _environ_kept():
            client = runner.client  # starts the LocalCluster, if any
            if dask_workers:
                client.wait_for_workers(dask_workers, timeout=300)
        probes = check_shared_filesystem(client, project)
        check_prefect_api(probes, _prefect_api_url())
        slots = dask_slots(client.nthreads(), probes)
        limit = min(max_workers or len(slots), len(slots))
        if max_workers and max_workers > len(slots):
            get_run_logger().warning("--max-workers %d: the dask cluster has %d worker threads; %d stages at most "
                                     "run at once", max_workers, len(slots), len(slots))
        yield runner, slots, limit


def _pinned(worker: str | None):
    """Tasks submitted in this block go to `worker` (a Dask annotation; another worker only if it is gone)."""
    if worker is None:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(workers=[worker], allow_other_workers=True)


def _wait(futures: list, first: bool) -> None:
    """Block until the first (or every) of these Prefect futures is done: thread-pool or Dask futures alike."""
    wrapped = [f.wrapped_future for f in futures]
    if not wrapped:
        return
    if all(isinstance(w, concurrent.futures.Future) for w in wrapped):
        concurrent.futures.wait(wrapped, return_when=concurrent.futures.FIRST_COMPLETED if first
                                else concurrent.futures.ALL_COMPLETED)
    else:
        import distributed

        with wrapped[0].client.as_current():  # distributed.wait asks for the current client; ours is not the default
            distributed.wait(wrapped, return_when="FIRST_COMPLETED" if first else "ALL_COMPLETED")


def _publish_report(project: Path) -> None:
    report = project / "artifacts" / "report" / "report.md"
    if report.is_file():
        create_markdown_artifact(key="twin-merging-report", markdown=report.read_text(),
                                 description="Twin-Merging comparison table")
    metrics = project / "artifacts" / "eval" / "metrics.json"
    if metrics.is_file():
        methods = json.loads(metrics.read_text()).get("methods", {})
        rows = [{"method": name, "mean_normalized": m.get("mean_normalized"), "mean_score": m.get("mean_score")}
                for name, m in methods.items()]
        create_table_artifact(key="twin-merging-scores", table=rows, description="Mean normalised score per method")


@flow(name="twin-merging-pipeline", log_prints=True)
def pipeline(project: str = ".", max_workers: int | None = None, dask_address: str | None = None,
             dask_workers: int | None = None, push: bool = False, remote: str | None = None) -> dict:
    """Run every stage of the project's `dvc.yaml`, in dependency order, parallel where the graph allows.

    Holds the project's pipeline lock (flows.lock) throughout; first deletes the temporaries that killed steps
    left under artifacts/ (a stage restored from DVC's run-cache never writes, so never sweeps, its targets).
    Stages run on a thread pool of `max_workers` (default 2), or with `dask_address` (a running
    dask.distributed scheduler) / `dask_workers` (a LocalCluster of that many one-thread worker processes,
    started and closed here) on Dask workers, at most `max_workers` (default: every worker thread) at once.
    `push`: each stage's outputs go to the DVC remote `remote` (default: the project's default remote) once
    computed, and everything once more at the end.
    Returns {"ran": [...], "cached": [...], "seconds": float} (and "pushed": the remote, with `push`).
    """
    from twinmerge.io import sweep_stale_temps_under  # torch: not at import (the CLI parses arguments first)

    if dask_address and dask_workers:
        raise PipelineError("give a dask scheduler address or a number of local dask workers, not both")
    for name, value in (("max_workers", max_workers), ("dask_workers", dask_workers)):
        if value is not None and value < 1:
            raise PipelineError(f"{name} must be at least 1, got {value}")
    project_path = Path(project).resolve()
    with pipeline_lock(project_path):
        push_to = push_remote(project_path, remote) if push else None
        for temporary in sweep_stale_temps_under(project_path / "artifacts"):
            get_run_logger().info("deleted %s, left by a killed step", temporary)
        return _run_stages(project_path, max_workers, dask_address, dask_workers, push_to)


def _run_stages(project_path: Path, max_workers: int | None, dask_address: str | None = None,
                dask_workers: int | None = None, push_to: str | None = None) -> dict:
    logger = get_run_logger()
    deps = stage_graph(project_path)
    stale = set(stale_stages(project_path))
    done: set[str] = set()
    ran, cached = [], []
    changed: set[str] = set()  # stages whose outputs changed in this run: ran, or restored from the run-cache
    start = time.perf_counter()
    on_dask = bool(dask_address or dask_workers)
    environ = dict(os.environ)  # the caller's, before a LocalCluster's nannies write into it
    caller_threads = _caller_threads(environ) if on_dask else None
    with _stage_runner(project_path, max_workers, dask_address, dask_workers) as (runner, slots, limit):
        progress = create_progress_artifact(progress=0.0, key="twin-merging-progress",
                                            description="pipeline stages")
        running: dict[str, tuple] = {}  # stage -> (Prefect future, slot index)
        try:
            while len(done) < len(deps):
                ready = [s for group in stage_groups([s for s in deps if s not in done and s not in running
                                                      and deps[s] <= done]) for s in group]
                busy = {index: stage for stage, (_, index) in running.items()}
                for stage, index, threads in place(ready, slots, busy, limit, environ):
                    parameters = {"stage": stage, "project": str(project_path),
                                  "recheck": stage in stale or bool(deps[stage] & changed),
                                  "threads": caller_threads if threads is None else threads}
                    if on_dask or push_to:
                        parameters.update(push_to=push_to, wait_for_lock=True)
                    with _pinned(slots[index].worker):
                        running[stage] = (runner.submit(run_stage, parameters=parameters), index)
                if not running:
                    raise PipelineError(f"no stage can start; not done: {sorted(set(deps) - done)}")
                _wait([fut for fut, _ in running.values()], first=True)
                for s in [s for s, (fut, _) in running.items() if fut.wrapped_future.done()]:
                    fut, _ = running.pop(s)
                    fut.wait()
                    result = fut.result(raise_on_failure=True)
                    was_cached = fut.state.name == "Cached"
                    (cached if was_cached else ran).append(s)
                    if not was_cached or result.get("restored"):
                        changed.add(s)
                    done.add(s)
                    update_progress_artifact(progress, progress=100.0 * len(done) / len(deps),
                                             description=f"{len(done)}/{len(deps)} stages done")
        except Exception:
            # A stage's `dvc repro` is not interrupted: let the running ones end before the pipeline lock is
            # released (the thread pool's shutdown waits the same way), so no next run meets them half-way.
            _wait([fut for fut, _ in running.values()], first=False)
            raise
    leftover = stale_stages(project_path)
    if leftover:
        raise PipelineError(f"dvc status not clean after the flow: {leftover}")
    result = {"ran": ran, "cached": cached}
    if push_to:  # stages that were up to date or restored were not pushed one by one
        logger.info("dvc push -r %s: %s", push_to, push_outputs(project_path, push_to))
        result["pushed"] = push_to
    _publish_report(project_path)
    seconds = round(time.perf_counter() - start, 1)
    logger.info("pipeline done in %.1fs: %d stages ran, %d cached", seconds, len(ran), len(cached))
    return {**result, "seconds": seconds}


def _positive(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1 expected, got {text!r}")
    return value


def add_arguments(parser) -> None:
    parser.add_argument("--project", default=".", help="folder with dvc.yaml and params.yaml")
    parser.add_argument("--max-workers", type=_positive, default=None,
                        help="stages run at once where the graph allows (default 2; with Dask: every worker thread)")
    parser.add_argument("--params", help="validate this params file, then copy it over the project's params.yaml")
    dask = parser.add_mutually_exclusive_group()
    dask.add_argument("--dask-address", metavar="tcp://HOST:PORT",
                      help="run the stages on the workers of this running dask.distributed scheduler (they must "
                           "see the project at the same path: a shared filesystem)")
    dask.add_argument("--dask-workers", type=_positive, metavar="N",
                      help="run the stages on a local Dask cluster of N worker processes (one thread each)")
    parser.add_argument("--push", action="store_true",
                        help="push each stage's outputs to the DVC remote once computed, and everything at the end")
    parser.add_argument("--remote", metavar="NAME", help="the DVC remote for --push (default: the default remote)")


def _preflight(project: Path, args) -> None:
    """What can fail before the Prefect server starts fails here, in one line: the --push remote, and a Dask
    scheduler that cannot be reached, whose workers cannot see the project, or whose workers on other hosts
    could not reach the temporary Prefect server (the flow checks the cluster again)."""
    if getattr(args, "push", False):
        push_remote(project, args.remote)
    if getattr(args, "dask_address", None):
        with connect_dask(args.dask_address) as client:
            check_prefect_api(check_shared_filesystem(client, project.resolve()), _prefect_api_url())


def main(args) -> int:
    """`twinmerge run`: params validated first (one line, before any stage runs), then under the pipeline lock
    [install --params, then] run the flow on a temporary Prefect server that dies with this process (unless
    PREFECT_API_URL names one). Exit 1 with one line when another run holds the lock, when the --push remote
    or the Dask cluster is unusable (checked before the server starts), or when a stage or push fails."""
    from flows.server import temporary_server
    from tasks.params import load_params
    from twinmerge.io import write_text_atomic

    project = Path(args.project)
    if getattr(args, "remote", None) and not getattr(args, "push", False):
        print("twinmerge run: error: --remote NAME needs --push", file=sys.stderr)
        return 2
    load_params(args.params or project / "params.yaml")  # a bad params file: one line naming it, nothing runs
    text = None
    if args.params:
        text = Path(args.params).read_text()
    options = {name: value for name in ("dask_address", "dask_workers", "push", "remote")
               if (value := getattr(args, name, None))}  # only those given (the flow's defaults otherwise)
    try:
        with pipeline_lock(project):
            _preflight(project, args)
            dst = project / "params.yaml"
            if text is not None and text != (dst.read_text() if dst.exists() else None):
                logging.getLogger(__name__).warning("using %s as %s", args.params, dst)
                write_text_atomic(text, dst)
            with temporary_server():
                result = pipeline(project=str(project), max_workers=args.max_workers, **options)
    except (LockHeld, PipelineError) as e:
        print(f"twinmerge run: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0
