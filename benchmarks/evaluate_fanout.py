"""Does evaluation gain from fanning its (method, task) cells out to a cluster? Measured (not a test).

Today every method is one DVC stage (static@<key>, routed@<key>): it opens the pool, builds the method on the
validation splits (grid choice, learning) and scores it on every task's test split. A per-(method, task)
fan-out would keep the build as one job per method (a grid choice or a learned coefficient needs every task's
validation score) and split the test scoring into one job per task, each of which opens the pool again and
loads the built method (backbone, or routed model and router).

This script runs each method's real stage code (`tasks.method.run_method`, on the default's artifacts, into a
scratch folder: the DVC outputs are not touched) and times its parts:
  setup   opening the pool, tokenizer and the splits (start of run_method to the build);
  build   `method.build` (validation only);
  load    loading the built method for scoring (`backbone`, `model`);
  score   test scoring, per task: a static backbone's forward passes per task are timed as they run; a routed
          method scores the concatenation of all tasks (all modes), shared out by input count; the rest of the
          scoring (a classifier assembled per task, the router's features) is shared out by input count too;
  cell    what one test cell would pay before scoring: a fresh pool, tokenizer and one task's test split (timed);
  job     what every job pays, stage or cell: a fresh Python process importing the stage code (timed, median of
          3) plus --stage-overhead seconds (DVC's and Prefect's own work per stage: take it from a flow run, e.g.
          `evaluate`'s time, whose own work is under a second).
It then schedules the method stages both ways on W identical workers (longest job first, a cell after its
method's build) and prints the makespans, so the gain (or loss) of the fan-out is read for each W:

    python benchmarks/evaluate_fanout.py [--methods twin,ties] [--threads 2] [--workers 2,4,8,16,32,64]
                                         [--stage-overhead 12]

Needs the default pipeline's artifacts (`dvc pull` or `twinmerge run`). Threads: as given, in this process.
"""
import argparse
import heapq
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LINKED = ("base", "checkpoints", "taskdata", "shared", "exclusive", "router", "twin")


@contextmanager
def patched(obj, name, wrapper):
    orig = getattr(obj, name)
    setattr(obj, name, wrapper(orig))
    try:
        yield
    finally:
        setattr(obj, name, orig)


def scratch_artifacts(src: Path) -> Path:
    """A folder whose inputs link to the default's artifacts and whose method outputs are its own."""
    tmp = Path(tempfile.mkdtemp(prefix="twinmerge-fanout-"))
    for name in LINKED:
        if (src / name).exists():
            (tmp / name).symlink_to((src / name).resolve())
    (tmp / "eval").mkdir()
    shutil.copy(src / "eval" / "experts.json", tmp / "eval" / "experts.json")
    return tmp


def time_method(params, kind: str, key: str, artifacts: Path) -> dict:
    """Run method `key`'s stage code once with timers: {total, setup, build, load, score: {task: s}, rest}."""
    import tasks.method as step
    import twinmerge.taskpool as tp
    from twinmerge.methods import METHODS

    method = METHODS[getattr(params.methods, kind)[key].method]
    marks, score, load = {}, {}, [0.0]
    sizes = {n: len(texts) for n, (texts, _) in step.load_registry_split(params, "test").items()}
    total_inputs = sum(sizes.values())

    def timed_build(orig):
        def build(*a, **kw):
            marks["build_start"] = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                marks["build_end"] = time.perf_counter()
        return build

    def timed_load(orig):
        def fn(*a, **kw):
            t = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                if "build_end" in marks:
                    load[0] += time.perf_counter() - t
        return fn

    def timed_predict(orig):  # static scoring: one call per task, desc "<row>/<task>"
        def fn(model, tokenizer, texts, *a, desc=None, **kw):
            t = time.perf_counter()
            try:
                return orig(model, tokenizer, texts, *a, desc=desc, **kw)
            finally:
                if "build_end" in marks:
                    task = (desc or "").rpartition("/")[2]
                    score[task] = score.get(task, 0.0) + time.perf_counter() - t
        return fn

    def timed_batches(orig):  # routed scoring: all tasks' inputs at once, shared out by input count
        def fn(run, tokenizer, texts, *a, **kw):
            t = time.perf_counter()
            try:
                return orig(run, tokenizer, texts, *a, **kw)
            finally:
                if "build_end" in marks:
                    for task, k in sizes.items():
                        score[task] = score.get(task, 0.0) + (time.perf_counter() - t) * k / total_inputs
        return fn

    loaders = [name for name in ("backbone", "model") if hasattr(method, name)]
    start = time.perf_counter()
    with patched(method, "build", timed_build), patched(tp, "predict_logits", timed_predict), \
            patched(tp, "map_batches", timed_batches):
        for name in loaders:
            setattr(method, name, timed_load(getattr(method, name)))
        try:
            step.run_method(params, kind, key, artifacts, progress=False)
        finally:
            for name in loaders:
                delattr(method, name)  # the instance attribute: the class's method again
    total = time.perf_counter() - start
    timed = sum(score.values())
    scoring = total - (marks["build_end"] - start)
    return {"total": total, "setup": marks["build_start"] - start, "build": marks["build_end"] - marks["build_start"],
            "load": load[0], "score": score, "rest": scoring - load[0] - timed, "inputs": sizes}


