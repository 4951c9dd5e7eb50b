"""The routed-delta engine equals a per-sample materialised merge (torch.func.functional_call reference), for
low-rank and dense delta sets."""
import copy
from dataclasses import dataclass, field

import pytest
import torch
from torch.func import functional_call
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from twinmerge.routed import RoutedDeltaModel, top_k_weights
from twinmerge.errors import TwinMergeError

LABELS = (2, 3, 5, 1)  # different label counts, incl. a regression head
TOL = 1e-5


@dataclass
class Factors:
    """Same fields as twinmerge.exclusive.ExclusiveFactors (format twinmerge-exclusive/1)."""

    expert: str
    config: dict
    lowrank: dict = field(default_factory=dict)
    dense: dict = field(default_factory=dict)
    head: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def delta(self, name):
        if name in self.lowrank:
            u, s, v = self.lowrank[name]
            return (u * s) @ v.T
        return self.dense[name]


def _pool(arch, rank):
    """(shared model theta_s = base + 0.3 sum tau, expert models, factors of v_t = theta_t - theta_s)."""
    torch.manual_seed(0)
    kw = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
              max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg_cls, model_cls = {"bert": (BertConfig, BertForSequenceClassification),
                          "roberta": (RobertaConfig, RobertaForSequenceClassification)}[arch]
    base = model_cls(cfg_cls(**kw, num_labels=2)).double().eval()
    experts = []
    for labels in LABELS:
        expert = model_cls(cfg_cls(**kw, num_labels=labels)).double().eval()
        state = {n: v + 0.05 * torch.randn_like(v) if v.is_floating_point() and "classifier" not in n else v
                 for n, v in base.state_dict().items() if "classifier" not in n}
        expert.load_state_dict(state, strict=False)
        experts.append(expert)
    base_state = base.state_dict()
    names = [n for n, v in base_state.items() if v.is_floating_point() and "classifier" not in n]
    shared_state = {n: base_state[n] + 0.3 * sum(e.state_dict()[n] - base_state[n] for e in experts) for n in names}
    shared = copy.deepcopy(base)
    shared.load_state_dict(shared_state, strict=False)
    factors = []
    for t, expert in enumerate(experts):
        f = Factors(f"e{t}", expert.config.to_dict())
        es = expert.state_dict()
        for n in names:
            v = es[n] - shared_state[n]
            if v.dim() == 2 and rank != "full":
                u, s, vh = torch.linalg.svd(v, full_matrices=False)
                r = rank + t % 2  # different ranks per expert exercise zero-padding
                f.lowrank[n] = (u[:, :r].float(), s[:r].float(), vh[:r].T.float())
            else:
                f.dense[n] = v
        f.head = {n: v for n, v in es.items() if "classifier" in n}
        factors.append(f)
    return shared, experts, factors


@pytest.fixture(scope="module", params=[("bert", 3), ("roberta", 3), ("bert", "full")],
                ids=["bert-lowrank", "roberta-lowrank", "bert-dense"])
def pool(request):
    """Low-rank delta sets (Twin-Merging's factors) or dense ones (layer-wise merging, EMR's masked deltas)."""
    return _pool(*request.param)


def _batch(seed=1, lengths=(7, 3, 9, 5, 9, 2)):
    g = torch.Generator().manual_seed(seed)
    batch, length = len(lengths), max(lengths)
    ids = torch.randint(3, 50, (batch, length), generator=g)
    mask = (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 1), mask


def _reference(experts, factors, shared_state, w, head, ids, mask):
    """Expert `head`'s model run with theta_s + sum_t w_t v_t (its own head), sample by sample."""
    params = {n: v + sum(float(w[t]) * f.delta(n).to(v.dtype) for t, f in enumerate(factors)
                         if n in f.lowrank or n in f.dense)
              for n, v in shared_state.items() if "classifier" not in n}
    return functional_call(experts[head], params, (ids,), {"attention_mask": mask}).logits[0]


def _check(dyn, experts, factors, shared_state, out, weights, heads, ids, mask, tol=TOL):
    for b in range(ids.shape[0]):
        ref = _reference(experts, factors, shared_state, weights[b], int(heads[b]), ids[b:b + 1], mask[b:b + 1])
        got = out.per_sample()[b]
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref.to(got.dtype), atol=tol, rtol=0)
        assert torch.isinf(out.logits[b, len(ref):]).all()


