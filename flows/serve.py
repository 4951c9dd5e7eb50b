"""Serve the watch deployment: `twinmerge serve [--cron "0 * * * *"]` or `python -m flows.serve`.

One deployment of `flows.watch.check_and_run` with
- a cron schedule (params.yaml `watch.cron`, default hourly, or --cron),
- a `DeploymentEventTrigger` on the event `expert.added` (emitted by `twinmerge expert add`), so a run starts
  as soon as an expert is registered,
- a deployment concurrency limit of 1 (ENQUEUE: a run triggered while another runs waits, then finds nothing
  or only the newest changes to do); the flow's file lock is the second guard (e.g. against prefect.yaml's
  work-pool deployment of the same project).
Needs a Prefect server (`prefect server start`; PREFECT_API_URL=http://127.0.0.1:4200/api). See docs/SCHEDULING.md.
"""
import os
import sys
from pathlib import Path

DEPLOYMENT = "twinmerge-watch"


def serve(project: str = ".", cron: str | None = None, name: str = DEPLOYMENT, max_workers: int = 2,
          timezone: str | None = None) -> None:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    from flows.watch import check_and_run
    from tasks.params import load_params

    project = str(Path(project).resolve())
    watch = load_params(Path(project) / "params.yaml").watch
    parameters = {"project": project, "max_workers": max_workers}
    trigger = DeploymentEventTrigger(name="expert-added", expect={"expert.added"},
                                     match={"prefect.resource.id": "twinmerge.expert.*"}, parameters=parameters)
    check_and_run.serve(
        name=name,
        schedules=[Cron(cron or watch.cron, timezone=timezone or watch.timezone)],
        triggers=[trigger],
        parameters=parameters,
        global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        description="Re-run the Twin-Merging pipeline when experts are added or change (cron + expert.added).",
        tags=["twinmerge"],
    )


def add_arguments(parser) -> None:
    parser.add_argument("--project", default=".")
    parser.add_argument("--cron", help="cron schedule (default: params.yaml watch.cron, hourly)")
    parser.add_argument("--timezone", help="cron time zone (default: params.yaml watch.timezone, UTC)")
    parser.add_argument("--name", default=DEPLOYMENT)
    parser.add_argument("--max-workers", type=int, default=2)


def main(args) -> None:
    serve(args.project, args.cron, args.name, args.max_workers, args.timezone)


if __name__ == "__main__":
    import argparse

    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
