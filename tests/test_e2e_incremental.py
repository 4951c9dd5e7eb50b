"""End to end, on tiny models: an evaluated pipeline, then a new expert for an extra task arrives.

A temporary DVC project (git + dvc init, the repo's dvc.yaml, tasks/ and twinmerge/ as stage deps) with tiny
random BERT experts (the new one a PEFT LoRA adapter) and synthetic task tables (as in
tests/test_pipeline_steps.py). The data stages of the embedded default have nothing to do here: `data.tasks: []`
empties the train_expert foreach, and the outputs of `fetch` (data/raw) and `prepare` (data/tasks) are written by
the test and recorded with `dvc commit`, so DVC sees them as up to date. Everything else runs for real: flows.watch.check_and_run (Prefect, temporary
server) -> flows.pipeline.pipeline subflow -> `dvc repro --single-item <stage>` -> `twinmerge <step>`.
"""
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_lora import _make_peft_expert
from test_pipeline_steps import _task_tables, _write_tokenizer
from tasks.params import Params
from tiny_models import make_base, make_experts

REPO = Path(__file__).resolve().parents[1]
NUM_LABELS = {"alpha": 2, "beta": 3, "gamma": 4}


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    for folder in ("tasks", "twinmerge"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    base = make_base(root / "models", "bert", bare_backbone=True)
    _write_tokenizer(base)
    make_experts(root / "models", base, [NUM_LABELS["alpha"], NUM_LABELS["beta"]], names=["alpha", "beta"])
    # gamma, the expert that arrives later, is a PEFT LoRA adapter folder (no full weights): the pipeline takes
    # it beside the full fine-tunes (twinmerge.lora)
    _make_peft_expert(base, NUM_LABELS["gamma"], dict(r=4, lora_alpha=8, target_modules=["query", "value"]), 7,
                      root / "models" / "gamma", root / "models" / "gamma-merged-by-peft")
    assert (root / "models/gamma/adapter_config.json").is_file()
    assert not (root / "models/gamma/model.safetensors").exists()
    rng = random.Random(0)
    tables = {}
    for i, name in enumerate(NUM_LABELS):  # t0, t1 are prepare's output; gamma's table lives outside it
        tables[name] = _task_tables(root, i, NUM_LABELS[name], rng)
    (root / "data" / "extra").mkdir(parents=True)
    shutil.move(tables["gamma"], root / "data" / "extra" / "t2")
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "README").write_text("the embedded default's sources are not used here\n")
    (root / "history").mkdir()
    (root / "history" / "evaluations.jsonl").write_text("")
    params = {"seed": 0, "base": {"path": "models/base"},
              "data": {"raw_dir": "data/raw", "tasks_dir": "data/tasks", "tasks": []},
              "hub_sources": {},
              "experts": {n: {"path": f"models/{n}", "task": n, "data": f"data/tasks/t{i}"}
                          for i, n in enumerate(["alpha", "beta"])},
              "merge": {"method": "task_arithmetic", "options": {"scaling": 0.4}, "incremental": True},
              "compress": {"rank": {"mode": "fraction", "value": 0.25}, "dtype": "float32"},
              "router": {"epochs": 30, "patience": 10, "batch_size": 16, "max_length": 16, "dropout": 0.1},
              "evaluate": {"batch_size": 16, "max_length": 16, "regression_threshold": 2.0},
              "methods": {"static": {"weight_average": {}}, "routed": {"twin": {}}}}
    full = Params.model_validate(params).model_dump(mode="json")  # DVC needs every key a stage names
    full["data"].update(pypi={}, debian={})
    (root / "params.yaml").write_text("# tiny e2e project\n" + yaml.safe_dump(full, sort_keys=False))
    (root / ".gitignore").write_text("/models/\n/artifacts/registry_state.json\n/artifacts/.pipeline.lock\n")
    _run(["git", "init", "-q"], root)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root)
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], root)
    _run([sys.executable, "-m", "dvc", "commit", "-f", "fetch", "prepare"], root)
    _run(["git", "add", "."], root)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny project"], root)
    return root


