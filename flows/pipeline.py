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
"""
import json
import logging
import os
import subprocess
import sys
import time
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


def stage_threads(concurrent: int, cpus: int | None = None) -> int | None:
    """BLAS/OpenMP threads per stage process when `concurrent` stages run at once: max(1, cpus // concurrent);
    None when the caller already set OMP_NUM_THREADS (kept as it is)."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (cpus or os.cpu_count() or 1) // max(1, concurrent))


def stage_groups(ready: list[str]) -> list[list[str]]:
    """Ready stages grouped by `foreach` family (the name before '@'), largest group first, then by name: the
    order in which the flow starts them."""
    families: dict[str, list[str]] = {}
    for stage in sorted(ready):
        families.setdefault(stage.split("@")[0], []).append(stage)
    return sorted(families.values(), key=lambda group: (-len(group), group[0]))


def _thread_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads is not None:
        env.update({var: str(threads) for var in THREAD_VARS})
    return env


def reproduce_stage(stage: str, project: Path, threads: int | None = None, log=None) -> str | None:
    """`dvc repro --single-item <stage>` in `project` with `threads` BLAS/OpenMP threads (None: inherited).

    Returns None when the command ran, or DVC's line saying why it did not (unchanged, or restored from the
    run-cache). Every output line goes to `log(line)`. Raises PipelineError naming the stage on failure.
    """
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=project,
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


@task(name="dvc-stage", task_run_name="{stage}")
def run_stage(stage: str, project: str, recheck: bool = True, threads: int | None = None):
    """Reproduce one DVC stage unless it is up to date (then the task run ends as `Cached`).

    `recheck=False` means the flow already knows the stage is up to date (the flow's initial `dvc status`
    found it clean and no upstream stage changed its outputs): DVC is not called at all. Otherwise
    `dvc repro --single-item` decides (`reproduce_stage`); when it does not run the command, the task run ends
    as `Cached`.
    """
    logger = get_run_logger()
    if not recheck:
        logger.info("%s is up to date", stage)
        return Completed(name="Cached", message=f"{stage}: up to date (dvc status)", data={"stage": stage, "ran": False})
    start = time.perf_counter()
    skipped = reproduce_stage(stage, Path(project), threads, lambda line: logger.info("%s | %s", stage, line[-500:]))
    if skipped:
        restored = RESTORED in skipped  # outputs checked out from the run-cache: downstream must be rechecked
        return Completed(name="Cached", message=skipped, data={"stage": stage, "ran": False, "restored": restored})
    return {"stage": stage, "ran": True, "seconds": round(time.perf_counter() - start, 1)}


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
def pipeline(project: str = ".", max_workers: int = 2) -> dict:
    """Run every stage of the project's `dvc.yaml`, in dependency order, parallel where the graph allows.

    Holds the project's pipeline lock (flows.lock) throughout; first deletes the temporaries that killed steps
    left under artifacts/ (a stage restored from DVC's run-cache never writes, so never sweeps, its targets).
    Returns {"ran": [...], "cached": [...], "seconds": float}.
    """
    from twinmerge.io import sweep_stale_temps_under  # torch: not at import (the CLI parses arguments first)

    project_path = Path(project).resolve()
    with pipeline_lock(project_path):
        for temporary in sweep_stale_temps_under(project_path / "artifacts"):
            get_run_logger().info("deleted %s, left by a killed step", temporary)
        return _run_stages(project_path, max_workers)


def _run_stages(project_path: Path, max_workers: int) -> dict:
    logger = get_run_logger()
    deps = stage_graph(project_path)
    stale = set(stale_stages(project_path))
    done: set[str] = set()
    ran, cached = [], []
    changed: set[str] = set()  # stages whose outputs changed in this run: ran, or restored from the run-cache
    start = time.perf_counter()
    progress = create_progress_artifact(progress=0.0, key="twin-merging-progress", description="pipeline stages")
    running: dict[str, object] = {}  # stage -> Prefect future
    with ThreadPoolTaskRunner(max_workers=max_workers) as runner:
        while len(done) < len(deps):
            ready = [s for group in stage_groups([s for s in deps if s not in done and s not in running
                                                  and deps[s] <= done]) for s in group]
            while ready and len(running) < max_workers:
                stage = ready.pop(0)
                threads = stage_threads(min(max_workers, len(running) + 1 + len(ready)))
                running[stage] = runner.submit(run_stage, parameters={
                    "stage": stage, "project": str(project_path),
                    "recheck": stage in stale or bool(deps[stage] & changed), "threads": threads})
            finished = [s for s, fut in running.items() if fut.wrapped_future.done()]
            if not finished:
                time.sleep(0.2)
                continue
            for s in finished:
                fut = running.pop(s)
                fut.wait()
                result = fut.result(raise_on_failure=True)
                was_cached = fut.state.name == "Cached"
                (cached if was_cached else ran).append(s)
                if not was_cached or result.get("restored"):
                    changed.add(s)
                done.add(s)
                update_progress_artifact(progress, progress=100.0 * len(done) / len(deps),
                                         description=f"{len(done)}/{len(deps)} stages done")
    leftover = stale_stages(project_path)
    if leftover:
        raise PipelineError(f"dvc status not clean after the flow: {leftover}")
    _publish_report(project_path)
    seconds = round(time.perf_counter() - start, 1)
    logger.info("pipeline done in %.1fs: %d stages ran, %d cached", seconds, len(ran), len(cached))
    return {"ran": ran, "cached": cached, "seconds": seconds}


def add_arguments(parser) -> None:
    parser.add_argument("--project", default=".", help="folder with dvc.yaml and params.yaml")
    parser.add_argument("--max-workers", type=int, default=2, help="stages run at once where the graph allows")
    parser.add_argument("--params", help="validate this params file, then copy it over the project's params.yaml")


def main(args) -> int:
    """`twinmerge run`: params validated first (one line, before any stage runs), then under the pipeline lock
    [install --params, then] run the flow on a temporary Prefect server that dies with this process (unless
    PREFECT_API_URL names one). Exit 1 with one line when another run holds the lock."""
    from flows.server import temporary_server
    from tasks.params import load_params
    from twinmerge.io import write_text_atomic

    project = Path(args.project)
    load_params(args.params or project / "params.yaml")  # a bad params file: one line naming it, nothing runs
    text = None
    if args.params:
        text = Path(args.params).read_text()
    try:
        with pipeline_lock(project):
            dst = project / "params.yaml"
            if text is not None and text != (dst.read_text() if dst.exists() else None):
                logging.getLogger(__name__).warning("using %s as %s", args.params, dst)
                write_text_atomic(text, dst)
            with temporary_server():
                result = pipeline(project=str(project), max_workers=args.max_workers)
    except LockHeld as e:
        print(f"twinmerge run: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0
