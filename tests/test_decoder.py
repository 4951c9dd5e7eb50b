"""RoutedCausalLM (twinmerge/decoder.py) equals the per-sample materialised causal LM.

Tiny random GPT-2 (Conv1D, LayerNorm, tied lm_head), Llama (RMSNorm, GQA, untied or tied lm_head) and Qwen2
(q/k/v biases, tied lm_head) in float64; four experts = base + noise on every parameter (the tied embedding
too), theta_s = base + 0.3 sum tau, factors by SVD with a different rank per expert, or dense deltas. The
reference for sample b is `materialize(weights[b])` run (or generating) alone on its left-padded row.
"""
import copy
import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

from twinmerge.decoder import DynamicConv1D, DynamicRMSNorm, RoutedCausalLM
from twinmerge.errors import CheckpointError, FactorError, InputError, TwinMergeError
from twinmerge.exclusive import ExclusiveFactors
from twinmerge.routed import DynamicLinear, top_k_weights

TOL = 1e-5
VOCAB = 64
TOKENS = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=0)
LLAMA = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=64, **TOKENS)
ARCHS = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64, **TOKENS)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(num_key_value_heads=1, tie_word_embeddings=False, **LLAMA)),
    "llama-tied": lambda: LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **LLAMA)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True, **LLAMA)),
}
FIRST = [2, 0, 2, 1, 0, 2]   # each row's top expert (expert 3 unused by top-1 and top-2)
SECOND = [0, 1, 1, 0, 2, 0]
N = 4


def _base(arch, seed=0):
    torch.manual_seed(seed)
    return ARCHS[arch]().double().eval()


def _perturbed(model, seed, scale=0.05):
    """A copy of `model` with N(0, scale^2) noise on every parameter (a tied weight once)."""
    expert = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return expert


def _factors(expert, shared, t, kind):
    """Expert t's ExclusiveFactors of v = theta_t - theta_s: 2-D deltas as rank-(3 + t) SVD factors (lowrank)
    or dense (dense), 1-D deltas dense."""
    lowrank, dense = {}, {}
    ref = dict(shared.named_parameters())
    for name, p in expert.named_parameters():
        v = (p - ref[name]).detach()
        if v.dim() == 2 and kind == "lowrank":
            u, s, vh = torch.linalg.svd(v, full_matrices=False)
            lowrank[name] = (u[:, :3 + t], s[:3 + t], vh[:3 + t].T)
        else:
            dense[name] = v
    return ExclusiveFactors(f"e{t}", expert.config.to_dict(), lowrank, dense, {}, {})


def _pool(arch, kind):
    """(theta_s model, [ExclusiveFactors] of N experts)."""
    base = _base(arch)
    experts = [_perturbed(base, 1 + t) for t in range(N)]
    shared = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in shared.named_parameters():
            p.add_(0.3 * sum(dict(e.named_parameters())[name] - dict(base.named_parameters())[name] for e in experts))
    return shared, [_factors(e, shared, t, kind) for t, e in enumerate(experts)]


@pytest.fixture(scope="module", params=[(a, k) for a in ARCHS for k in ("lowrank", "dense")],
                ids=[f"{a}-{k}" for a in ARCHS for k in ("lowrank", "dense")])
def pool(request):
    return _pool(*request.param)


def _dynamic(pool, **kw):
    shared, factors = pool
    return RoutedCausalLM(copy.deepcopy(shared), factors, dtype=torch.float64, **kw)


