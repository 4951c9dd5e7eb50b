"""Metrics against scikit-learn / scipy on random data; normalised score."""
import numpy as np
import pytest
import torch
from scipy import stats
from sklearn import metrics as skm

from twinmerge.errors import TwinMergeError
from twinmerge.metrics import GENERATIVE_METRICS, METRICS, mean_normalized, normalized_score, score

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("n_classes", [2, 3, 7])
def test_classification_metrics_match_sklearn(n_classes):
    for _ in range(5):
        y = RNG.integers(0, n_classes, 50)
        p = np.where(RNG.random(50) < 0.6, y, RNG.integers(0, n_classes, 50))
        assert score("accuracy", p, y) == pytest.approx(skm.accuracy_score(y, p))
        assert score("macro_f1", p, y) == pytest.approx(skm.f1_score(y, p, average="macro"))
        assert score("matthews_corrcoef", p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
        if n_classes == 2:
            assert score("binary_f1", p, y) == pytest.approx(skm.f1_score(y, p))
            assert score("acc_f1", p, y) == pytest.approx((skm.accuracy_score(y, p) + skm.f1_score(y, p)) / 2)


def test_degenerate_classification():
    y = np.array([1, 1, 2, 2])
    p = np.array([1, 1, 1, 1])  # a class never predicted; constant predictions
    assert score("macro_f1", p, y) == pytest.approx(skm.f1_score(y, p, average="macro", zero_division=0))
    assert score("matthews_corrcoef", p, y) == skm.matthews_corrcoef(y, p) == 0.0
    assert score("binary_f1", np.zeros(4), np.zeros(4)) == 0.0


def test_correlations_match_scipy_with_ties():
    y = RNG.normal(size=40)
    p = np.round(y + RNG.normal(scale=0.7, size=40), 1)  # rounding creates ties
    p[:6] = p[0]
    assert score("pearson", p, y) == pytest.approx(stats.pearsonr(p, y)[0])
    assert score("spearman", p, y) == pytest.approx(stats.spearmanr(p, y)[0])
    assert score("pearson_spearman", torch.tensor(p), torch.tensor(y)) == pytest.approx(
        (stats.pearsonr(p, y)[0] + stats.spearmanr(p, y)[0]) / 2)
    assert np.isnan(score("pearson", np.ones(5), y[:5]))


def test_all_metrics_return_floats_and_accept_tensors():
    y = torch.tensor([0, 1, 1, 0, 1])
    p = torch.tensor([0, 1, 0, 0, 1])
    for name in set(METRICS) - set(GENERATIVE_METRICS):
        assert type(score(name, p, y)) is float
    for name in GENERATIVE_METRICS:
        assert type(score(name, ["a b"], ["a b"])) is float


def test_normalized_score():
    assert normalized_score(0.45, 0.9) == pytest.approx(50.0)
    assert mean_normalized({"a": 0.9, "b": 0.5}, {"a": 0.9, "b": 0.4}) == pytest.approx((100 + 125) / 2)
    with pytest.raises(TwinMergeError):
        normalized_score(0.5, 0.0)
    with pytest.raises(TwinMergeError, match="tasks differ"):
        mean_normalized({"a": 1.0}, {"b": 1.0})
    with pytest.raises(TwinMergeError, match="unknown metric"):
        score("bleu", [1], [1])
    with pytest.raises(TwinMergeError, match="same length"):
        score("accuracy", [1, 2], [1])


def test_input_answered_by_another_tasks_head_is_wrong():
    """Task 1's inputs: the first two answered by task 1's head, the last two by task 0's head. Index 1 is
    the gold label of all four and every head outputs index 1, yet only the first two are correct."""
    from twinmerge.metrics import NO_LABEL, answered_predictions

    logits = torch.tensor([[0.1, 2.0], [0.3, 0.9], [0.0, 5.0], [1.0, 3.0]])
    heads = torch.tensor([1, 1, 0, 0])
    preds = answered_predictions(logits, heads, task_index=1)
    assert preds.tolist() == [1, 1, NO_LABEL, NO_LABEL]
    assert score("accuracy", preds, [1, 1, 1, 1]) == 0.5
    assert answered_predictions(logits, None, 1).tolist() == [1, 1, 1, 1]


def test_router_heads_never_beat_oracle_heads_on_accuracy():
    """Same routing weights: a correctly routed input uses the same head under both protocols, a misrouted one
    is wrong under router heads. So per task, router-head accuracy <= oracle-head accuracy."""
    from twinmerge.metrics import answered_predictions

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n, task = 60, 2
        oracle_logits = torch.randn(n, 4, generator=g)
        routed = torch.randint(0, 4, (n,), generator=g)
        # a misrouted input's logits come from another head; a correctly routed one's are the oracle ones
        other = torch.randn(n, 4, generator=g)
        router_logits = torch.where((routed == task)[:, None], oracle_logits, other)
        labels = torch.randint(0, 4, (n,), generator=g).tolist()
        strict = score("accuracy", answered_predictions(router_logits, routed, task), labels)
        oracle = score("accuracy", answered_predictions(oracle_logits, torch.full((n,), task), task), labels)
        assert strict <= oracle


@pytest.mark.parametrize("metric", ["pearson", "spearman", "pearson_spearman"])
def test_regression_metrics_are_refused_for_experts(metric, tmp_path):
    """A regression expert would be scored by argmax over one logit (NaN correlations): refused up front."""
    from tasks.params import ParamsError, load_params

    (tmp_path / "params.yaml").write_text(
        "base: {path: b}\nexperts:\n  sts: {path: e, task: sts, data: d, metric: %s}\n" % metric)
    with pytest.raises(ParamsError, match=f"experts.sts.metric: .*{metric} is a regression metric"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("metric", ["exact_match", "rouge_l"])
def test_generative_metrics_make_a_generative_registry(metric, tmp_path):
    """A generative metric makes the expert a causal LM's task (scored by twinmerge.genpool in the stages)."""
    from tasks.params import load_params

    (tmp_path / "params.yaml").write_text(
        "base: {path: b}\nexperts:\n  qa: {path: e, task: qa, data: d, metric: %s}\n" % metric)
    params = load_params(tmp_path / "params.yaml")
    assert params.generative and params.experts["qa"].generative
