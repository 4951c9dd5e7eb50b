"""benchmarks/router_features.py: stratified folds over validation, CV never trains on the fold it scores."""
import importlib.util
import json
from pathlib import Path

import torch

from tasks.params import load_params

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("router_features", REPO / "benchmarks" / "router_features.py")
RF = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(RF)


def test_stratified_folds_partition_each_class_evenly():
    labels = torch.tensor([0] * 50 + [1] * 23 + [2] * 7)
    folds = RF.stratified_folds(labels, 5, seed=0)
    assert set(folds.tolist()) == set(range(5))
    for c, n in ((0, 50), (1, 23), (2, 7)):
        counts = torch.bincount(folds[labels == c], minlength=5)
        assert counts.sum() == n and counts.max() - counts.min() <= 1
    assert torch.equal(folds, RF.stratified_folds(labels, 5, seed=0))
    assert not torch.equal(folds, RF.stratified_folds(labels, 5, seed=1))


def _study(n_tasks, per_task=40, crops=0, train=0):
    """A Features over synthetic separable clusters whose column 0 is a row id: validation i -> i, crop j of
    parent p -> 1000 + p, training input i -> 5000 + i (to see which rows each router trained on)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(n_tasks, 8, generator=g) * 3

    def part(y, ids):
        x = centres[y] + torch.randn(len(y), 8, generator=g)
        x[:, 0] = ids.float()
        return x

    y = torch.arange(n_tasks).repeat_interleave(per_task)
    texts = {"validation": [f"w{i} a b c d" for i in range(len(y))]}
    labels = {"validation": y}
    if train:
        labels["train"] = torch.arange(n_tasks).repeat_interleave(train)
        texts["train"] = [f"t{i}" for i in range(len(labels["train"]))]
    feats = RF.Features({}, texts, labels, max_length=16, crops=crops, seed=0)
    key = (RF.ALL6, "mean")
    feats.cache[("validation", "shared", key)] = part(y, torch.arange(len(y)))
    if crops:
        feats.cache[("crops", "shared", key)] = part(y[feats.crop_parents], 1000 + feats.crop_parents)
    if train:
        feats.cache[("train", "shared", key)] = part(labels["train"], 5000 + torch.arange(len(labels["train"])))
    return feats, ("shared", *key)


def _quick_params():
    params = load_params(REPO / "params.yaml")
    params.router.epochs, params.router.patience, params.router.lr = 30, 5, 1e-2  # quick
    return params


def test_cross_validation_scores_each_fold_with_a_router_that_never_saw_it(monkeypatch):
    params = _quick_params()
    n_tasks = len(params.experts)
    feats, key = _study(n_tasks, crops=2, train=3)
    y = feats.labels["validation"]
    folds = RF.stratified_folds(y, 4, params.seed)
    seen, real_fit = [], RF.fit

    def spy(params, xs, ys, overrides, texts=None):
        seen.append(set(xs[:, 0].long().tolist()))
        return real_fit(params, xs, ys, overrides, texts)

    monkeypatch.setattr(RF, "fit", spy)
    accs, per_task, confusion = RF.cross_validate(params, feats, key, {"refit": True}, folds, 4)
    assert len(seen) == 4 and len(accs) == 4 and len(per_task) == n_tasks
    assert confusion.sum() == len(y) and confusion.shape == (n_tasks, n_tasks)
    for f, rows in enumerate(seen):
        assert rows == set((folds != f).nonzero().flatten().tolist())
    assert min(accs) > 0.9
    # crops of the training folds' texts only (never of the fold scored), and the training inputs in every fold
    seen.clear()
    RF.cross_validate(params, feats, key, {"crops": 2, "with_train": True}, folds, 4)
    train_ids = set(range(5000, 5000 + 3 * n_tasks))
    for f, rows in enumerate(seen):
        mine = (folds != f).nonzero().flatten().tolist()
        assert rows == set(mine) | {1000 + p for p in mine} | train_ids
    # a quarter of the training folds, stratified
    seen.clear()
    RF.cross_validate(params, feats, key, {"train_share": 0.25}, folds, 4)
    for f, rows in enumerate(seen):
        assert rows < set((folds != f).nonzero().flatten().tolist())
        assert torch.bincount(y[sorted(rows)], minlength=n_tasks).tolist() == [8] * n_tasks


def test_word_crops_are_seeded_windows_of_their_parent():
    texts = ["one two three four five six seven eight nine ten", "too short"]
    crops, parents = RF.word_crops(texts, 3, seed=0)
    assert parents.tolist() == [0, 0, 0, 1, 1, 1] and crops[3:] == ["too short"] * 3
    for crop in crops[:3]:
        assert 4 <= len(crop.split()) <= 9 and crop in texts[0]
    assert (crops, parents.tolist()) == (lambda c, p: (c, p.tolist()))(*RF.word_crops(texts, 3, seed=0))


def _tiny_pipeline(tmp_path, monkeypatch, splits=(("validation", 40), ("test", 20))):
    """A tiny shared model (also the base) and three word-slice tasks (task t's texts use words [30 t, 30 t + 30))
    in tmp_path, the working directory; returns params.yaml's path."""
    import numpy as np
    import pandas as pd
    import yaml

    from tiny_models import add_word_tokenizer, make_base
    shared = make_base(tmp_path / "artifacts", "bert", bare_backbone=True, name="shared")
    words = add_word_tokenizer(shared)
    rng = np.random.default_rng(0)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["experts"] = {}
    for t in range(3):
        folder = tmp_path / "artifacts" / "taskdata" / f"task{t}"
        folder.mkdir(parents=True)
        for split, n in splits:
            texts = [" ".join(rng.choice(words[30 * t:30 * t + 30], 5)) for _ in range(n)]
            pd.DataFrame({"text": texts, "label": [0] * n}).to_parquet(folder / f"{split}.parquet")
        params["experts"][f"task{t}"] = {"path": str(shared), "task": f"task{t}", "data": str(folder)}
    params["router"].update(epochs=20, patience=5, lr=1e-2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "params.yaml"


def test_benchmark_prints_cv_table_and_one_test_line(tmp_path, monkeypatch, capsys):
    """End to end on a tiny shared model and three word-slice tasks: a CV row per setting, then exactly one
    test number, for the setting with the best CV mean."""
    _tiny_pipeline(tmp_path, monkeypatch)
    only = r"^last layer, mean(, linear router| \(paper\))$"
    monkeypatch.setattr("sys.argv", ["router_features.py", "--folds", "3", "--only", only])
    RF.main()
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith("| last layer")]
    # setting, inputs, mean, std, 3 tasks, confusions
    assert len(rows) == 2 and all(len(r.split("|")) == 4 + 3 + 1 + 2 for r in rows)
    means = {r.split("|")[1].strip(): float(r.split("|")[3]) for r in rows}
    chosen = [line for line in out if line.startswith("chosen on validation")]
    assert len(chosen) == 1 and chosen[0].count("test routing accuracy") == 1
    best = [name for name, m in means.items() if m == max(means.values())]  # as printed (rounded)
    assert any(chosen[0].startswith(f"chosen on validation: {name} (") for name in best)


def test_settings_with_training_inputs_are_reported_never_chosen(tmp_path, monkeypatch, capsys):
    """The row trained with the experts' training inputs scores best here but the choice (and the one test
    read) goes to the best validation-only row; the JSON records both with their confusion matrices."""
    _tiny_pipeline(tmp_path, monkeypatch, (("train", 20), ("validation", 40), ("test", 20)))
    real_cv, read = RF.cross_validate, []

    def rigged(params, feats, key, overrides, folds, k):
        accs, per_task, confusion = real_cv(params, feats, key, overrides, folds, k)
        return [2.0 if overrides.get("with_train") else a for a in accs], per_task, confusion

    real_load = RF.load_registry_split
    monkeypatch.setattr(RF, "cross_validate", rigged)
    monkeypatch.setattr(RF, "load_registry_split", lambda params, split: read.append(split) or real_load(params,
                                                                                                           split))
    monkeypatch.setattr(RF, "SETTINGS", [("narrow", (-1,), "mean", RF.NARROW),  # the tiny model has 2 layers
                                         ("narrow + train", (-1,), "mean", {"with_train": True, **RF.NARROW})])
    monkeypatch.setattr("sys.argv", ["router_features.py", "--folds", "3", "--json", "out.json"])
    RF.main()
    out = capsys.readouterr().out
    assert "chosen on validation: narrow (" in out
    assert read == ["validation", "train", "test"]
    result = json.loads((tmp_path / "out.json").read_text())
    assert [(r["setting"], r["inputs"], r["eligible"]) for r in result["rows"]] == [
        ("narrow", "validation", True), ("narrow + train", "validation + train", False)]
    for row in result["rows"]:
        assert sum(map(sum, row["confusion"])) == 120 and len(row["per_task"]) == 3
    assert result["chosen"]["setting"] == "narrow"
