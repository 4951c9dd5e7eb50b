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
