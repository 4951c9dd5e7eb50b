"""The routed-delta engine: per-sample theta*(x) = theta_s + sum_t w_t(x) v_t without building weights.

`RoutedDeltaModel` serves every routed method: a shared backbone theta_s, one delta set per expert and
per-sample weights w [B, n]. A delta set (`ExclusiveFactors`) holds low-rank deltas (Twin-Merging's SVD factors,
`lowrank`) and dense deltas (`dense`: layer-wise merging's per-expert upper layers, EMR-Merging's masked
deltas lambda_t * M_t * tau_uni expanded when loaded; build one with `dense_delta_set`), plus the expert's
head tensors and config.

Every Linear / Embedding / LayerNorm with exclusive knowledge in some expert is replaced by a dynamic module
that reads the routing weights w [B, n] of the current batch from a shared `_Routing` context:
- linear:    y = x W_s^T + b_s + sum_t w_t ((x V_t) * S_t) U_t^T + sum_t w_t db_t
- embedding: e = E_s[ids] + sum_t w_t (U_t[ids] * S_t) V_t^T
- LayerNorm: per-sample gamma = g_s + sum_t w_t dg_t, beta = b_s + sum_t w_t db_t
The rank-r_t factors of all experts are zero-padded to R = max_t r_t and concatenated along rank, so a layer
costs two matmuls over [.., n*R] (O(n R (d_in + d_out)) per token); with top-k routing each sample gathers
only its k experts' blocks (O(k R (d_in + d_out))). Dense 2-D deltas are used exactly as factors of rank
min(m, n) (U = D, V = I or U = I, V = D^T).

Top-k routing (`top_k_weights`) keeps each sample's k largest weights and RENORMALISES them to sum to 1 (so a
softmax row becomes the softmax over its k largest logits). `twinmerge.router.route` uses the same function.

Heads are never merged: every module owning `head.*` tensors (normally `classifier`) becomes a dispatcher
that runs each sample through its own expert's head: argmax of w (the router's choice), or given `head_ids`
(the paper's oracle protocol). Logits are returned padded to the largest label count with -inf, together
with each sample's label count (`DynamicOutput`).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from twinmerge.errors import FactorError, TwinMergeError
from twinmerge.exclusive import ExclusiveFactors

_SUPPORTED = {nn.Linear: ("weight", "bias"), nn.Embedding: ("weight",), nn.LayerNorm: ("weight", "bias")}


def top_k_weights(weights, k):
    """Keep each row's k largest entries of weights [B, n], zero the rest, renormalise rows to sum 1.

    Weights must be non-negative (mixture weights). Returns (dense [B, n], idx [B, k], kept [B, k]).
    """
    kept, idx = weights.topk(k, dim=1)
    total = kept.sum(dim=1, keepdim=True)
    if (total <= 0).any():
        raise TwinMergeError(f"top-{k} routing needs positive weights; a row's {k} largest weights sum to <= 0")
    kept = kept / total
    return torch.zeros_like(weights).scatter(1, idx, kept), idx, kept


class _Routing:
    """The current batch's routing, shared by all dynamic modules (set inside RoutedDeltaModel.forward).

    dense: [B, n] weights (zeros outside the top-k); idx, kept: [B, k] top-k experts and weights, or None for
    all experts; head_ids: [B] expert whose head each sample uses.
    """

    def __init__(self):
        self.dense = self.idx = self.kept = self.head_ids = None

    def rank_weights(self, rank):
        """Per-sample weights repeated over each rank block: [B, n*R] (all experts) or [B, k*R] (top-k)."""
        w = self.dense if self.idx is None else self.kept
        return w.repeat_interleave(rank, dim=1)


def _stack_factors(factors, name, shape, dtype):
    """Experts' factors of the 2-D tensor `name` [m, d] as (U*S [n, m, R], V [n, d, R]), zero-padded to R.

    R = 0 when no expert stores the tensor (a budget can drop a weight in every expert and keep its bias)."""
    pairs = []
    for f in factors:
        if name in f.lowrank:
            u, s, v = f.lowrank[name]
            pairs.append((u.to(dtype) * s.to(dtype), v.to(dtype)))
        elif name in f.dense:
            d = f.dense[name].to(dtype)
            eye = torch.eye(min(shape), dtype=dtype)
            pairs.append((d, eye) if shape[1] <= shape[0] else (eye, d.T))
        else:
            pairs.append(None)
    rank = max((p[0].shape[1] for p in pairs if p is not None), default=0)
    us, vs = torch.zeros(len(factors), shape[0], rank, dtype=dtype), torch.zeros(len(factors), shape[1], rank, dtype=dtype)
    for t, p in enumerate(pairs):
        if p is not None:
            us[t, :, : p[0].shape[1]], vs[t, :, : p[1].shape[1]] = p
    return us, vs


def _all_dense(factors, name):
    """True when some expert has a dense delta for the 2-D tensor `name` and none has factors (layer-wise
    merging's upper layers, EMR's masked deltas): then the delta runs as a plain matmul per expert group, not
    as factors of rank min(m, d)."""
    return any(name in f.dense for f in factors) and not any(name in f.lowrank for f in factors)


def _dense_groups(routing):
    """(column j, expert t, rows [B] bool) for every expert t that some sample keeps in its top-k column j."""
    for j in range(routing.idx.shape[1]):
        column = routing.idx[:, j]
        for t in column.unique().tolist():
            yield j, t, column == t


def _stack_dense(factors, name, shape, dtype):
    """Experts' dense deltas of the 1-D tensor `name` stacked as [n, d] (zeros where absent), or None."""
    if not any(name in f.dense for f in factors):
        return None
    return torch.stack([f.dense[name].to(dtype) if name in f.dense else torch.zeros(shape, dtype=dtype) for f in factors])