def _dynamic(pool, dtype=torch.float64):
    shared, experts, factors = pool
    state = dict(shared.state_dict())  # float64 reference parameters
    return RoutedDeltaModel(copy.deepcopy(shared), factors, dtype=dtype), state


def test_mixed_weights_in_one_padded_batch(pool):
    dyn, state = _dynamic(pool)
    ids, mask = _batch()
    weights = torch.distributions.Dirichlet(torch.ones(len(LABELS))).sample((ids.shape[0],)).double()
    out = dyn(ids, mask, weights=weights)
    assert out.head_ids.tolist() == weights.argmax(1).tolist()
    assert out.num_labels.tolist() == [LABELS[h] for h in out.head_ids.tolist()]
    _check(dyn, pool[1], pool[2], state, out, weights, out.head_ids, ids, mask)
    for b in (0, 3):  # materialize() gives the same model
        ref = dyn.materialize(weights[b])(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0]
        torch.testing.assert_close(out.per_sample()[b], ref, atol=TOL, rtol=0)


def test_top_k_gathers_selected_experts(pool):
    dyn, state = _dynamic(pool)
    ids, mask = _batch(seed=2)
    weights = torch.rand(ids.shape[0], len(LABELS), dtype=torch.float64)
    out = dyn(ids, mask, weights=weights, top_k=2)
    kept, idx = weights.topk(2, dim=1)
    expected = torch.zeros_like(weights).scatter(1, idx, kept / kept.sum(1, keepdim=True))
    torch.testing.assert_close(top_k_weights(weights, 2)[0], expected)
    _check(dyn, pool[1], pool[2], state, out, expected, weights.argmax(1), ids, mask)


def test_one_hot_equals_compressed_expert(pool):
    dyn, state = _dynamic(pool)
    ids, mask = _batch(seed=3, lengths=(4, 8, 6, 8))
    weights = torch.eye(len(LABELS), dtype=torch.float64)
    out = dyn(ids, mask, weights=weights)
    _check(dyn, pool[1], pool[2], state, out, weights, torch.arange(len(LABELS)), ids, mask)
    out_k1 = dyn(ids, mask, weights=weights, top_k=1)
    torch.testing.assert_close(out_k1.logits, out.logits, atol=TOL, rtol=0)


def test_oracle_head_ids(pool):
    dyn, state = _dynamic(pool)
    ids, mask = _batch(seed=4)
    weights = torch.softmax(torch.randn(ids.shape[0], len(LABELS), dtype=torch.float64), 1)
    heads = (weights.argmax(1) + 1) % len(LABELS)
    out = dyn(ids, mask, weights=weights, head_ids=heads)
    assert out.head_ids.tolist() == heads.tolist()
    _check(dyn, pool[1], pool[2], state, out, weights, heads, ids, mask)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_full_rank_one_hot_reproduces_original_experts(arch):
    shared, experts, factors = _pool(arch, rank="full")
    dyn = RoutedDeltaModel(shared, factors, dtype=torch.float64)
    ids, mask = _batch(seed=5, lengths=(6, 3, 8, 5))
    out = dyn(ids, mask, weights=torch.eye(len(LABELS), dtype=torch.float64))
    for t, expert in enumerate(experts):
        ref = expert(input_ids=ids[t:t + 1], attention_mask=mask[t:t + 1]).logits[0]
        torch.testing.assert_close(out.per_sample()[t], ref, atol=TOL, rtol=0)


def test_float32(pool):
    dyn, state = _dynamic(pool, dtype=torch.float32)
    ids, mask = _batch(seed=6)
    weights = torch.softmax(torch.randn(ids.shape[0], len(LABELS)), 1)
    for top_k in (None, 2):
        out = dyn(ids, mask, weights=weights, top_k=top_k)
        assert out.logits.dtype == torch.float32
        w = weights if top_k is None else top_k_weights(weights, top_k)[0]
        _check(dyn, pool[1], pool[2], state, out, w.double(), weights.argmax(1), ids, mask, tol=1e-4)


def test_unsupported_module_type_names_module(pool):
    shared, _, factors = pool
    bad = copy.deepcopy(factors)
    prefix = shared.base_model_prefix
    bad[0].dense[f"{prefix}.encoder.layer.0.attention.self.scale"] = torch.ones(1)
    with pytest.raises(TwinMergeError, match=r"encoder\.layer\.0\.attention\.self of type \w+SelfAttention"):
        RoutedDeltaModel(copy.deepcopy(shared), bad)


