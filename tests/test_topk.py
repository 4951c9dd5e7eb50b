"""Grouped top-k and cached top-1 serving of `RoutedDeltaModel` equal the per-sample materialised merge.

Reference: for every sample b, theta_s + sum over its selected experts t of w_bt * v_t (renormalised top-k
weights), materialised as a plain HF model with the routed expert's head and run alone on its padded row.
Tiny random BERT (tests/tiny_models.py), four experts, unquantised (float32) factors, float64 model; the batch
mixes routes: several inputs per expert, one expert used by no input, padding, not sorted by expert.
"""
import dataclasses
import itertools

import pytest
import torch
from torch.func import functional_call

from test_routed import _batch, _pipeline
from tiny_models import make_set
from twinmerge.modelpool import assemble_classifier
from twinmerge.routed import RoutedDeltaModel, dense_delta_set, top_k_weights

TOL = 1e-5
FIRST = [2, 0, 2, 1, 0, 2, 1, 2]   # each sample's top expert: 2 has four inputs, expert 3 none
SECOND = [0, 1, 1, 0, 2, 0, 2, 1]  # its second expert (never 3 either: top-1 and top-2 leave expert 3 unused)


def _weights():
    """[8, 4] positive weights: 0.5 on FIRST, 0.3 on SECOND, 0.12 and 0.08 on the other two."""
    w = torch.zeros(len(FIRST), 4, dtype=torch.float64)
    for b, (a, c) in enumerate(zip(FIRST, SECOND)):
        rest = [t for t in range(4) if t not in (a, c)]
        w[b, [a, c, *rest]] = torch.tensor([0.5, 0.3, 0.12, 0.08], dtype=torch.float64)
    return w


@pytest.fixture(scope="module")
def lowrank(tmp_path_factory):
    """RoutedDeltaModel (float64) over compress_expert's float32 rank-25% factors of four tiny BERT experts."""
    tmp = tmp_path_factory.mktemp("topk")
    base, experts = make_set(tmp, "bert", bare_backbone=True, num_labels=(2, 3, 4, 2))
    return _pipeline(base, experts, tmp, ("fraction", 0.25), "float32")[0]


@pytest.fixture(scope="module")
def dense(lowrank):
    """The same deltas as dense delta sets (every 2-D delta a plain matrix: the dense code paths)."""
    sets = [dense_delta_set(f.expert, f.config, {n: _delta(f, n) for n in [*f.lowrank, *f.dense]}, f.head)
            for f in lowrank.factors]
    shared = assemble_classifier(lowrank.factors[0].config, {**lowrank.shared_state, **lowrank.factors[0].head})
    return RoutedDeltaModel(shared, sets, dtype=torch.float64)


def _delta(f, name):
    """v_t of tensor `name` in float64 (U S V^T from the float32 factors, or the dense delta)."""
    if name in f.lowrank:
        u, s, v = (x.double() for x in f.lowrank[name])
        return (u * s) @ v.T
    return f.dense[name].double()


def _reference(dyn, w, head, ids, mask):
    """(logits [C], last hidden state [L, d]) of theta_s + sum_t w_t v_t with expert `head`'s head, run alone."""
    params = {n: v + sum(float(w[t]) * _delta(f, n) for t, f in enumerate(dyn.factors) if float(w[t]) != 0
                         and (n in f.lowrank or n in f.dense))
              for n, v in dyn.shared_state.items() if not n.startswith("classifier.")}
    params.update({n: v.double() for n, v in dyn.factors[head].head.items()})
    model = assemble_classifier(dyn.factors[head].config, {n: v.float() for n, v in params.items()}).double()
    out = functional_call(model, params, (ids,), {"attention_mask": mask, "output_hidden_states": True})
    return out.logits[0], out.hidden_states[-1][0]


def _run(dyn, ids, mask, **kw):
    """DynamicOutput plus, in input order, the last hidden states [B, L, d] and the `_Group`s the layers saw."""
    seen = {}

    def hook(module, args, kwargs, output):
        ids_seen = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        seen["ids"], seen["hidden"], seen["groups"] = ids_seen, output.last_hidden_state, dyn.routing.groups

    handle = dyn.model.base_model.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            out = dyn(ids, mask, **kw)
    finally:
        handle.remove()
    rows = [int((seen["ids"] == ids[b]).all(1).nonzero()[0]) for b in range(ids.shape[0])]  # sorted -> input order
    return out, seen["hidden"][rows], seen["groups"]


def _check(dyn, ids, mask, out, hidden, w):
    for b in range(ids.shape[0]):
        logits, ref_hidden = _reference(dyn, w[b], FIRST[b], ids[b:b + 1], mask[b:b + 1])
        torch.testing.assert_close(out.per_sample()[b], logits, atol=TOL, rtol=0)
        torch.testing.assert_close(hidden[b], ref_hidden, atol=TOL, rtol=0)


def _inputs():
    ids, mask = _batch(seed=11, lengths=(7, 3, 9, 5, 9, 2, 6, 4))
    return ids.clamp(max=99), mask


def _count(group):
    return group.rows.stop - group.rows.start


def _segments(weights, k):
    """(expert, length) of the expected segments: each row's top-k experts in increasing order, the rows sorted
    lexicographically, then the maximal runs of equal experts in column 0, column 1, ..."""
    rows = sorted(tuple(sorted(r)) for r in weights.topk(k, dim=1).indices.tolist())
    return [(t, len(list(run))) for j in range(k) for t, run in itertools.groupby(r[j] for r in rows)]