def _shared_and_factor_bytes(project: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in [project / "artifacts/shared/model.safetensors",
                                             *sorted((project / "artifacts/exclusive").glob("*.safetensors"))]}


@pytest.mark.e2e
def test_new_expert_runs_only_its_stages_and_the_whole_set_ones(project, harness, monkeypatch):
    from flows.watch import check_and_run
    from tasks import registry
    from tasks.history import read_history
    from tasks.params import load_params

    monkeypatch.chdir(project)
    first = check_and_run(project=str(project))
    assert first["ran"] and {"download@alpha", "compress@beta", "evaluate", "report"} <= set(first["pipeline"]["ran"])
    assert {"fetch", "prepare"} <= set(first["pipeline"]["cached"])
    assert len(read_history(project / "history/evaluations.jsonl")) == 1
    before = _shared_and_factor_bytes(project)

    # incremental mode (merge.incremental): the shared expert stays frozen, only the new expert is compressed
    registry.add_expert("gamma", "gamma", "data/extra/t2", path="models/gamma")
    assert load_params("params.yaml").shared_experts == ["alpha", "beta"]
    second = check_and_run(project=str(project))
    assert second["changes"] == {"gamma": "new"}
    ran, cached = set(second["pipeline"]["ran"]), set(second["pipeline"]["cached"])
    assert {"download@gamma", "compress@gamma"} <= ran  # the new expert: downloaded and compressed
    assert {"router", "evaluate", "report", "bundle"} <= ran  # what depends on the whole set: the router is refit
    assert {"download_base", "download@alpha", "download@beta", "fetch", "prepare"} <= cached  # not recomputed
    assert {"compress@alpha", "compress@beta"} <= cached  # against the same shared expert
    after = _shared_and_factor_bytes(project)
    assert {k: after[k] for k in before} == before and "gamma.safetensors" in after
    incremental = json.loads((project / "artifacts/eval/metrics.json").read_text())
    assert incremental["tasks"] == ["alpha", "beta", "gamma"]
    report = (project / "artifacts/report/report.md").read_text()
    assert "## Change against the previous evaluation" in report and "Experts added: gamma" in report

    # full re-merge on request: every expert is compressed again against the new shared expert. gamma's task
    # tables live outside data.tasks_dir: an edit of them is seen too (download@gamma is a DVC dependency of them)
    assert registry.remerge("params.yaml") == ["gamma"]
    test_table = project / "data/extra/t2/test.parquet"
    table = pd.read_parquet(test_table)
    table.iloc[:-1].to_parquet(test_table)
    second = check_and_run(project=str(project))
    ran = set(second["pipeline"]["ran"])
    assert {"modularize", "compress@alpha", "compress@beta", "compress@gamma", "router", "evaluate"} <= ran
    assert "download@gamma" in ran and {"download@alpha", "download@beta"} <= set(second["pipeline"]["cached"])
    assert len(pd.read_parquet(project / "artifacts/taskdata/gamma/test.parquet")) == len(table) - 1
    assert _shared_and_factor_bytes(project)["model.safetensors"] != before["model.safetensors"]
    assert json.loads((project / "artifacts/checkpoints/gamma/manifest.json").read_text())["files"]
    metrics = json.loads((project / "artifacts/eval/metrics.json").read_text())
    assert metrics["tasks"] == ["alpha", "beta", "gamma"]
    records = read_history(project / "history/evaluations.jsonl")
    assert len(records) == 3 and set(records[1]["experts"]) == {"alpha", "beta", "gamma"}

    third = check_and_run(project=str(project))  # the next cron tick: nothing to do
    assert third == {"ran": False, "changes": {}, "stale": [], "forced": []}
    assert len(read_history(project / "history/evaluations.jsonl")) == 3
    status = _run([sys.executable, "-m", "dvc", "status", "--json"], project)
    assert json.loads(status or "{}") == {}