def _per_sample(delta, routing):
    """sum_t w_t delta_t for delta [n, d] -> [B, d]."""
    return routing.dense @ delta


class DynamicLinear(nn.Module):
    """nn.Linear with per-sample low-rank corrections. Input [B, ..., d_in] -> [B, ..., d_out].

    Buffers: v_cat [d_in, n*R] (expert t's V_t in columns t*R..), us_cat [n*R, d_out] (rows (U_t S_t)^T),
    db [n, d_out] bias deltas or None.
    """

    def __init__(self, base, factors, name, routing):
        super().__init__()
        self.weight, self.bias, self.routing = base.weight, base.bias, routing
        dtype, (d_out, d_in) = base.weight.dtype, base.weight.shape
        self.register_buffer("dense", None, persistent=False)
        if _all_dense(factors, f"{name}.weight"):  # [n, d_out, d_in]; no factors
            self.dense = _stack_dense(factors, f"{name}.weight", (d_out, d_in), dtype)
        us, vs = _stack_factors([] if self.dense is not None else factors, f"{name}.weight", (d_out, d_in), dtype)
        self.n, self.rank = len(factors), us.shape[2]
        self.register_buffer("v_cat", vs.permute(1, 0, 2).reshape(d_in, -1).contiguous(), persistent=False)
        self.register_buffer("us_cat", us.permute(0, 2, 1).reshape(-1, d_out).contiguous(), persistent=False)
        self.register_buffer("db", _stack_dense(factors, f"{name}.bias", (d_out,), dtype), persistent=False)

    def forward(self, x):
        r, batch = self.routing, x.shape[0]
        y = F.linear(x, self.weight, self.bias)
        x3 = x.reshape(batch, -1, x.shape[-1])
        if self.dense is not None:
            corr = self._dense_correction(x3, r)
        elif self.rank == 0:  # only bias deltas
            corr = y.new_zeros(batch, x3.shape[1], y.shape[-1])
        elif r.idx is None:
            h = (x3 @ self.v_cat) * r.rank_weights(self.rank)[:, None]
            corr = h @ self.us_cat
        else:
            k = r.idx.shape[1]
            v_sel = self.v_cat.view(-1, self.n, self.rank)[:, r.idx].permute(1, 0, 2, 3).reshape(batch, -1, k * self.rank)
            u_sel = self.us_cat.view(self.n, self.rank, -1)[r.idx].reshape(batch, k * self.rank, -1)
            corr = torch.bmm(torch.bmm(x3, v_sel) * r.rank_weights(self.rank)[:, None], u_sel)
        if self.db is not None:
            corr = corr + _per_sample(self.db, r)[:, None]
        return y + corr.reshape(y.shape)

    def _dense_correction(self, x3, r):
        """sum_t w_t x D_t^T [B, L, d_out]: all experts in one matmul against [n * d_out, d_in]; top-k as one
        matmul per (column, expert) group of samples."""
        n, d_out, d_in = self.dense.shape
        if r.idx is None:
            h = (x3 @ self.dense.reshape(n * d_out, d_in).T).view(*x3.shape[:2], n, d_out)
            return (h * r.dense[:, None, :, None]).sum(2)
        corr = x3.new_zeros(*x3.shape[:2], d_out)
        for j, t, rows in _dense_groups(r):
            corr[rows] += r.kept[rows, j, None, None] * (x3[rows] @ self.dense[t].T)
        return corr


