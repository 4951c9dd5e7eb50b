"""The pipeline's steps, in order, on tiny random BERT experts and synthetic task tables (no DVC, no Prefect).

Each task's texts are drawn from its own slice of the vocabulary, so the router can learn them; the experts
are random, so scores are only checked for consistency, not for quality.
"""
import fnmatch
import hashlib
import json
import random
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tasks import bundle as bundle_step
from tasks import compress as compress_step
from tasks import download, evaluate, modularize, report, route, score_experts
from tasks import method as method_step
from tasks.params import METHOD_KINDS
from twinmerge.methods.base import DATA
from tasks.params import ParamsError, load_params
from tasks.taskdata import load_registry_split
from tiny_models import make_base, make_experts
from twinmerge.bundle import TwinBundle
from twinmerge.methods import METHODS
from twinmerge.errors import CheckpointError, SourceError

WORDS = [f"w{i}" for i in range(95)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
NUM_LABELS = {"alpha": 2, "beta": 3, "gamma": 4}


def _write_tokenizer(folder):
    from transformers import BertTokenizer

    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)


def _task_tables(root, task_index, num_labels, rng):
    words = WORDS[30 * task_index:30 * task_index + 30]
    folder = root / "data" / "tasks" / f"t{task_index}"
    folder.mkdir(parents=True)
    for split, n in (("train", 24), ("validation", 40), ("test", 24)):
        rows = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))),
                 "label": i % num_labels} for i in range(n)]
        pd.DataFrame(rows).to_parquet(folder / f"{split}.parquet")
    (folder / "labels.json").write_text(json.dumps({str(i): f"c{i}" for i in range(num_labels)}))
    return folder


# Every registered method (the interface test: a new method is tested by registering it), with a grid where
# the method has one to choose on validation data.
GRIDS = {"task_arithmetic": {"scaling": [0.3, 0.6]}, "layerwise": {"split": [1, 2]}}
EVERY_METHOD = {kind: {key: {"grid": GRIDS[key]} if key in GRIDS else {}
                       for key, m in METHODS.items() if m.kind == kind} for kind in ("static", "routed")}
for _key, _m in METHODS.items():  # learning methods: a few steps (their default is minutes of real data)
    if "steps" in _m.defaults:
        EVERY_METHOD[_m.kind][_key]["options"] = {"steps": 3, "batch_size": 8}
EVERY_METHOD["static"]["ties_per_tensor"] = {"method": "ties", "options": {"trim": "per_tensor"}}  # a 2nd entry


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    base = make_base(root / "models", "bert", bare_backbone=True)
    _write_tokenizer(base)
    experts = make_experts(root / "models", base, list(NUM_LABELS.values()), names=list(NUM_LABELS))
    rng = random.Random(0)
    params = {"seed": 0, "base": {"path": str(base)},
              "experts": {name: {"path": str(folder), "task": name,
                                 "data": str(_task_tables(root, i, NUM_LABELS[name], rng))}
                          for i, (name, folder) in enumerate(experts.items())},
              "merge": {"method": "task_arithmetic", "options": {"scaling": 0.4}},
              "compress": {"rank": {"mode": "fraction", "value": 0.25}, "dtype": "float32"},
              "router": {"epochs": 200, "patience": 60, "batch_size": 16, "max_length": 16, "dropout": 0.1,
                         "ensemble": "char_ngrams"},
              "evaluate": {"batch_size": 8, "max_length": 16},
              "methods": EVERY_METHOD}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.fixture(scope="module")
def ran(project):
    """Run every step in the project folder (paths are relative, as in dvc.yaml)."""
    cwd = pytest.MonkeyPatch()
    cwd.chdir(project)
    params = load_params("params.yaml")
    download.download_base(params, "artifacts/base")
    for name in params.experts:
        download.download_expert(name, params, "artifacts/base", f"artifacts/checkpoints/{name}")
        download.copy_task_data(params.experts[name].data, f"artifacts/taskdata/{name}")
    modularize.modularize(params)
    for name in params.experts:
        compress_step.compress(params, name, progress=False)
    router_summary = route.fit_router(params, progress=False)
    score_experts.score_experts(params)
    for kind in METHOD_KINDS:
        for key in getattr(params.methods, kind):
            method_step.run_method(params, kind, key, progress=False)
    metrics = evaluate.evaluate(params)
    report.build_report("artifacts/eval/metrics.json", "artifacts/report")
    bundle_step.bundle(params)
    yield params, metrics, router_summary
    cwd.undo()


