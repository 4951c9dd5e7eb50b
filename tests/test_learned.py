"""Learning methods (AdaMerging, Concrete, Self Positioning) on tiny random BERTs: the functional merged forward
equals an ordinary model with the merged tensors, gradients reach the coefficients only, the objectives are what
they claim, and builds are deterministic and leave their learned tensors and curves."""
import math

import pytest
import torch

from tiny_models import add_word_tokenizer, make_set
from twinmerge.errors import MergeError
from twinmerge.io import ExpertSet
from twinmerge.learning import FunctionalClassifier, Probe, TaskVectors, entropy
from twinmerge.methods import METHODS, Context
from twinmerge.methods.learned import _Setup, curve_csv
from twinmerge.modelpool import assemble_classifier
from twinmerge.taskpool import TaskPool

LEARNED = [k for k, m in METHODS.items() if m.kind == "static" and hasattr(m, "learn")]
FAST = {"steps": 3, "batch_size": 4, "max_length": 8}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(ctx, words): tiny bare-BERT pool with 3 experts, a word tokenizer and 6 validation inputs per task."""
    tmp = tmp_path_factory.mktemp("learned")
    base, experts = make_set(tmp, "bert", bare_backbone=True)
    words = add_word_tokenizer(base)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    pool = ExpertSet(base, experts)
    g = torch.Generator().manual_seed(0)
    split = {}
    for t, name in enumerate(pool.names):
        texts = [" ".join(words[i] for i in torch.randint(len(words), (int(n),), generator=g).tolist())
                 for n in torch.randint(2, 7, (6,), generator=g)]
        split[name] = (texts, [i % (t + 2) for i in range(6)])
    tp = TaskPool(pool, split, {n: "accuracy" for n in pool.names}, tokenizer, 4, 16)
    return Context(pool, tp, {n: 50.0 for n in pool.names}, tp, seed=0, progress=False)


def test_entropy_is_shannon_entropy():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2) + (-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))) / 2
    assert entropy(logits).item() == pytest.approx(expected, rel=1e-6)


def test_functional_forward_equals_a_model_with_the_merged_tensors(setup):
    ctx = setup
    tv, fc = TaskVectors(ctx.pool), FunctionalClassifier(ctx.pool)
    coef = torch.tensor([0.2, 0.5, 0.9])
    merged = tv.combine(lambda k: coef)
    probe = Probe(ctx.learn.split, ctx.learn.tokenizer, 4, 16, 0)
    for t, name in enumerate(ctx.pool.names):
        enc, _ = probe.batch(t, 0)
        state = {k: ctx.pool.base_tensor(k).float() + sum(c * (ctx.pool.expert_tensor(n, k).float()
                                                                - ctx.pool.base_tensor(k).float())
                                                           for c, n in zip(coef.tolist(), ctx.pool.names))
                 for k in ctx.pool.mergeable_keys()}
        model = assemble_classifier(ctx.pool.experts[name].config,
                                    {**state, **{k: ctx.pool.expert_tensor(name, k) for k in ctx.pool.head_keys()}})
        with torch.no_grad():
            torch.testing.assert_close(fc.logits(merged, t, enc), model(**enc).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_entropy_gradients_reach_the_coefficients_only(setup, granularity):
    ctx = setup
    s = _Setup(ctx)
    lam = s.coefficients(granularity, 0.3)
    probe = s.probe(ctx, 4, 16)
    loss = s.entropy_loss(s.tv.combine(s.coef_fn(lam)), probe, [0, 1, 2], 0)
    loss.backward()
    assert lam.grad is not None and lam.grad.abs().sum() > 0
    assert lam.grad.shape == ((3,) if granularity == "task" else (len(s.tv.keys), 3))
    assert all(p.grad is None and not p.requires_grad for p in s.fc.model.parameters())
    assert all(not t.requires_grad for t in [*s.tv.taus.values(), *s.tv.base.values()])
    # the gradient is d/dlambda of sum_t H(head t on task t's batch): check one entry by finite differences
    with torch.no_grad():
        step = torch.zeros_like(lam)
        step.view(-1)[0] = 1e-3
        plus = s.entropy_loss(s.tv.combine(s.coef_fn(lam + step)), probe, [0, 1, 2], 0)
        minus = s.entropy_loss(s.tv.combine(s.coef_fn(lam - step)), probe, [0, 1, 2], 0)
    assert ((plus - minus) / 2e-3).item() == pytest.approx(lam.grad.view(-1)[0].item(), rel=2e-2, abs=1e-4)


def test_adamerging_lowers_the_entropy_on_a_fixed_batch(setup):
    """With the whole split in every batch the objective is deterministic; a few small steps lower it and keep
    the lambdas clamped to [0, 1]."""
    ctx = setup
    backbone, learned, curve, notes = METHODS["adamerging"].learn(
        ctx, _Setup(ctx), granularity="task", steps=4, batch_size=6, lr=0.01, max_length=16)
    assert curve[-1] < curve[0] and notes["objective"] == "entropy"
    assert learned["lambdas"].min() >= 0 and learned["lambdas"].max() <= 1


def test_self_positioning_learns_base_and_task_coefficients_with_the_l2_pull(setup):
    ctx = setup
    s = _Setup(ctx)
    _, learned, curve, _ = METHODS["self_positioning"].learn(ctx, s, steps=2, batch_size=6, lr=0.05, reg=0.0)
    _, learned_reg, curve_reg, _ = METHODS["self_positioning"].learn(ctx, s, steps=2, batch_size=6, lr=0.05,
                                                                      reg=10.0)
    # same data and start: the first losses differ by exactly reg * sum_t init^2 (beta starts at 1)
    assert curve_reg[0] - curve[0] == pytest.approx(10.0 * 3 * 0.3 ** 2, rel=1e-4)
    assert learned["beta"].item() != 1.0 and not torch.equal(learned["alphas"], torch.full((3,), 0.3))


def test_concrete_masks_are_mean_one_and_only_logits_learn(setup):
    ctx = setup
    from twinmerge.methods.learned import _concrete

    logits = torch.zeros(50, 7, requires_grad=True)
    m = _concrete(logits, 0.5, torch.Generator().manual_seed(0))
    assert m.mean().item() == pytest.approx(1.0, rel=1e-6) and (m > 0).all()
    m.sum().backward()
    assert logits.grad is not None
    for inner in ("task_arithmetic", "adamerging"):
        backbone, learned, curve, notes = METHODS["concrete"].learn(
            ctx, _Setup(ctx), inner=inner, steps=2, batch_size=4, max_length=8, adamerging_steps=2)
        assert len(curve) == (2 if inner == "task_arithmetic" else 4)
        assert {k.split(".", 1)[0] for k in learned} == ({"mask_logits"} if inner == "task_arithmetic"
                                                          else {"mask_logits", "lambdas"})


@pytest.mark.parametrize("key", LEARNED)
def test_every_learning_method_builds_deterministically(setup, tmp_path, key):
    """Two builds with the same seed write byte-identical artifacts: backbone, learned tensors, curve, record."""
    ctx = setup
    method = METHODS[key]
    opts = {k: v for k, v in FAST.items() if k in method.defaults}
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        info = method.build(ctx, tmp_path / run, {}, **opts)
    for name in ("model.safetensors", "learned.safetensors", "curve.csv", "learned.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "curve.csv").read_text().splitlines()[0] == "step,loss"
    assert info["choice"]["options"]["steps"] == 3
    assert set(method.backbone(tmp_path / "a")) == set(ctx.pool.mergeable_keys())


def test_learning_options_are_checked(setup):
    ctx = setup
    with pytest.raises(MergeError, match="unknown option"):
        METHODS["adamerging"].resolve({"stepz": 3})
    with pytest.raises(MergeError, match="granularity"):
        METHODS["adamerging"].learn(ctx, _Setup(ctx), granularity="tensor", steps=1)


def test_regression_heads_are_left_out_of_entropy_and_said(tmp_path):
    base, experts = make_set(tmp_path, "bert", bare_backbone=True, num_labels=(2, 1))
    words = add_word_tokenizer(base)
    from transformers import AutoTokenizer

    pool = ExpertSet(base, experts)
    split = {n: ([" ".join(words[:3]), words[4]], [0, 1]) for n in pool.names}
    tp = TaskPool(pool, split, {n: "accuracy" for n in pool.names}, AutoTokenizer.from_pretrained(base), 2, 8)
    ctx = Context(pool, tp, {n: 1.0 for n in pool.names}, tp, progress=False)
    tasks, notes = _Setup(ctx).unsupervised_tasks(ctx)
    assert tasks == [0] and notes["not_learned_from"] == [pool.names[1]]


def test_curve_csv():
    assert curve_csv([1.5, 0.25]) == "step,loss\n0,1.5\n1,0.25\n"


def test_tta_rows_learn_from_test_inputs_only_when_asked_and_say_so(setup):
    """learn_on: test_inputs (the papers' protocol) learns from the given test texts, without labels; the
    method's data kind says test_inputs; the default learns from validation and never sees test texts."""
    import dataclasses

    ctx = setup
    method = METHODS["adamerging"]
    assert method.data({}, {"learn_on": "test_inputs"}) == "test_inputs"
    assert method.data({}, {}) == "validation_inputs"
    with pytest.raises(MergeError, match="no test inputs"):
        method.learn(ctx, _Setup(ctx), learn_on="test_inputs", steps=1)
    other = {n: [t + " w7" for t in texts] for n, (texts, _) in ctx.learn.split.items()}
    tta = dataclasses.replace(ctx, test_inputs=other)
    opts = dict(granularity="task", steps=2, batch_size=6, max_length=16)
    _, val, _, _ = method.learn(tta, _Setup(tta), **opts)
    _, test, _, _ = method.learn(tta, _Setup(tta), learn_on="test_inputs", **opts)
    _, val_again, _, _ = method.learn(ctx, _Setup(ctx), **opts)
    assert torch.equal(val["lambdas"], val_again["lambdas"])  # the test texts changed nothing by default
    assert not torch.equal(val["lambdas"], test["lambdas"])
