"""Decoder-only causal LMs in the routed-delta engine: per-sample theta_s + sum_t w_t v_t logits and generation.

`RoutedCausalLM` extends `twinmerge.routed.RoutedDeltaModel` (same delta sets, routing weights w [B, n] and
batched / grouped top-k / cached top-1 paths) to HF causal LMs: GPT-2 (`GPT2LMHeadModel`) and Llama /
Qwen2-style models (`LlamaForCausalLM`, `Qwen2ForCausalLM`). Factors are stored in each parameter's own
orientation. Besides nn.Linear / nn.Embedding / nn.LayerNorm (routed.py), modules with exclusive knowledge
become:
- transformers `Conv1D` (W [d_in, d_out], y = x W + b): a `DynamicLinear` over W^T [d_out, d_in] (a view of the
  same storage) with transposed deltas: v = U S V^T [d_in, d_out] gives v^T = V S U^T, so U and V swap roles
  (a dense D becomes D^T). Exact on every path, including the cached top-1 materialised GEMM.
- RMSNorm (y = g * (x * rsqrt(mean(x^2) + eps)), normalised in float32 and cast back to x's dtype, as HF does):
  per-sample g = g_s + sum_t w_t dg_t [B, d]. A module counts as one when its class name ends in "RMSNorm", it
  has `weight` and `variance_epsilon` (or `eps`), and it computes that formula on a probe input; other variants
  (Gemma's (1 + g) x / rms) are refused.
- tied output embedding (lm_head.weight is the input embedding E [V, d]): when E has exclusive knowledge, the
  lm_head becomes a `DynamicLinear` over E_s with the embedding's deltas (E is already in nn.Linear's
  [d_out, d_in] orientation): logits = h (E_s + sum_t w_t dE_t)^T, never the stale h E_s^T. An untied lm_head
  with its own delta is an ordinary dynamic linear. There is no classification head (delta sets hold none).

Generation (`RoutedCausalLM.generate`) runs HF's own `generate` (greedy or sampling, KV cache on) with the
routing set ONCE for the whole call: every decoding step of sample b uses theta_s + sum_t weights[b, t] v_t.
The weights are per input, computed once by the caller's router from the prompt's features (the router reads
the prompt once; generated tokens never re-route). Grouped / top-k batches are sorted by expert once, before
generate, and the returned sequences are put back in input order. Beam search and several sequences per
prompt (which grow the batch inside generate) are refused.
"""
import copy
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from twinmerge.errors import FactorError, InputError, TwinMergeError
from twinmerge.routed import (_SUPPORTED, DynamicEmbedding, DynamicLayerNorm, DynamicLinear, RoutedDeltaModel,
                              _per_sample, _stack_dense, exclusive_params)

_ROUTED = {nn.Linear: DynamicLinear, nn.Embedding: DynamicEmbedding, nn.LayerNorm: DynamicLayerNorm}


class _Deltas(NamedTuple):
    """The `lowrank` / `dense` entries of one expert's delta set that a dynamic module reads (a renamed or
    transposed view of an ExclusiveFactors)."""

    lowrank: dict
    dense: dict


def _view(factors, names, transpose=False):
    """Per expert, a `_Deltas` holding tensor names[target] under `target`; transpose: 2-D deltas transposed
    ((U, S, V) -> (V, S, U), dense D -> D^T)."""
    views = []
    for f in factors:
        lowrank, dense = {}, {}
        for target, source in names.items():
            if source in f.lowrank:
                u, s, v = f.lowrank[source]
                lowrank[target] = (v, s, u) if transpose else (u, s, v)
            elif source in f.dense:
                d = f.dense[source]
                dense[target] = d.T if transpose and d.dim() == 2 else d
        views.append(_Deltas(lowrank, dense))
    return views