def test_download_manifest_records_sha256(ran, project):
    manifest = json.loads((project / "artifacts/checkpoints/alpha/manifest.json").read_text())
    assert "model.safetensors" in manifest["files"]
    assert len(manifest["files"]["model.safetensors"]["sha256"]) == 64
    assert manifest["source"]["path"].endswith("alpha")
    data = project / "artifacts/taskdata/alpha"  # the task tables the router and evaluate stages read
    tables = json.loads((data / "manifest.json").read_text())
    assert set(tables["files"]) == set(download.TASK_FILES)
    for name, entry in tables["files"].items():
        assert entry["sha256"] == hashlib.sha256((data / name).read_bytes()).hexdigest()
        assert (data / name).read_bytes() == (Path(ran[0].experts["alpha"].data) / name).read_bytes()


def test_training_log_is_not_part_of_an_expert(project, tmp_path):
    """An expert's fingerprint and its copy cover weights, configs and tokenizer files, not a training log."""
    from tasks.registry import folder_fingerprint

    src = tmp_path / "alpha"
    shutil.copytree(project / "models/alpha", src)
    before = folder_fingerprint(src)
    (src / "scores.json").write_text('{"wall_seconds": 12.3}')
    (src / "trainer_state.json").write_text("{}")
    assert folder_fingerprint(src) == before
    assert {f.name for f in download._checkpoint_files(src)} == {"config.json", "model.safetensors"}


