"""benchmarks/router_features.py: stratified folds over validation, CV never trains on the fold it scores."""
import importlib.util
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


def test_cross_validation_scores_each_fold_with_a_router_that_never_saw_it(monkeypatch):
    params = load_params(REPO / "params.yaml")
    params.router.epochs, params.router.patience, params.router.lr = 30, 5, 1e-2  # quick
    n_tasks = len(params.experts)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n_tasks).repeat_interleave(40)
    x = torch.randn(n_tasks, 8, generator=g)[y] * 3 + torch.randn(len(y), 8, generator=g)  # separable clusters
    x[:, 0] = torch.arange(len(y), dtype=torch.float)  # row id, to see which rows each router trained on
    folds = RF.stratified_folds(y, 4, params.seed)
    seen, real_fit = [], RF.fit

    def spy(params, xs, ys, overrides):
        seen.append(set(xs[:, 0].long().tolist()))
        return real_fit(params, xs, ys, overrides)

    monkeypatch.setattr(RF, "fit", spy)
    accs, per_task = RF.cross_validate(params, x, y, {"refit": True}, folds, 4)
    assert len(seen) == 4 and len(accs) == 4 and len(per_task) == n_tasks
    for f, rows in enumerate(seen):
        assert rows == set((folds != f).nonzero().flatten().tolist())
    assert min(accs) > 0.9


def test_benchmark_prints_cv_table_and_one_test_line(tmp_path, monkeypatch, capsys):
    """End to end on a tiny shared model and three word-slice tasks: a CV row per setting, then exactly one
    test number, for the setting with the best CV mean."""
    import numpy as np
    import pandas as pd
    import yaml

    from tiny_models import add_word_tokenizer, make_base
    shared = make_base(tmp_path / "artifacts", "bert", bare_backbone=True, name="shared")
    words = add_word_tokenizer(shared)
    rng = np.random.default_rng(0)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["experts"] = {}
    for t in range(3):  # task t's texts use words [30 t, 30 t + 30)
        folder = tmp_path / "artifacts" / "taskdata" / f"task{t}"
        folder.mkdir(parents=True)
        for split, n in (("validation", 40), ("test", 20)):
            texts = [" ".join(rng.choice(words[30 * t:30 * t + 30], 5)) for _ in range(n)]
            pd.DataFrame({"text": texts, "label": [0] * n}).to_parquet(folder / f"{split}.parquet")
        params["experts"][f"task{t}"] = {"path": str(shared), "task": f"task{t}", "data": str(folder)}
    params["router"].update(epochs=20, patience=5, lr=1e-2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    only = r"^last layer, mean(, linear router| \(paper\))$"
    monkeypatch.setattr("sys.argv", ["router_features.py", "--folds", "3", "--only", only])
    RF.main()
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith("| last layer")]
    assert len(rows) == 2 and all(len(r.split("|")) == 3 + 3 + 2 for r in rows)  # setting, mean, std, 3 tasks
    means = {r.split("|")[1].strip(): float(r.split("|")[2]) for r in rows}
    chosen = [line for line in out if line.startswith("chosen on validation")]
    assert len(chosen) == 1 and chosen[0].count("test routing accuracy") == 1
    best = [name for name, m in means.items() if m == max(means.values())]  # as printed (rounded)
    assert any(chosen[0].startswith(f"chosen on validation: {name} (") for name in best)