def _batch(seed=1, lengths=(7, 3, 9, 5, 9, 2)):
    """Left-padded ids, mask [B, L] (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    length = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), length), generator=g)
    mask = (torch.arange(length)[None] >= length - torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def _weights():
    """[6, N]: 0.5 on FIRST, 0.3 on SECOND, 0.12 and 0.08 on the other two experts."""
    w = torch.zeros(len(FIRST), N, dtype=torch.float64)
    for b, (a, c) in enumerate(zip(FIRST, SECOND)):
        rest = [t for t in range(N) if t not in (a, c)]
        w[b, [a, c, *rest]] = torch.tensor([0.5, 0.3, 0.12, 0.08], dtype=torch.float64)
    return w


def _routed(top_k):
    return _weights() if top_k is None else top_k_weights(_weights(), top_k)[0]


def _check_logits(dyn, logits, w, ids, mask):
    for b in range(ids.shape[0]):
        ref = dyn.materialize(w[b])(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0]
        keep = mask[b].bool()
        torch.testing.assert_close(logits[b][keep], ref[keep], atol=TOL, rtol=0)


@pytest.mark.parametrize("top_k, cache", [(None, 0), (2, 0), (1, 0), (1, 4)],
                         ids=["all-experts", "top2-grouped", "top1-grouped", "top1-cached"])
def test_logits_equal_per_sample_materialised(pool, top_k, cache):
    dyn = _dynamic(pool, cache_experts=cache)
    ids, mask = _batch()
    with torch.inference_mode():
        logits = dyn(ids, mask, _weights(), top_k=top_k)
    assert logits.shape == (*ids.shape, VOCAB)
    assert list(dyn.expert_cache.experts) == ([2, 0, 1] if cache else [])
    _check_logits(dyn, logits, _routed(top_k), ids, mask)


def test_modules_replaced(pool):
    dyn = _dynamic(pool)
    kinds = {type(m) for m in dyn.model.modules()}
    assert DynamicLinear in kinds
    assert (DynamicConv1D in kinds) == isinstance(dyn.model, GPT2LMHeadModel)
    assert (DynamicRMSNorm in kinds) != isinstance(dyn.model, GPT2LMHeadModel)
    assert type(dyn.model.lm_head) is DynamicLinear and not dyn.head_paths


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("top_k, cache", [(None, 0), (1, 0), (2, 0), (1, 4)],
                         ids=["all-experts", "top1", "top2", "top1-cached"])
def test_greedy_generate_equals_per_sample(arch, top_k, cache):
    dyn = _dynamic(_pool(arch, "lowrank"), cache_experts=cache)
    ids, mask = _batch(seed=2)
    out = dyn.generate(ids, mask, _weights(), top_k=top_k, max_new_tokens=8, do_sample=False)
    assert out.shape == (ids.shape[0], ids.shape[1] + 8)
    w = _routed(top_k)
    for b in range(ids.shape[0]):
        ref = dyn.materialize(w[b]).generate(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1],
                                             max_new_tokens=8, do_sample=False)
        assert out[b].tolist() == ref[0].tolist()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sampling_with_seed_equals_materialised(arch):
    """Sampling draws one random stream per batch: one row at a time (mixed weights, top-1), and whole batches
    sharing one route (batched path; grouped top-1 path), equal HF generate of the materialised model."""
    dyn = _dynamic(_pool(arch, "lowrank"))
    ids, mask = _batch(seed=3)
    sample = dict(max_new_tokens=8, do_sample=True, temperature=1.5)
    for top_k in (None, 1):
        w = _routed(top_k)
        for b in (0, 1, 3):
            merged = dyn.materialize(w[b])  # before seeding: building a model draws random numbers
            torch.manual_seed(b)
            got = dyn.generate(ids[b:b + 1], mask[b:b + 1], _weights()[b:b + 1], top_k=top_k, **sample)
            torch.manual_seed(b)
            ref = merged.generate(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], **sample)
            assert got.tolist() == ref.tolist()
    for w in (_weights()[:1], torch.eye(N, dtype=torch.float64)[2:3]):
        merged = dyn.materialize(w[0])
        torch.manual_seed(7)
        got = dyn.generate(ids, mask, w.expand(ids.shape[0], -1), **sample)
        torch.manual_seed(7)
        assert got.tolist() == merged.generate(input_ids=ids, attention_mask=mask, **sample).tolist()


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_tied_lm_head_is_dynamic(arch):
    """logits = h (E_s + sum_t w_t dE_t)^T: not the stale shared embedding; materialize ties the merged one."""
    shared, factors = _pool(arch, "lowrank")
    emb_name = "transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"
    dyn = RoutedCausalLM(copy.deepcopy(shared), factors, dtype=torch.float64)
    assert dyn.tied == {"lm_head": emb_name.rsplit(".", 1)[0]}
    ids, mask = _batch(seed=4)
    w = _weights()
    with torch.inference_mode():
        logits = dyn(ids, mask, w)
    merged = dyn.materialize(w[0])
    assert merged.lm_head.weight is merged.get_input_embeddings().weight
    expected = dyn.shared_state[emb_name] + sum(float(w[0, t]) * f.delta(emb_name).double()
                                                for t, f in enumerate(factors))
    torch.testing.assert_close(merged.lm_head.weight.detach(), expected, atol=1e-6, rtol=0)
    stale = dyn.materialize(w[0])
    stale.lm_head.weight = torch.nn.Parameter(dyn.shared_state[emb_name].clone())  # untied, theta_s head
    with torch.inference_mode():
        ref = merged(input_ids=ids[:1], attention_mask=mask[:1]).logits[0]
        wrong = stale(input_ids=ids[:1], attention_mask=mask[:1]).logits[0]
    keep = mask[0].bool()
    torch.testing.assert_close(logits[0][keep], ref[keep], atol=TOL, rtol=0)
    assert (logits[0][keep] - wrong[keep]).abs().max() > 1e-2


def test_unsupported_modules_are_one_clear_error():
    shared, factors = _pool("llama", "dense")
    gemma = copy.deepcopy(shared)
    gemma.model.norm = GemmaRMSNorm(16).double()  # (1 + weight) * x / rms: not the supported formula
    with pytest.raises(TwinMergeError, match=r"^module model\.norm of type GemmaRMSNorm has exclusive knowledge"):
        RoutedCausalLM(gemma, factors, dtype=torch.float64)
    bad = copy.deepcopy(factors)
    bad[1].dense["model.rotary_emb.inv_freq"] = torch.ones(4)
    with pytest.raises(TwinMergeError, match=r"model\.rotary_emb of type LlamaRotaryEmbedding"):
        RoutedCausalLM(copy.deepcopy(shared), bad, dtype=torch.float64)
    tied, tied_factors = _pool("llama-tied", "dense")
    tied_factors[0].dense["lm_head.weight"] = torch.zeros(VOCAB, 16, dtype=torch.float64)
    with pytest.raises(FactorError, match=r"lm_head: its weight is tied to model\.embed_tokens"):
        RoutedCausalLM(tied, tied_factors, dtype=torch.float64)
    dyn = RoutedCausalLM(copy.deepcopy(shared), factors, dtype=torch.float64)
    ids, mask = _batch()
    with pytest.raises(InputError, match="num_beams=2 is not supported"):
        dyn.generate(ids, mask, _weights(), num_beams=2)
    with pytest.raises(TwinMergeError, match="weights must have shape"):
        dyn(ids, mask, torch.ones(ids.shape[0], 2))


# --- the project's own path: saved checkpoints -> ExpertSet -> theta_s -> compress_expert -> factor files ---

def _save_set(tmp, arch, n_layer=None):
    """Save a tiny `arch` base and three perturbed experts (float32, save_pretrained); (base, {name: folder})."""
    base = _base(arch).float()
    base.save_pretrained(tmp / "base")
    experts = {}
    for t in range(3):
        experts[f"e{t}"] = tmp / f"e{t}"
        _perturbed(base, 10 + t, scale=0.05).save_pretrained(experts[f"e{t}"])
    return tmp / "base", experts


def _project_model(base, experts, tmp, rank_spec):
    """RoutedCausalLM (float64) over compress_expert's float32 factor files, theta_s by Task Arithmetic."""
    from twinmerge.exclusive import RankSpec, compress_expert, factor_metadata, load_factors, save_factors
    from twinmerge.io import ExpertSet
    from twinmerge.merge import build_shared_expert

    es = ExpertSet(base, experts)
    shared_state, _ = build_shared_expert(es, "task_arithmetic", {"scaling": 0.3}, progress=False)
    factors = []
    for name in es.names:
        tensors, _ = compress_expert(es, shared_state, name, RankSpec(*rank_spec), "float32", progress=False)
        meta = factor_metadata(name, es.experts[name].config, RankSpec(*rank_spec), "float32")
        factors.append(load_factors(save_factors(tmp / f"{name}-{rank_spec[1]}.safetensors", tensors, meta)))
    shared = AutoModelForCausalLM.from_pretrained(base)  # base-only tensors (an untied LoRA lm_head) stay
    missing, unexpected = shared.load_state_dict(shared_state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return RoutedCausalLM(shared, factors, dtype=torch.float64)


@pytest.mark.parametrize("arch", ["gpt2", "llama-tied"])
def test_project_factor_files(arch, tmp_path):
    """Full rank + one-hot reproduces each saved expert; rank 25% + mixed / top-2 weights equals materialize,
    for logits and greedy generation."""
    base, experts = _save_set(tmp_path, arch)
    ids, mask = _batch(seed=5, lengths=(6, 3, 8))
    dyn = _project_model(base, experts, tmp_path, ("fraction", 1.0))
    with torch.inference_mode():
        logits = dyn(ids, mask, torch.eye(3, dtype=torch.float64))
    for t, folder in enumerate(experts.values()):
        ref = AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=ids[t:t + 1],
                                                                  attention_mask=mask[t:t + 1]).logits[0]
        keep = mask[t].bool()
        torch.testing.assert_close(logits[t][keep].float(), ref[keep], atol=1e-4, rtol=0)
    dyn = _project_model(base, experts, tmp_path, ("fraction", 0.25))
    assert any(f.lowrank for f in dyn.factors)
    w = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.1, 0.1, 0.8]], dtype=torch.float64)
    for top_k in (None, 2):
        with torch.inference_mode():
            logits = dyn(ids, mask, w, top_k=top_k)
        _check_logits(dyn, logits, w if top_k is None else top_k_weights(w, top_k)[0], ids, mask)
    out = dyn.generate(ids, mask, w, top_k=1, max_new_tokens=6, do_sample=False)
    for b in range(3):
        ref = dyn.materialize(top_k_weights(w, 1)[0][b]).generate(
            input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], max_new_tokens=6, do_sample=False)
        assert out[b].tolist() == ref[0].tolist()