def test_task_data_copy_names_missing_files_and_leaves_nothing(project, tmp_path):
    src = tmp_path / "partial"
    shutil.copytree(project / "data/tasks/t0", src)
    (src / "test.parquet").unlink()
    with pytest.raises(SourceError, match=r"partial: task data lacks test.parquet"):
        download.copy_task_data(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shared_expert_loads_with_transformers(ran, project):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(project / "artifacts/shared")
    assert model.config.hidden_size == 32


def test_sharded_shared_expert_gives_the_same_factors_and_router_check(ran, project, tmp_path):
    """merge.max_shard_bytes reaches `modularize`: a shared expert written in shards, against which `compress`
    writes the same factor file bytes, and whose one digest (`weights_sha256`) the router check uses."""
    from twinmerge.io import SAFETENSORS_INDEX, weights_sha256
    from twinmerge.router import load_router

    params = load_params(project / "params.yaml")
    params.merge.max_shard_bytes = 20000
    dirs = {"base_dir": project / "artifacts/base", "checkpoints_dir": project / "artifacts/checkpoints"}
    sharded = modularize.modularize(params, tmp_path / "shared", **dirs)
    assert (sharded / SAFETENSORS_INDEX).is_file() and len(list(sharded.glob("model-*.safetensors"))) > 3
    name = next(iter(params.experts))
    compress_step.compress(params, name, sharded, tmp_path / "exclusive", progress=False, **dirs)
    for suffix in (".safetensors", ".stats.json"):
        produced = (tmp_path / "exclusive" / f"{name}{suffix}").read_bytes()
        assert produced == (project / "artifacts/exclusive" / f"{name}{suffix}").read_bytes()
    saved = load_router(project / "artifacts/router")
    saved.check_feature_model(project / "artifacts/shared")
    saved.feature_model_sha256 = weights_sha256(sharded)
    saved.check_feature_model(sharded / "model.safetensors")  # the routed methods' call: the absent file's folder
    with pytest.raises(CheckpointError, match="trained on features of a model with sha256"):
        saved.check_feature_model(project / "artifacts/shared")


def test_rows_have_distinct_labels(ran):
    """Two entries of one method (ties, ties_per_tensor) get their row names in their labels; every label in the
    table is distinct."""
    _, metrics, _ = ran
    labels = [r["label"] for r in metrics["methods"].values()]
    assert len(set(labels)) == len(labels)
    assert metrics["methods"]["ties_per_tensor"]["label"].endswith("[ties_per_tensor]")
    assert metrics["methods"]["ties"]["label"].endswith("[ties]")


def test_metrics_cover_every_method_and_task(ran):
    params, metrics, _ = ran
    expected = {"experts", "base_heads", "shared"} | set(EVERY_METHOD["static"]) | {
        f"{key}_{mode}" for key in EVERY_METHOD["routed"] for mode in METHODS[key].modes}
    assert set(metrics["methods"]) == expected
    for name, row in metrics["methods"].items():
        assert row["stored_bytes"] > 0 and row["label"] and row["data"] in DATA, name
        assert row["uses_task_id"] == (not name.endswith("_router")), name
    for name, row in metrics["methods"].items():
        assert set(row["scores"]) == set(params.experts), name
    assert all(abs(v - 100.0) < 1e-9 for v in metrics["methods"]["experts"]["normalized"].values())
    assert metrics["choices"]["task_arithmetic"]["options"]["scaling"] in (0.3, 0.6)
    assert 0 < metrics["storage"]["exclusive_ratio"] < 1


def test_twin_router_score_is_what_a_user_of_the_bundle_gets(ran, project):
    """twin_router per task = share of the task's test inputs that the bundle routes to the task's own expert
    AND labels with the gold label (an input routed elsewhere gets another task's label: wrong); it never
    exceeds twin_oracle; each row says whether it uses the task id."""
    params, metrics, _ = ran
    bundle = TwinBundle.load(project / "artifacts/twin")
    for name, spec in params.experts.items():
        table = pd.read_parquet(Path(spec.data) / "test.parquet")
        preds = bundle.predict(table["text"].tolist())
        correct = [p["expert"] == name and bundle.labels[name].index(p["label"]) == gold
                   for p, gold in zip(preds, table["label"])]
        assert metrics["methods"]["twin_router"]["scores"][name] == pytest.approx(100 * sum(correct) / len(correct))
        assert metrics["methods"]["twin_router"]["scores"][name] <= metrics["methods"]["twin_oracle"]["scores"][name]
    assert metrics["methods"]["twin_router"]["uses_task_id"] is False
    assert all(row["uses_task_id"] for m, row in metrics["methods"].items() if not m.endswith("_router"))
    assert "gold task's head" in metrics["methods"]["twin_oracle"]["label"]


def test_storage_counts_every_head_once(ran, project):
    """Twin rows store the shared backbone, the experts' factors (heads excluded), each head once and the
    router: its MLP and its n-gram member."""
    params, metrics, _ = ran
    stats = [json.loads((project / f"artifacts/exclusive/{n}.stats.json").read_text())["totals"]
             for n in params.experts]
    heads = sum(s["head_bytes"] for s in stats)
    rows = metrics["methods"]
    backbone = rows["shared"]["stored_bytes"] - heads
    router = sum((project / "artifacts/router" / name).stat().st_size
                 for name in ("model.safetensors", "ngrams.safetensors", "ngrams.json"))
    exclusive = sum(s["exclusive_bytes"] for s in stats)
    assert rows["twin_router"]["stored_bytes"] == backbone + exclusive + heads + router
    assert rows["experts"]["stored_bytes"] == len(params.experts) * backbone + heads
    assert rows["task_arithmetic"]["stored_bytes"] == rows["base_heads"]["stored_bytes"] == backbone + heads


def test_router_learns_vocabulary_slices(ran):
    _, metrics, summary = ran
    assert summary["holdout_accuracy"] >= 0.9
    assert metrics["routing"]["accuracy"] >= 0.9


def test_router_learns_from_the_splits_it_is_given(ran, project, monkeypatch, tmp_path):
    """router.splits: the validation inputs by default; with train, the training inputs too (and the routed rows
    then say they learned from training inputs); never test."""
    params, metrics, summary = ran
    assert summary["inputs"] == {"validation": 3 * 40} and summary["n_fit"] + summary["n_holdout"] == 120
    assert metrics["routing"]["splits"] == ["validation"]
    assert metrics["methods"]["twin_router"]["data"] == "validation_inputs"
    read = []

    def spy(p, split, *args):
        read.append(split)
        return load_registry_split(p, split, *args)

    monkeypatch.setattr(route, "load_registry_split", spy)
    monkeypatch.chdir(project)
    both = params.model_copy(update={"router": params.router.model_copy(update={"splits": ["train", "validation"]})})
    out = tmp_path / "artifacts" / "router"
    wider = route.fit_router(both, out_dir=out, progress=False)
    assert read == ["train", "validation"]
    assert list(method_step.router_report(tmp_path / "artifacts")["inputs"]) == read
    assert wider["inputs"] == {"train": 3 * 24, "validation": 3 * 40}
    assert wider["n_fit"] + wider["n_holdout"] == 3 * 64 and wider["holdout_accuracy"] >= 0.9
    assert (out / "model.safetensors").read_bytes() != (project / "artifacts/router/model.safetensors").read_bytes()
    for member in ("ngrams.safetensors", "ngrams.json"):  # the ensemble's n-gram member, learnt from train too
        assert (out / member).read_bytes() != (project / "artifacts/router" / member).read_bytes()
    for name in ("base", "checkpoints", "shared", "exclusive"):  # Twin-Merging's rows under the wider router
        (tmp_path / "artifacts" / name).symlink_to(project / "artifacts" / name)
    (tmp_path / "artifacts/eval").mkdir()
    shutil.copy(project / "artifacts/eval/experts.json", tmp_path / "artifacts/eval")
    rows = method_step.run_method(params, "routed", "twin", tmp_path / "artifacts", progress=False)["rows"]
    assert rows["twin_router"]["data"] == rows["twin_oracle"]["data"] == "train_inputs"
    assert rows["twin_true_routing"]["data"] == "none"


def test_report_has_table_and_plots(ran, project):
    text = (project / "artifacts/report/report.md").read_text()
    assert "**Twin-Merging, router weights and router-chosen head (no task id)**" in text
    assert "| method | alpha | beta | gamma | mean |" in text
    for png in (report.HEATMAP_PNG, report.CONFUSION_PNG, report.PARETO_PNG):
        assert (project / "artifacts/report" / png).stat().st_size > 1000
    for table in ("heatmap.csv", "pareto.csv"):
        assert (project / "artifacts/report" / table).read_text().startswith("method,")
    learning = [k for k, m in METHODS.items() if "steps" in m.defaults]
    curves = pd.read_csv(project / "artifacts/report/learning_curves.csv")
    assert set(curves["method"]) == set(learning) and list(curves.columns) == ["method", "step", "loss"]
    assert all(f"- `{k}`: " in text for k in learning)  # the learning section: objective, steps, losses


def test_bundle_predictions_match_evaluation(ran, project):
    """The bundle (one call to load) routes like evaluate's twin_router and gives label names."""
    params, metrics, _ = ran
    bundle = TwinBundle.load(project / "artifacts/twin")
    assert bundle.router.router.ngrams is not None  # the router's n-gram member travels with the bundle
    texts = pd.read_parquet(project / "data/tasks/t1/test.parquet")["text"].tolist()
    preds = bundle.predict(texts)
    assert {p["expert"] for p in preds} <= set(params.experts)
    routed = sum(p["expert"] == "beta" for p in preds) / len(preds)
    assert abs(routed - metrics["routing"]["per_task"]["beta"]) < 1e-6  # float32 division in evaluate
    assert all(p["label"] in {"LABEL_0", "LABEL_1", "LABEL_2"} for p in preds if p["expert"] == "beta")
    assert all(abs(sum(p["weights"].values()) - 1) < 1e-3 for p in preds)


def test_router_ensemble_benchmark_scores_each_rule_on_the_validation_holdout(ran, project, monkeypatch, capsys):
    """benchmarks/router_ensemble.py: the product rule is the router's own weights; every rule is scored strictly
    (right task and right label) on the router stage's holdout part of validation, never on test."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("router_ensemble", Path(__file__).resolve().parents[1]
                                                  / "benchmarks" / "router_ensemble.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bundle = TwinBundle.load(project / "artifacts/twin")
    texts = pd.read_parquet(project / "data/tasks/t1/validation.parquet")["text"].tolist()[:12]
    rules = bench.combinations(bundle, texts)
    assert list(rules) == ["MLP alone", "average", "product"]
    torch.testing.assert_close(rules["product"], bundle.router.weights(bundle.feature_model, texts, progress=False))
    tasks = torch.ones(len(texts), dtype=torch.long)
    wrong_task = torch.zeros(len(texts), dtype=torch.long)
    gold = torch.zeros(len(texts), dtype=torch.long)
    routing, per_task = bench.strict_accuracy(bundle, texts, tasks, gold, rules["product"])
    assert routing == (rules["product"].argmax(1) == 1).float().mean().item() and 0 <= per_task[1] <= routing
    assert bench.strict_accuracy(bundle, texts, wrong_task, gold, rules["product"])[1][0] == 0  # misrouted: wrong
    read = []
    monkeypatch.setattr(bench, "load_registry_split", lambda p, split: read.append(split) or load_registry_split(
        p, split))
    monkeypatch.chdir(project)
    monkeypatch.setattr("sys.argv", ["router_ensemble.py"])
    bench.main()
    lines = capsys.readouterr().out.splitlines()
    assert read == ["validation"] and [line.split(":")[0].strip() for line in lines[1:]] == list(rules)


def test_bundle_model_card_reads_its_numbers_from_metrics_and_files(ran, project):
    """README.md: a Hugging Face metadata block, one results row per expert with the routed model's scores and
    routing accuracy from metrics.json, and stored bytes that add up to the bundle's files."""
    params, metrics, _ = ran
    twin = project / "artifacts/twin"
    card = (twin / "README.md").read_text()
    head, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert yaml.safe_load(head) == {"library_name": "twinmerge", "pipeline_tag": "text-classification",
                                    "tags": ["twin-merging", "model-merging", "text-classification"]}
    routed = metrics["methods"]["twin_router"]
    for name, spec in params.experts.items():
        row = next(line for line in body.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[4]) == round(routed["scores"][spec.task], 2)
        assert float(cells[5]) == round(routed["normalized"][spec.task], 2)
        assert cells[6] == f"{100 * metrics['routing']['per_task'][name]:.2f}%"
    sizes = {line.split("|")[1].strip(): int(line.split("|")[2]) for line in body.splitlines()
             if line.startswith("| ") and "`" in line or line.startswith("| **total**")}
    files = sum(f.stat().st_size for f in twin.rglob("*") if f.is_file() and f.name not in {"README.md", "twin.json"})
    assert sizes.pop("**total**") == files == sum(sizes.values())
    assert "twinmerge predict --bundle twin" in body


def test_export_peft_cli_gives_each_experts_twin_over_the_shared_model(ran, project, tmp_path, capsys):
    """`twinmerge export-peft`: PEFT loads each adapter over the bundle's shared model, and its logits are the
    bundle's dynamic model materialised for that expert (one-hot weights), to 1e-5."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from tasks.cli import main

    twin = project / "artifacts/twin"
    assert main(["export-peft", "--bundle", str(twin), "--out", str(tmp_path / "adapters")]) == 0
    names = list(ran[0].experts)
    assert capsys.readouterr().out.splitlines() == [f"{n}\t{tmp_path / 'adapters' / n}" for n in names]
    bundle = TwinBundle.load(twin)
    ids = torch.randint(5, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    for t, name in enumerate(names):
        shared = AutoModelForSequenceClassification.from_pretrained(twin / "shared",
                                                                    num_labels=len(bundle.labels[name]))
        peft_model = PeftModel.from_pretrained(shared, tmp_path / "adapters" / name).eval()
        reference = bundle.dynamic.materialize(torch.eye(len(names))[t])
        with torch.no_grad():
            torch.testing.assert_close(peft_model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                       atol=1e-5, rtol=0)
    assert main(["export-peft", "--bundle", str(twin), "--out", str(tmp_path / "x"), "--expert", "nope"]) == 2
    assert capsys.readouterr().err.strip() == (f"twinmerge export-peft: error: {twin / 'twin.json'}: no expert "
                                               f"'nope' (have {', '.join(names)})")
    assert not (tmp_path / "x").exists()


def test_model_card_names_a_hub_base_and_says_when_nothing_was_evaluated(ran, project):
    from twinmerge.card import model_card

    twin = project / "artifacts/twin"
    card = model_card(twin, json.loads((twin / "twin.json").read_text()), None, "org/base-model", "mine")
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "org/base-model"
    assert "No evaluation was given." in card and 'TwinBundle.load("mine")' in card


def test_predict_cli_prints_task_and_label(ran, project, capsys, monkeypatch):
    from tasks.cli import main

    monkeypatch.chdir(project)
    assert main(["predict", "w31 w32 w33", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["task"] in NUM_LABELS and out["label"].startswith("LABEL_")


def _copy_bundle(project, tmp_path):
    return shutil.copytree(project / "artifacts/twin", tmp_path / "twin")


@pytest.mark.parametrize("case", ["non_utf8_file", "directory_file", "truncated_shared", "invalid_twin_json",
                                  "twin_json_without_labels", "top_k", "empty_text"])
def test_predict_bad_input_is_one_line(ran, project, tmp_path, capsys, monkeypatch, case):
    """Each bad input of `twinmerge predict` ends in one line naming the file or option, not a traceback."""
    from tasks.cli import main

    monkeypatch.chdir(project)
    args, expected = ["predict", "w31 w32"], None
    if case == "non_utf8_file":
        (tmp_path / "in.txt").write_bytes("w31 caf\u00e9\n".encode("latin-1"))
        args, expected = ["predict", "--file", str(tmp_path / "in.txt")], r"in.txt: not UTF-8 text \(byte 0xe9 at offset 7\)"
    elif case == "directory_file":
        args, expected = ["predict", "--file", str(tmp_path)], rf"{tmp_path}: cannot read \(Is a directory\)"
    elif case == "truncated_shared":
        twin = _copy_bundle(project, tmp_path)
        data = (twin / "shared/model.safetensors").read_bytes()
        (twin / "shared/model.safetensors").write_bytes(data[:len(data) // 2])
        args += ["--bundle", str(twin)]
        expected = r"twin/shared/model.safetensors: cannot read safetensors file \("
    elif case == "invalid_twin_json":
        twin = _copy_bundle(project, tmp_path)
        (twin / "twin.json").write_text('{"format": "twinmerge-bundle/1", "experts": [')
        args, expected = args + ["--bundle", str(twin)], r"twin/twin.json: not valid JSON \("
    elif case == "twin_json_without_labels":
        twin = _copy_bundle(project, tmp_path)
        meta = json.loads((twin / "twin.json").read_text())
        del meta["labels"]["beta"]
        (twin / "twin.json").write_text(json.dumps(meta))
        args, expected = args + ["--bundle", str(twin)], r"twin/twin.json: expert 'beta' lacks its entry in"
    elif case == "top_k":
        args, expected = args + ["--top-k", "-1"], r"top_k \(--top-k\) is -1: must be at least 1"
    else:
        args, expected = ["predict", "w31 w32", " ", "w1"], r"input 2 of 3 is empty or whitespace only"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(expected, err), err


def test_bundle_refuses_empty_text(ran, project):
    from twinmerge.errors import InputError

    bundle = TwinBundle.load(project / "artifacts/twin")
    with pytest.raises(InputError, match="input 1 of 2 is empty"):
        bundle.predict(["", "w31"])
    assert len(bundle.predict(["w31", "w32 w33"], top_k=1)) == 2


def test_download_rejects_incompatible_expert(ran, project, tmp_path):
    params, _, _ = ran
    other = make_base(tmp_path, "roberta", bare_backbone=False, name="other")
    bad = params.model_copy(deep=True)
    bad.experts["alpha"].path = str(other)
    with pytest.raises(CheckpointError, match="model_type"):
        download.download_expert("alpha", bad, project / "artifacts/base", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_download_rejects_head_label_mismatch(ran, project, tmp_path):
    params, _, _ = ran
    bad = params.model_copy(deep=True)
    bad.experts["alpha"].data = bad.experts["beta"].data  # alpha's head has another label count than beta's task
    with pytest.raises(CheckpointError, match=r"alpha: .*config.json has a \d-label head but its task data .*labels.json has"):
        download.download_expert("alpha", bad, project / "artifacts/base", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_download_checks_task_tables_and_base_key_set(project, tmp_path):
    """The download stage refuses, before writing anything, labels outside 0..n-1 and a single expert lacking a
    backbone tensor of the base (found before only by modularize, against the other experts)."""
    from safetensors.torch import load_file, save_file

    params = load_params(project / "params.yaml")
    base = project / "models" / "base"
    bad = params.model_copy(deep=True)
    tables = shutil.copytree(bad.experts["alpha"].data, tmp_path / "tables")
    pd.DataFrame({"text": ["w1", "w2"], "label": [0, 5]}).to_parquet(tables / "test.parquet")
    bad.experts["alpha"].data = str(tables)
    with pytest.raises(SourceError, match=r"tables/test.parquet: labels span 0..5, outside 0..1"):
        download.download_expert("alpha", bad, base, tmp_path / "out")
    gap = shutil.copytree(params.experts["alpha"].path, tmp_path / "gap")
    tensors = load_file(gap / "model.safetensors")
    del tensors["bert.encoder.layer.1.output.dense.weight"]
    save_file(tensors, gap / "model.safetensors", metadata={"format": "pt"})
    bad = params.model_copy(deep=True)
    bad.experts["alpha"].path = str(gap)
    with pytest.raises(CheckpointError, match=r"expert 'alpha' \(.*gap\): missing tensor "
                                              r"bert.encoder.layer.1.output.dense.weight \(base"):
        download.download_expert("alpha", bad, base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_params_errors_are_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"base": {"path": "x"}, "merge": {"method": "nope"}}))
    with pytest.raises(ParamsError, match=r"params.yaml: merge: .*nope"):
        load_params(path)
    path.write_text(yaml.safe_dump({"base": {"path": "x"}, "compress": {"rank": {"mode": "fraction", "value": 2}}}))
    with pytest.raises(ParamsError, match=r"compress.rank: .*\(0, 1\]"):
        load_params(path)
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "missing.yaml")
    for splits, error in ((["validation", "test"], r"router.splits.1: .*'train' or 'validation'"),
                          (["train", "train"], r"router.splits: .*lists a split twice"),
                          ([], r"router.splits: .*at least 1")):
        path.write_text(yaml.safe_dump({"base": {"path": "x"}, "router": {"splits": splits}}))
        with pytest.raises(ParamsError, match=error):
            load_params(path)


def test_missing_validation_data_is_named(project, tmp_path):
    from tasks.taskdata import load_split

    with pytest.raises(SourceError, match="validation.parquet: no validation data"):
        load_split(tmp_path, "validation")


def test_hub_fetch_pins_commit_and_skips_pickles(tmp_path):
    """fetch_hub with huggingface_hub replaced by a local fixture: resolved commit recorded, retries work."""
    from tasks.params import HubSource

    repo = tmp_path / "repo" / "sub"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text("{}")
    (repo / "model.safetensors").write_bytes(b"x")
    (repo / "pytorch_model.bin").write_bytes(b"pickle")
    calls = {"info": 0}

    class Api:
        def model_info(self, repo_id, revision):
            calls["info"] += 1
            if calls["info"] == 1:
                raise ConnectionError("flaky")
            return type("Info", (), {"sha": "abc123"})()

    def snapshot(repo_id, revision, local_dir, allow_patterns):
        assert revision == "abc123"
        for f in (tmp_path / "repo").rglob("*"):
            rel = f.relative_to(tmp_path / "repo")
            if f.is_file() and any(fnmatch.fnmatch(str(rel), p) for p in allow_patterns):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, Path(local_dir) / rel)

    record = download.fetch_hub(HubSource(repo_id="org/repo", subfolder="sub"), tmp_path / "out", api=Api(),
                                snapshot_download=snapshot, retry_delay=0.0)
    assert record["commit"] == "abc123"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors",
                                                                    "source.json"]


def test_hub_branch_revision_warns_and_commit_is_recorded(tmp_path, caplog):
    """A branch/tag revision is resolved per fetch: warned about; the resolved commit lands in source.json (a DVC
    out, so in dvc.lock's hash) and in the download manifest. A 40-hex commit revision is not warned about."""
    from tasks.params import HubSource, load_params

    commit = "0123456789abcdef0123456789abcdef01234567"

    class Api:
        def model_info(self, repo_id, revision):
            return type("Info", (), {"sha": commit})()

    def snapshot(repo_id, revision, local_dir, allow_patterns):
        assert revision == commit
        (Path(local_dir) / "config.json").write_text("{}")
        (Path(local_dir) / "model.safetensors").write_bytes(b"x")

    with caplog.at_level("WARNING", logger="tasks.download"):
        download.fetch_hub(HubSource(repo_id="org/repo"), tmp_path / "main", api=Api(), snapshot_download=snapshot)
    assert f"revision 'main' is a branch or tag, resolved to commit {commit}" in caplog.text
    assert json.loads((tmp_path / "main/source.json").read_text())["commit"] == commit
    caplog.clear()
    with caplog.at_level("WARNING", logger="tasks.download"):
        download.fetch_hub(HubSource(repo_id="org/repo", revision=commit), tmp_path / "pinned", api=Api(),
                           snapshot_download=snapshot)
    assert "branch or tag" not in caplog.text
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"base": {"path": str(tmp_path / "main")}}))
    manifest = download.download_base(load_params(tmp_path / "params.yaml"), tmp_path / "base")
    assert manifest["source"]["hub"]["commit"] == commit