class DynamicConv1D(DynamicLinear):
    """transformers' Conv1D (weight [d_in, d_out], y = x W + b) as a `DynamicLinear` over W^T [d_out, d_in] (same
    storage) and transposed deltas. Input [B, ..., d_in] -> [B, ..., d_out]."""

    def __init__(self, base, factors, name, routing):
        weight = nn.Parameter(base.weight.detach().T, requires_grad=base.weight.requires_grad)
        names = {f"{name}.weight": f"{name}.weight", f"{name}.bias": f"{name}.bias"}
        super().__init__(SimpleNamespace(weight=weight, bias=base.bias), _view(factors, names, True), name, routing)


def _rms(x, eps):
    """x * rsqrt(mean(x^2) + eps) over the last dimension, computed in float32, cast back to x's dtype."""
    xf = x.to(torch.float32)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rms_eps(module):
    """eps of an RMSNorm module (`variance_epsilon` as Llama / Qwen2, or `eps`), None when it has neither."""
    return getattr(module, "variance_epsilon", getattr(module, "eps", None))


@torch.no_grad()
def _is_rms_norm(module):
    """True when `module` computes weight * x * rsqrt(mean(x^2) + eps) on a seeded probe input [2, d]."""
    eps, weight = _rms_eps(module), getattr(module, "weight", None)
    if eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return False
    probe = torch.randn(2, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
    return bool(torch.allclose(module(probe), weight * _rms(probe, eps)))


class DynamicRMSNorm(nn.Module):
    """RMSNorm with per-sample weight g = g_s + w @ dg [B, d]: y = g * rms(x). Input [B, ..., d]."""

    def __init__(self, base, factors, name, routing):
        super().__init__()
        self.weight, self.eps, self.routing = base.weight, _rms_eps(base), routing
        dg = _stack_dense(factors, f"{name}.weight", tuple(base.weight.shape), base.weight.dtype)
        self.register_buffer("dg", dg, persistent=False)

    def forward(self, x):
        view = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
        return (self.weight + _per_sample(self.dg, self.routing)).view(view) * _rms(x, self.eps)


def _dynamic_class(path, module, names):
    """The dynamic module class replacing `module` (at `path`) whose parameters `names` have exclusive knowledge;
    TwinMergeError naming the module when none fits."""
    kind = type(module)
    if kind in _ROUTED and names <= set(_SUPPORTED[kind]):
        return _ROUTED[kind]
    if isinstance(module, Conv1D) and names <= {"weight", "bias"}:
        return DynamicConv1D
    if kind.__name__.endswith("RMSNorm") and names == {"weight"} and _is_rms_norm(module):
        return DynamicRMSNorm
    raise TwinMergeError(
        f"module {path} of type {kind.__name__} has exclusive knowledge ({', '.join(sorted(names))}); dynamic "
        "merging of causal LMs supports nn.Linear, nn.Embedding, nn.LayerNorm, Conv1D and RMSNorm "
        "(weight * x * rsqrt(mean(x^2) + eps))")


def _tied_head(model):
    """{output embedding path: input embedding path} when the output head's weight IS the input embedding's
    (tie_word_embeddings), else {}."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or getattr(out, "weight", None) is not inp.weight:
        return {}
    paths = {id(m): p for p, m in model.named_modules()}
    return {paths[id(out)]: paths[id(inp)]}


def _inputs(input_ids, attention_mask) -> dict:
    return {k: v for k, v in (("input_ids", input_ids), ("attention_mask", attention_mask)) if v is not None}


class RoutedCausalLM(RoutedDeltaModel):
    """Batched routed causal LM over the shared backbone `shared_model` (an HF *ForCausalLM / GPT2LMHeadModel
    holding theta_s, converted to `dtype` and modified IN PLACE) and one delta set per expert (`factors`, list
    order = weight column; no head tensors). cache_experts: `ExpertCache` capacity for top-1 batches."""

    def __init__(self, shared_model: PreTrainedModel, factors, dtype=torch.float32, cache_experts: int = 0):
        for f in factors:
            if f.head:
                raise FactorError(f"expert {f.expert!r}: a causal LM's delta set holds no head tensors, found "
                                  f"{', '.join(sorted(f.head))}")
        super().__init__(shared_model, factors, dtype, cache_experts)

    def _replace_modules(self):
        self.tied = _tied_head(self.model)
        params = exclusive_params(self.factors)
        for path, names in sorted(params.items()):
            if path in self.tied:
                raise FactorError(f"exclusive knowledge for {path}: its weight is tied to {self.tied[path]}, "
                                  "whose delta it uses; store the delta under the embedding's name only")
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                raise FactorError(f"exclusive knowledge for {path}: no such module in the shared model") from None
            self.model.set_submodule(path, _dynamic_class(path, module, names)(module, self.factors, path,
                                                                               self.routing))
        for head, emb in self.tied.items():
            if emb in params:
                self._tie_dynamic_head(head, emb)

    def _tie_dynamic_head(self, head, emb):
        """Replace the tied output head at `head` by a DynamicLinear over E_s with the embedding `emb`'s deltas."""
        module = self.model.get_submodule(head)
        if type(module) is not nn.Linear:
            raise TwinMergeError(f"output head {head} of type {type(module).__name__} is tied to {emb}, which has "
                                 "exclusive knowledge; a tied head must be an nn.Linear")
        deltas = _view(self.factors, {f"{head}.weight": f"{emb}.weight"})
        self.model.set_submodule(head, DynamicLinear(module, deltas, head, self.routing))

    def forward(self, input_ids, attention_mask, weights, top_k=None, **kw):
        """LM logits [B, L, V] of each sample b under theta_s + sum_t weights[b, t] v_t.

        input_ids, attention_mask: [B, L] (left or right padded); weights: [B, n]; top_k: keep each row's k
        largest weights, renormalised (`top_k_weights`). Batched, grouped or cached top-1 as
        `RoutedDeltaModel.forward`. kw: options of the HF forward that are not per-sample tensors."""
        self._check_weights(weights, input_ids.shape[0])
        return self._routed(lambda inputs: self.model(**inputs, **kw).logits, _inputs(input_ids, attention_mask),
                            weights, top_k)

    def generate(self, input_ids, attention_mask, weights, top_k=None, **generate_kwargs):
        """Sequences [B, L + new] from HF's `generate` (greedy or sampling, KV cache), sample b decoded with
        theta_s + sum_t weights[b, t] v_t at every step (routing set once, from the prompt's weights).

        input_ids, attention_mask: [B, L] prompts (left padded, as HF generation wants); weights: [B, n];
        top_k as `forward` (routing; HF's top-k sampling filter goes in a `generation_config`). generate_kwargs go
        to HF `generate`; beam search, num_return_sequences > 1 and return_dict_in_generate are refused (they
        change the batch or the output type)."""
        for key, plain in (("num_beams", 1), ("num_return_sequences", 1), ("return_dict_in_generate", False)):
            if generate_kwargs.get(key, plain) != plain:
                raise InputError(f"RoutedCausalLM.generate: {key}={generate_kwargs[key]!r} is not supported "
                                 f"(only {key}={plain!r})")
        self._check_weights(weights, input_ids.shape[0])
        return self._routed(lambda inputs: self.model.generate(**inputs, **generate_kwargs),
                            _inputs(input_ids, attention_mask), weights, top_k)

    def materialize(self, weights) -> PreTrainedModel:
        """An ordinary HF causal LM with theta_s + sum_t weights[t] v_t (weights [n]); a tied lm_head gets the
        merged embedding (the shared state's lm_head entry is the stale theta_s embedding)."""
        model = type(self.model)(copy.deepcopy(self.model.config)).to(self.dtype)
        state = self.merged_state(weights.to(self.dtype))
        for head, emb in self.tied.items():
            state[f"{head}.weight"] = state[f"{emb}.weight"]
        model.load_state_dict(state, strict=True)
        return model.eval()