class DynamicEmbedding(nn.Module):
    """nn.Embedding with per-sample low-rank corrections. ids [B, L] (or [1, L], broadcast) -> [B, L, d].

    Buffers: us_cat [num, n*R] (rows of U_t S_t, expert-major blocks), vt_cat [n*R, d] (V_t^T blocks).
    """

    def __init__(self, base, factors, name, routing):
        super().__init__()
        self.weight, self.padding_idx, self.routing = base.weight, base.padding_idx, routing
        shape, dtype = tuple(base.weight.shape), base.weight.dtype
        self.register_buffer("dense", None, persistent=False)
        if _all_dense(factors, f"{name}.weight"):  # [n, num, d]
            self.dense = _stack_dense(factors, f"{name}.weight", shape, dtype)
        us, vs = _stack_factors([] if self.dense is not None else factors, f"{name}.weight", shape, dtype)
        self.n, self.rank = len(factors), us.shape[2]
        self.register_buffer("us_cat", us.permute(1, 0, 2).reshape(base.weight.shape[0], -1).contiguous(), persistent=False)
        self.register_buffer("vt_cat", vs.permute(0, 2, 1).reshape(-1, base.weight.shape[1]).contiguous(), persistent=False)

    def forward(self, ids):
        r = self.routing
        batch = r.dense.shape[0]
        ids = ids.expand(batch, *ids.shape[1:])
        y = F.embedding(ids, self.weight, self.padding_idx)
        if self.dense is not None:
            return y + self._dense_correction(ids, r)
        if r.idx is None:
            corr = (F.embedding(ids, self.us_cat) * r.rank_weights(self.rank)[:, None]) @ self.vt_cat
        else:
            k = r.idx.shape[1]
            rows = self.us_cat.view(-1, self.n, self.rank)[ids[:, :, None], r.idx[:, None, :]]  # [B, L, k, R]
            vt_sel = self.vt_cat.view(self.n, self.rank, -1)[r.idx].reshape(batch, k * self.rank, -1)
            corr = torch.bmm(rows.reshape(batch, -1, k * self.rank) * r.rank_weights(self.rank)[:, None], vt_sel)
        return y + corr

    def _dense_correction(self, ids, r):
        """sum_t w_t D_t[ids] [B, L, d] (top-k: per (column, expert) group of samples)."""
        if r.idx is None:
            return torch.einsum("nbld,bn->bld", self.dense[:, ids], r.dense)
        corr = self.weight.new_zeros(*ids.shape, self.dense.shape[-1])
        for j, t, rows in _dense_groups(r):
            corr[rows] += r.kept[rows, j, None, None] * F.embedding(ids[rows], self.dense[t])
        return corr