def _context(params, project):
    from transformers import AutoTokenizer

    from twinmerge.methods import Context

    pool = modularize.open_pool(params, project / "artifacts/base", project / "artifacts/checkpoints")
    val = method_step.task_pool(params, pool, "validation", AutoTokenizer.from_pretrained(project / "artifacts/base"))
    return Context(pool, val, {}, artifacts=project / "artifacts", progress=False)


@pytest.mark.parametrize("key", [k for k, m in METHODS.items() if m.kind == "routed" and m.materializable])
def test_routed_batch_equals_per_sample_materialized_models(ran, project, key):
    """One batch mixing every expert through a routed method's engine (one-hot top-1 weights, and soft weights
    over all experts) equals each input run alone through an ordinary classifier with that input's merged
    weights and head, to 1e-5."""
    params, _, _ = ran
    ctx = _context(params, project)
    model = METHODS[key].model(ctx, project / "artifacts/methods" / key)
    n = len(params.experts)
    enc = ctx.validation.tokenizer(ctx.validation.texts[::7][:9], padding=True, return_tensors="pt")
    heads = torch.arange(9) % n
    soft = torch.softmax(torch.randn(9, n, generator=torch.Generator().manual_seed(0)), 1)
    for weights, top_k in ((torch.nn.functional.one_hot(heads, n).float(), 1), (soft, None)):
        with torch.inference_mode():
            batched = model(**enc, weights=weights, head_ids=heads, top_k=top_k)
            for b in range(9):
                alone = model.materialize(weights[b], int(heads[b]))
                logits = alone(**{k: v[b:b + 1] for k, v in enc.items()}).logits[0]
                c = logits.shape[0]
                torch.testing.assert_close(batched.logits[b, :c], logits, rtol=1e-5, atol=1e-5)


