"""Re-evaluate when experts arrive or change: the flow that `twinmerge serve` / prefect.yaml schedule.

`check_and_run(project)`:
1. takes the pipeline lock (flows.lock: `artifacts/.pipeline.lock`, the one `twinmerge run` takes); when another
   run holds it, logs "another pipeline run holds <path>: pid N on <host> (<command>) since <time>" and ends
   without work;
2. fingerprints every registered expert (tasks.registry: local folders by content, Hub experts by the latest
   commit of their tracked revision) and compares with `artifacts/registry_state.json`;
3. asks `dvc status` whether any stage is stale;
4. when nothing changed and DVC is clean: ends without running anything;
5. otherwise: for every Hub expert whose tracked revision moved to a new commit (latest commit != the commit
   in data/hub/<key>/source.json) forces `dvc repro -f -s hub_fetch@<key>` (params.yaml still says the same
   revision, so DVC alone cannot see the move); then runs the pipeline flow (flows.pipeline.pipeline) as a
   subflow, where DVC re-runs only what is stale (the new expert's download/compress and the whole-set stages);
6. records the fingerprints as the new state (only after a successful run: a failed run is retried next time).
The report stage appends the evaluation to history/evaluations.jsonl (tasks/history.py), so this flow does not.

No `from __future__ import annotations` here: deployment runs of flows with pydantic-validated parameters fail
with it (SPEC §5).
"""
import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

from prefect import flow, get_run_logger, task

from flows.lock import LockHeld, pipeline_lock
from flows.pipeline import PipelineError, pipeline, stale_stages

def force_hub_fetch(stage: str, project: str) -> None:
    """`dvc repro -f -s <stage>`: re-fetch a Hub expert whose tracked revision has a new commit."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "-f", "-s", stage], cwd=project,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PipelineError(f"forced {stage} failed: {tail[0]}")


force_hub_fetch_task = task(force_hub_fetch, name="dvc-force", task_run_name="force {stage}")


def detect_changes(project: Path, api=None) -> dict:
    """Fingerprints, per-expert status vs the recorded state, stale DVC stages, Hub stages to force."""
    from tasks.params import load_params
    from tasks.registry import compare, fetched_commit, fingerprints, load_state

    with contextlib.chdir(project):
        params = load_params("params.yaml")
        prints = fingerprints(params, api)
        status = compare(prints, load_state())
        force = []
        for name, e in prints.items():
            key = e.get("hub")
            if key and not e.get("offline") and e.get("hash"):
                fetched = fetched_commit(key)
                if fetched and f"commit:{fetched}" != e["hash"]:
                    force.append(f"hub_fetch@{key}")
    return {"prints": prints, "status": status, "changes": {n: s for n, s in status.items() if s != "unchanged"},
            "stale": stale_stages(project), "force": sorted(set(force))}


def check_and_run_impl(project: str = ".", max_workers: int = 2, api=None,
                       run_pipeline: Optional[Callable] = None, force_stage: Optional[Callable] = None,
                       logger=None) -> dict:
    """The body of the flow (plain function: tests inject the pipeline, the Hub API and the forced stage)."""
    from tasks.registry import save_state

    logger = logger or logging.getLogger(__name__)
    project_path = Path(project).resolve()
    run_pipeline = run_pipeline or pipeline
    force_stage = force_stage or force_hub_fetch
    try:
        with pipeline_lock(project_path):
            found = detect_changes(project_path, api)
            changes, stale, force = found["changes"], found["stale"], found["force"]
            if not (changes or stale or force):
                logger.info("no expert changed and dvc status is clean: nothing to run")
                return {"ran": False, "changes": {}, "stale": [], "forced": []}
            logger.info("changes %s; stale stages %s; Hub stages forced %s", changes, stale, force)
            for stage in force:
                force_stage(stage=stage, project=str(project_path))
            result = run_pipeline(project=str(project_path), max_workers=max_workers)
            with contextlib.chdir(project_path):
                save_state(found["prints"])
            return {"ran": True, "changes": changes, "stale": stale, "forced": force, "pipeline": result}
    except LockHeld as e:
        logger.warning("%s; this run ends without work", e)
        return {"ran": False, "skipped": str(e)}


@flow(name="twin-merging-watch", log_prints=True)
def check_and_run(project: str = ".", max_workers: int = 2) -> dict:
    """Run the pipeline (as a subflow) only when an expert was added, changed or removed, a tracked Hub revision
    moved, or `dvc status` is not clean; one run at a time (file lock)."""
    return check_and_run_impl(project, max_workers, run_pipeline=pipeline, force_stage=force_hub_fetch_task,
                              logger=get_run_logger())


if __name__ == "__main__":
    from flows.server import temporary_server

    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with temporary_server():
        print(json.dumps(check_and_run(project=sys.argv[1] if len(sys.argv) > 1 else ".")))