@pytest.mark.parametrize("kind", ["lowrank", "dense"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_grouped_top_k_equals_per_sample_materialised(kind, k, request):
    dyn = request.getfixturevalue(kind)
    ids, mask = _inputs()
    w = top_k_weights(_weights(), k)[0]
    out, hidden, groups = _run(dyn, ids, mask, weights=_weights(), top_k=k)
    assert out.head_ids.tolist() == FIRST
    _check(dyn, ids, mask, out, hidden, w)
    # one GEMM pair per segment of contiguous samples sharing an expert; column 0: one per used expert; rows
    # with the same set of experts are contiguous, so column 1 has at most one segment per pair of experts used
    assert [(g.expert, _count(g)) for g in groups] == _segments(_weights(), k)
    firsts = [min(r) for r in _weights().topk(k, dim=1).indices.tolist()]
    assert [(g.expert, _count(g)) for g in groups if g.base] == [(t, firsts.count(t)) for t in sorted(set(firsts))]
    # here rows sort as (0,1) x2, (0,2) x3, (1,2) x3: column 1 is 1, 1, 2, ..., 2, two segments (by weight
    # order, (first, second) would be six distinct pairs, up to six segments)
    assert k != 2 or [(g.expert, _count(g)) for g in groups if not g.base] == [(1, 2), (2, 6)]
    assert all(g.scale is None for g in groups) == (k == 1) and not any(g.cached for g in groups)
    # weights that are already sparse (what `route(top_k=...)` returns) take the same grouped path
    sparse, _, _ = _run(dyn, ids, mask, weights=w)
    torch.testing.assert_close(sparse.logits, out.logits, atol=TOL, rtol=0)


def test_sparse_rows_with_fewer_experts(lowrank):
    """Already-sparse weights where some rows use one expert and others two: no segment for the empty slots."""
    ids, mask = _inputs()
    w = top_k_weights(_weights(), 2)[0]
    w[::2] = top_k_weights(_weights(), 1)[0][::2]
    out, hidden, groups = _run(lowrank, ids, mask, weights=w)
    assert all(g.scale is None or bool((g.scale != 0).all()) for g in groups)
    assert sum(_count(g) for g in groups) == int((w != 0).sum())
    _check(lowrank, ids, mask, out, hidden, w)


@pytest.mark.parametrize("kind", ["lowrank", "dense"])
def test_cached_top1_equals_per_sample_materialised(kind, request):
    dyn = request.getfixturevalue(kind)
    ids, mask = _inputs()
    w = top_k_weights(_weights(), 1)[0]
    try:
        dyn.expert_cache.resize(4)
        out, hidden, groups = _run(dyn, ids, mask, weights=_weights(), top_k=1)
        assert [g.cached for g in groups] == [True, True, True]
        assert list(dyn.expert_cache.experts) == [2, 0, 1]  # admitted largest group first
        d_linear = sum(m.weight.numel() + m.bias.numel() for m in dyn.expert_cache.linears)
        assert dyn.expert_cache.nbytes == 3 * 8 * d_linear
        _check(dyn, ids, mask, out, hidden, w)
        dyn.expert_cache.resize(1)  # one resident expert: its group cached, the others grouped low-rank
        out, hidden, groups = _run(dyn, ids, mask, weights=_weights(), top_k=1)
        assert [(g.expert, g.cached) for g in groups] == [(0, False), (1, False), (2, True)]
        assert list(dyn.expert_cache.experts) == [2]
        _check(dyn, ids, mask, out, hidden, w)
    finally:
        dyn.expert_cache.resize(0)
    assert dyn.expert_cache.nbytes == 0 and all(not m.cached for m in dyn.expert_cache.linears)


def test_cache_not_used_for_scaled_one_hot_weights(lowrank):
    """Top-1 rows whose weight is not 1 (sparse weights passed without top_k) stay on the grouped path."""
    ids, mask = _inputs()
    w = 0.5 * top_k_weights(_weights(), 1)[0]
    try:
        lowrank.expert_cache.resize(4)
        out, hidden, groups = _run(lowrank, ids, mask, weights=w)
        assert not any(g.cached for g in groups) and not lowrank.expert_cache.experts
        _check(lowrank, ids, mask, out, hidden, w)
    finally:
        lowrank.expert_cache.resize(0)


def test_expert_without_some_tensors(lowrank):
    """An expert that stores no delta of some 2-D tensors (a byte budget can drop them) gets an empty block (an
    embedding) or a bias-only block (a linear) in its own width, not padding to the widest expert: every path
    still equals the per-sample materialised merge."""
    dropped = {"bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight"}
    sets = [f if t != 2 else dataclasses.replace(f, lowrank={n: v for n, v in f.lowrank.items() if n not in dropped})
            for t, f in enumerate(lowrank.factors)]
    shared = assemble_classifier(sets[0].config, {**lowrank.shared_state, **sets[0].head})
    dyn = RoutedDeltaModel(shared, sets, dtype=torch.float64)
    words = dyn.model.get_submodule("bert.embeddings.word_embeddings")
    query = dyn.model.get_submodule("bert.encoder.layer.0.attention.self.query")
    assert words.offsets[3] == words.offsets[2] > words.offsets[1]  # expert 2: no columns; expert 1: its rank
    assert query.offsets[3] - query.offsets[2] == 8 < query.offsets[2] - query.offsets[1]  # bias column only
    ids, mask = _inputs()
    for k in (None, 2, 1):
        out, hidden, _ = _run(dyn, ids, mask, weights=_weights(), top_k=k)
        _check(dyn, ids, mask, out, hidden, _weights() if k is None else top_k_weights(_weights(), k)[0])
    dyn.expert_cache.resize(4)  # cached top-1: expert 2's materialised query is W_s + its bias delta only
    out, hidden, groups = _run(dyn, ids, mask, weights=_weights(), top_k=1)
    assert [g.cached for g in groups] == [True, True, True]
    _check(dyn, ids, mask, out, hidden, top_k_weights(_weights(), 1)[0])