def test_expert_set_refuses_other_gpt2_depth(tmp_path):
    from twinmerge.io import ExpertSet

    base, experts = _save_set(tmp_path, "gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=3, n_head=2, n_positions=64, **TOKENS)).save_pretrained(
        tmp_path / "deep")
    with pytest.raises(CheckpointError, match=r"expert 'deep' .*: config n_layer=3 differs from base .* n_layer=2"):
        ExpertSet(base, {**experts, "deep": tmp_path / "deep"})


def test_peft_lora_llama_experts(tmp_path):
    """PEFT LoRA adapters (q_proj, v_proj) on a tiny Llama, read as experts (twinmerge/lora.py): full-rank
    factors with one-hot weights reproduce each PEFT-merged expert; greedy generation equals materialize."""
    from peft import LoraConfig, get_peft_model

    base = _save_set(tmp_path, "llama")[0]
    adapters, merged = {}, []
    for t in range(3):
        torch.manual_seed(20 + t)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                    LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, lora_dropout=0.0,
                                               target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for _, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn_like(p))
        adapters[f"l{t}"] = tmp_path / f"l{t}"
        peft_model.save_pretrained(adapters[f"l{t}"])
        merged.append(peft_model.merge_and_unload().eval())
    assert json.loads((adapters["l0"] / "adapter_config.json").read_text())["peft_type"] == "LORA"
    dyn = _project_model(base, adapters, tmp_path, ("fraction", 1.0))
    assert {n.rsplit(".", 2)[-2] for f in dyn.factors for n in f.names()} == {"q_proj", "v_proj"}
    ids, mask = _batch(seed=6, lengths=(6, 3, 8))
    with torch.inference_mode():
        logits = dyn(ids, mask, torch.eye(3, dtype=torch.float64))
    for t, model in enumerate(merged):
        keep = mask[t].bool()
        ref = model(input_ids=ids[t:t + 1], attention_mask=mask[t:t + 1]).logits[0]
        torch.testing.assert_close(logits[t][keep].float(), ref[keep], atol=1e-4, rtol=0)
    w = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.1, 0.1, 0.8]], dtype=torch.float64)
    out = dyn.generate(ids, mask, w, max_new_tokens=6, do_sample=False)
    for b in range(3):
        ref = dyn.materialize(w[b]).generate(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1],
                                             max_new_tokens=6, do_sample=False)
        assert out[b].tolist() == ref[0].tolist()