def test_bad_weights_shape(pool):
    dyn, _ = _dynamic(pool)
    ids, mask = _batch()
    with pytest.raises(TwinMergeError, match="weights must have shape"):
        dyn(ids, mask, weights=torch.ones(ids.shape[0], 2))


def _assert_mixed_routing_equals_materialize(dyn, ids, mask):
    """Three samples with mixed weights, all experts and top-2: each equals its materialised model."""
    weights = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.1, 0.1, 0.8]], dtype=torch.float64)
    for top_k in (None, 2):
        out = dyn(ids, mask, weights=weights, top_k=top_k)
        w = weights if top_k is None else top_k_weights(weights, top_k)[0]
        for b in range(3):
            ref = dyn.materialize(w[b])(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0]
            torch.testing.assert_close(out.per_sample()[b], ref, atol=TOL, rtol=0)


def _pipeline(base, experts, tmp_path, rank_spec, factor_dtype):
    """The project's own path: ExpertSet -> Task Arithmetic theta_s -> factor files -> RoutedDeltaModel."""
    from twinmerge.exclusive import RankSpec, compress_expert, factor_metadata, load_factors, save_factors
    from twinmerge.io import ExpertSet
    from twinmerge.merge import build_shared_expert
    from twinmerge.modelpool import assemble_classifier

    es = ExpertSet(base, experts)
    shared_state, _ = build_shared_expert(es, "task_arithmetic", {"scaling": 0.3}, progress=False)
    factors = []
    for name in es.names:
        tensors, _ = compress_expert(es, shared_state, name, RankSpec(*rank_spec), factor_dtype, progress=False)
        config = es.experts[name].config
        path = save_factors(tmp_path / f"{name}.safetensors", tensors,
                           factor_metadata(name, config, RankSpec(*rank_spec), factor_dtype))
        factors.append(load_factors(path))
    heads = {k: es.expert_tensor(es.names[0], k) for k in es.head_keys()}
    shared = assemble_classifier(es.experts[es.names[0]].config, {**shared_state, **heads})
    return RoutedDeltaModel(shared, factors, dtype=torch.float64), es


@pytest.mark.parametrize("expert_set", ["tiny_bert", "tiny_roberta", "bert_mlm_base"])
def test_project_factor_files(expert_set, tmp_path, request):
    """Factor files from compress_expert: full rank + one-hot reproduces each expert loaded from its folder;
    low rank + mixed weights equals materialize(). BERT from a masked-LM base also has its pooler as a head."""
    from tiny_models import make_set
    from transformers import AutoModelForSequenceClassification

    if expert_set == "bert_mlm_base":
        base, experts = make_set(tmp_path, "bert", bare_backbone=False)
    else:
        base, experts = request.getfixturevalue(expert_set)
    ids, mask = _batch(seed=7, lengths=(5, 9, 3))
    ids = ids.clamp(max=99)
    dyn, es = _pipeline(base, experts, tmp_path, ("fraction", 1.0), "float32")
    out = dyn(ids, mask, weights=torch.eye(3, dtype=torch.float64))
    for t, folder in enumerate(experts.values()):
        ref = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        got = out.per_sample()[t]
        torch.testing.assert_close(got.float(), ref(input_ids=ids[t:t + 1], attention_mask=mask[t:t + 1]).logits[0],
                                   atol=TOL, rtol=0)
    dyn, _ = _pipeline(base, experts, tmp_path, ("fraction", 0.25), "float16")
    _assert_mixed_routing_equals_materialize(dyn, ids, mask)


@pytest.mark.parametrize("rank_spec", [("budget_bytes", 600), ("budget_fraction", 0.005)])
def test_budget_dropping_a_weight_in_every_expert(tiny_bert, tmp_path, rank_spec):
    """A small byte budget gives some 2-D weights rank 0 in EVERY expert while their bias deltas are stored:
    the dynamic model still builds and equals materialize() (all experts and top-2)."""
    dyn, es = _pipeline(*tiny_bert, tmp_path, rank_spec, "float32")
    dropped = [k for k in es.mergeable_keys() if k.endswith(".weight") and es.base_tensor(k).ndim == 2
               and not any(k in f.lowrank or k in f.dense for f in dyn.factors)
               and any(k[:-len("weight")] + "bias" in f.dense for f in dyn.factors)]
    assert dropped, "the budget should drop some weight in every expert"
    ids, mask = _batch(seed=3, lengths=(6, 4, 8))
    ids = ids.clamp(max=99)
    _assert_mixed_routing_equals_materialize(dyn, ids, mask)