def test_emr_and_layerwise_materialize_their_definitions(ran, project):
    """Per task t, the engine's merged weights are the method's definition: EMR theta_0 + lambda_t M_t tau_uni
    (recomputed here from the experts over the whole model); layer-wise: expert t's own upper layers exactly,
    the Task Arithmetic merge below the chosen split."""
    from twinmerge.merge import build_shared_expert
    from twinmerge.methods.layerwise import upper_keys

    params, metrics, _ = ran
    ctx = _context(params, project)
    pool, n = ctx.pool, len(params.experts)
    keys = pool.mergeable_keys()
    taus = {k: torch.stack([pool.expert_tensor(t, k).float() - pool.base_tensor(k).float() for t in pool.names])
            for k in keys}
    flag = {k: torch.where(v.sum(0) > 0, 1.0, -1.0) for k, v in taus.items()}  # the official election
    uni = {k: flag[k] * (taus[k] * (taus[k] * flag[k] > 0)).abs().amax(0) for k in keys}
    emr = METHODS["emr"].model(ctx, project / "artifacts/methods/emr")
    split = metrics["choices"]["layerwise"]["options"]["split"]
    upper = set(upper_keys(keys, split))
    lower, _ = build_shared_expert(pool, "task_arithmetic", {"scaling": 0.3}, include=sorted(set(keys) - upper),
                                   progress=False)
    layerwise = METHODS["layerwise"].model(ctx, project / "artifacts/methods/layerwise")
    for t, name in enumerate(pool.names):
        one_hot = torch.nn.functional.one_hot(torch.tensor(t), n).float()
        mask = {k: taus[k][t] * flag[k] > 0 for k in keys}
        rescaler = sum(taus[k][t].abs().mean() for k in keys) / sum((mask[k] * uni[k]).abs().mean() for k in keys)
        emr_state, lw_state = emr.merged_state(one_hot), layerwise.merged_state(one_hot)
        for k in keys:
            torch.testing.assert_close(emr_state[k], pool.base_tensor(k).float() + rescaler * mask[k] * uni[k],
                                       rtol=1e-5, atol=1e-6)
            expected = pool.expert_tensor(name, k).float() if k in upper else lower[k].float()
            torch.testing.assert_close(lw_state[k], expected, rtol=1e-6, atol=1e-6)


def test_selection_subset_is_seeded_and_capped(ran, project):
    """Methods choose options on at most evaluate.selection_max_per_task validation inputs per task: the same
    seeded subset every time, in the split's order."""
    from transformers import AutoTokenizer

    params, _, _ = ran
    tokenizer = AutoTokenizer.from_pretrained(project / "artifacts/base")
    pool = modularize.open_pool(params, project / "artifacts/base", project / "artifacts/checkpoints")
    full = method_step.task_pool(params, pool, "validation", tokenizer)
    capped = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"selection_max_per_task": 10})})
    first, again = (method_step.task_pool(capped, pool, "validation", tokenizer) for _ in range(2))
    for name in params.experts:
        texts = first.split[name][0]
        assert len(texts) == 10 and texts == again.split[name][0]
        positions = [full.split[name][0].index(t) for t in texts]
        assert positions == sorted(positions)
    assert len(method_step.task_pool(capped, pool, "test", tokenizer).texts) == len(full.texts) // 40 * 24