def cell_setup(params, artifacts: Path) -> float:
    """Seconds a test cell pays before scoring: a fresh pool, tokenizer and one task's test split."""
    from transformers import AutoTokenizer

    from tasks.method import task_pool
    from tasks.modularize import open_pool

    t = time.perf_counter()
    pool = open_pool(params, artifacts / "base", artifacts / "checkpoints")
    task_pool(params, pool, "test", AutoTokenizer.from_pretrained(artifacts / "base"))
    return time.perf_counter() - t  # the whole test split: an upper bound for one task's


def import_seconds() -> float:
    """Median of 3: a fresh Python process importing the method stage's code (what every stage or cell pays)."""
    times = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import tasks.method"], cwd=ROOT, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def makespan(jobs: list[tuple[float, list[float]]], workers: int) -> float:
    """Greedy list schedule on `workers`: each job is (head, cells); the cells become ready when their head ends.
    Ready jobs start longest first on the earliest free worker. Returns the time the last job ends."""
    free = [0.0] * workers
    ready = [(-head, 0.0, i, "head") for i, (head, _) in enumerate(jobs)]
    heapq.heapify(ready)
    pending = []  # (ready_time, -duration, id, kind)
    end = 0.0
    while ready or pending:
        now = free[0]
        while pending and pending[0][0] <= now:
            t, neg, i, kind = heapq.heappop(pending)
            heapq.heappush(ready, (neg, t, i, kind))
        if not ready:
            now = pending[0][0]
            heapq.heapreplace(free, now)
            continue
        neg, t, i, kind = heapq.heappop(ready)
        start = max(heapq.heappop(free), t)
        finish = start - neg
        heapq.heappush(free, finish)
        end = max(end, finish)
        if kind == "head":
            for d in jobs[i][1]:
                heapq.heappush(pending, (finish, -d, i, "cell"))
    return end


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("--artifacts", default=str(ROOT / "artifacts"))
    p.add_argument("--methods", help="comma-separated method keys (default: every entry of params `methods`)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", default="1,2,4,8,16,32,64,128")
    p.add_argument("--stage-overhead", type=float, default=0.0,
                   help="seconds DVC and Prefect add to every job (stage or cell), from a flow run's log")
    p.add_argument("--json", help="also write the timings here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from tasks.params import METHOD_KINDS, load_params

    params = load_params(args.params)
    keys = [(kind, key) for kind in METHOD_KINDS for key in getattr(params.methods, kind)]
    if args.methods:
        wanted = args.methods.split(",")
        keys = [(kind, key) for kind, key in keys if key in wanted]
    artifacts = scratch_artifacts(Path(args.artifacts))
    try:
        job = import_seconds() + args.stage_overhead
        cell = cell_setup(params, artifacts)
        print(f"every job: {job:.1f} s (a fresh process importing tasks.method + {args.stage_overhead:.1f} s given); "
              f"a test cell's setup (pool, tokenizer, test split) = {cell:.1f} s; threads {args.threads}", flush=True)
        rows = {}
        for kind, key in keys:
            r = rows[key] = time_method(params, kind, key, artifacts)
            s = sum(r["score"].values())
            print(f"{kind}@{key:20s} total {r['total']:6.1f} s = setup {r['setup']:5.1f} + build {r['build']:6.1f} + "
                  f"load {r['load']:5.1f} + test scoring {s:6.1f} (+ {r['rest']:5.1f} other)", flush=True)
    finally:
        shutil.rmtree(artifacts, ignore_errors=True)
    stages = [(job + r["total"], []) for r in rows.values()]
    cells = [(job + r["setup"] + r["build"], [job + cell + r["load"] + sc + r["rest"] * r["inputs"][t] /
                                              sum(r["inputs"].values()) for t, sc in r["score"].items()])
             for r in rows.values()]
    n_cells = sum(len(c) for _, c in cells)
    print(f"{len(rows)} method stages, {n_cells} test cells; work {sum(t for t, _ in stages):.0f} s as stages, "
          f"{sum(h + sum(c) for h, c in cells):.0f} s as builds + cells")
    for w in [int(x) for x in args.workers.split(",")]:
        a, b = makespan(stages, w), makespan(cells, w)
        print(f"workers {w:4d}: makespan per method stage {a:7.0f} s, per (method, task) cell {b:7.0f} s, "
              f"fan-out / stages = {b / a:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "job": job, "cell_setup": cell,
                                               "methods": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