class DynamicLayerNorm(nn.Module):
    """nn.LayerNorm with per-sample gamma/beta: g_s + w @ dg [B, d], b_s + w @ db. Input [B, ..., d]."""

    def __init__(self, base, factors, name, routing):
        super().__init__()
        self.weight, self.bias, self.routing = base.weight, base.bias, routing
        self.shape, self.eps = base.normalized_shape, base.eps
        dtype = base.weight.dtype
        self.register_buffer("dg", _stack_dense(factors, f"{name}.weight", self.shape, dtype), persistent=False)
        self.register_buffer("db", _stack_dense(factors, f"{name}.bias", self.shape, dtype), persistent=False)

    def forward(self, x):
        batch, view = x.shape[0], (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
        gamma = self.weight.expand(batch, -1) if self.dg is None else self.weight + _per_sample(self.dg, self.routing)
        beta = self.bias.expand(batch, -1) if self.db is None else self.bias + _per_sample(self.db, self.routing)
        return F.layer_norm(x, self.shape, None, None, self.eps) * gamma.view(view) + beta.view(view)


class HeadDispatcher(nn.Module):
    """Runs each sample through its expert's own copy of a head module: input [B, ...] -> [B, ..., C_max].

    Outputs of heads with fewer units C_t are padded with -inf on the last dimension.
    """

    def __init__(self, heads, routing):
        super().__init__()
        self.heads, self.routing = nn.ModuleList(heads), routing

    def forward(self, x, *args, **kwargs):
        head_ids = self.routing.head_ids
        outs = {int(t): self.heads[int(t)](x[head_ids == t], *args, **kwargs) for t in head_ids.unique()}
        width = max(o.shape[-1] for o in outs.values())
        first = next(iter(outs.values()))
        result = first.new_full((x.shape[0], *first.shape[1:-1], width), float("-inf"))
        for t, o in outs.items():
            result[head_ids == t] = F.pad(o, (0, width - o.shape[-1]), value=float("-inf"))
        return result


@dataclass
class DynamicOutput:
    """logits [B, C_max] (C_max = largest label count of all experts), -inf beyond each sample's
    num_labels [B]; head_ids [B] heads used."""

    logits: torch.Tensor
    num_labels: torch.Tensor
    head_ids: torch.Tensor

    def per_sample(self):
        """List of B unpadded logit vectors, sample b of length num_labels[b]."""
        return [row[:c] for row, c in zip(self.logits, self.num_labels.tolist())]


def _head_modules(model, head_names):
    """Top-most modules all of whose parameters are head tensors, covering every head tensor."""
    paths = set()
    for name in head_names:
        path = name.rsplit(".", 1)[0]
        if not all(f"{path}.{p}" in head_names for p, _ in model.get_submodule(path).named_parameters()):
            raise FactorError(f"head tensor {name}: module {path} also has shared (non-head) parameters")
        while "." in path:
            parent = path.rsplit(".", 1)[0]
            if not all(f"{parent}.{p}" in head_names for p, _ in model.get_submodule(parent).named_parameters()):
                break
            path = parent
        paths.add(path)
    return sorted(paths)


def _expert_config(model, config):
    return model.config.__class__.from_dict(config) if isinstance(config, dict) else config


def dense_delta_set(expert: str, config: dict, dense: dict[str, torch.Tensor],
                    head: dict[str, torch.Tensor]) -> ExclusiveFactors:
    """A delta set of dense deltas {canonical name: tensor} (2-D ones run as exact factors of rank min(m, d))."""
    return ExclusiveFactors(expert=expert, config=config, lowrank={}, dense=dict(dense), head=dict(head),
                            metadata={})


class RoutedDeltaModel(nn.Module):
    """Batched routed model over the shared backbone `shared_model` and one delta set per expert (`factors`).

    shared_model: an HF *ForSequenceClassification holding theta_s; it is converted to `dtype`, put in eval
    mode and its modules are replaced IN PLACE (the original weights are reused, not copied).
    factors: one ExclusiveFactors per expert (list order = expert index = routing weight column).
    """

    def __init__(self, shared_model: PreTrainedModel, factors, dtype=torch.float32):
        super().__init__()
        if not factors:
            raise FactorError("RoutedDeltaModel needs at least one expert's factors")
        self.model, self.factors, self.dtype = shared_model.to(dtype).eval(), list(factors), dtype
        self.routing = _Routing()
        self.shared_state = dict(self.model.state_dict())
        self.configs = [_expert_config(self.model, f.config) for f in self.factors]
        self.num_labels = torch.tensor([c.num_labels for c in self.configs])
        head_names = set(self.factors[0].head)
        self.head_paths = _head_modules(self.model, head_names)
        self._replace_modules()
        for path in self.head_paths:
            heads = [self._expert_head(t, path) for t in range(len(self.factors))]
            self.model.set_submodule(path, HeadDispatcher(heads, self.routing))

    def _replace_modules(self):
        params = {}
        for f in self.factors:
            for name in [*f.lowrank, *f.dense]:
                path, _, param = name.rpartition(".")
                params.setdefault(path, set()).add(param)
        for path, names in sorted(params.items()):
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                raise FactorError(f"exclusive knowledge for {path}: no such module in the shared model") from None
            kind = type(module)
            if kind not in _SUPPORTED or not names <= set(_SUPPORTED[kind]):
                raise TwinMergeError(
                    f"module {path} of type {kind.__name__} has exclusive knowledge ({', '.join(sorted(names))}); "
                    "dynamic merging supports nn.Linear, nn.Embedding, nn.LayerNorm")
            dynamic = {nn.Linear: DynamicLinear, nn.Embedding: DynamicEmbedding, nn.LayerNorm: DynamicLayerNorm}[kind]
            self.model.set_submodule(path, dynamic(module, self.factors, path, self.routing))

    def _expert_head(self, t, path):
        """Expert t's own copy of the head module at `path`, built from its config and `head.*` tensors."""
        with torch.device("meta"):
            head = type(self.model)(self.configs[t]).get_submodule(path)
        state = {n[len(path) + 1:]: v for n, v in self.factors[t].head.items() if n.startswith(path + ".")}
        head.load_state_dict({k: v.to(self.dtype) for k, v in state.items()}, strict=True, assign=True)
        return head.eval()

    def forward(self, input_ids, attention_mask, token_type_ids=None, weights=None, head_ids=None, top_k=None):
        """Logits of each sample b under theta_s + sum_t weights[b, t] v_t and head head_ids[b].

        input_ids, attention_mask, token_type_ids: [B, L]; weights: [B, n] routing weights; head_ids: [B]
        expert heads (oracle), default argmax of weights; top_k: keep each sample's k largest weights
        (renormalised, see `top_k_weights`) and compute only those experts. Returns DynamicOutput.
        """
        n = len(self.factors)
        if weights is None or weights.shape != (input_ids.shape[0], n):
            raise TwinMergeError(f"weights must have shape [batch, n_experts] = [{input_ids.shape[0]}, {n}]")
        weights = weights.to(self.dtype)
        head_ids = weights.argmax(dim=1) if head_ids is None else head_ids.long()
        r = self.routing
        if top_k is None or top_k >= n:
            r.dense, r.idx, r.kept = weights, None, None
        else:
            r.dense, r.idx, r.kept = top_k_weights(weights, top_k)
        r.head_ids = head_ids
        try:
            kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
            width = int(self.num_labels.max())  # same width for every batch, whatever heads it used
            logits = F.pad(logits, (0, width - logits.shape[-1]), value=float("-inf"))
        finally:
            r.dense = r.idx = r.kept = r.head_ids = None
        return DynamicOutput(logits, self.num_labels[head_ids], head_ids)

    def merged_state(self, weights):
        """theta_s + sum_t weights[t] v_t for every non-head tensor (v_t rebuilt from factors)."""
        state = {}
        for name, value in self.shared_state.items():
            value = value.clone()
            for w, f in zip(weights.tolist(), self.factors):
                if name in f.lowrank or name in f.dense:
                    value += w * f.delta(name).to(self.dtype)
            state[name] = value
        return state

    def materialize(self, weights, head_id=None) -> PreTrainedModel:
        """An ordinary HF model with theta_s + sum_t weights[t] v_t and expert head_id's head and config.

        weights: [n]; head_id default argmax(weights). Used for export and as the reference in tests.
        """
        head_id = int(weights.argmax()) if head_id is None else int(head_id)
        model = type(self.model)(self.configs[head_id]).to(self.dtype)
        state = {n: v for n, v in self.merged_state(weights.to(self.dtype)).items()
                 if not any(n.startswith(p + ".") for p in self.head_paths)}
        state.update({n: v.to(self.dtype) for n, v in self.factors[head_id].head.items()})
        model.load_state_dict(state, strict=True)
        return model.eval()
