"""The routed-delta engine: per-sample theta*(x) = theta_s + sum_t w_t(x) v_t without building weights.

`RoutedDeltaModel` serves every routed method: a shared backbone theta_s, one delta set per expert and
per-sample weights w [B, n]. A delta set (`ExclusiveFactors`) holds low-rank deltas (Twin-Merging's SVD factors,
`lowrank`) and dense deltas (`dense`: layer-wise merging's per-expert upper layers, EMR-Merging's masked
deltas lambda_t * M_t * tau_uni expanded when loaded; build one with `dense_delta_set`), plus the expert's
head tensors and config.

Every Linear / Embedding / LayerNorm with exclusive knowledge in some expert is replaced by a dynamic module
that reads the routing of the current batch from a shared `_Routing` context:
- linear:    y = x W_s^T + b_s + sum_t w_t ((x V_t) * S_t) U_t^T + sum_t w_t db_t
- embedding: e = E_s[ids] + sum_t w_t (U_t[ids] * S_t) V_t^T
- LayerNorm: per-sample gamma = g_s + sum_t w_t dg_t, beta = b_s + sum_t w_t db_t
The experts' factors sit side by side, expert t's block as wide as its own rank r_t (`_Blocks`); a linear's
bias deltas ride in the same GEMM as one extra column per block, and a linear's blocks are rounded up to a
multiple of 8 columns (see `DynamicLinear`). Dense 2-D deltas are used exactly as factors of
rank min(m, n) (U = D, V = I or U = I, V = D^T) when other experts store factors of the same tensor, and as
plain matmuls when every expert stores it dense.

Three ways to run a batch, chosen in `RoutedDeltaModel.forward` (k = most nonzero weights in a row):
- batched (k = n, every expert): the factors of all experts are concatenated along rank, so a linear costs two
  GEMMs over [.., sum_t r_t'] columns (r_t' = expert t's block width): O(sum_t r_t (d_in + d_out)) per token
  on top of the static O(d_in d_out).
- grouped (k < n: top-k routing, or weights that are already sparse): each sample's k experts are sorted
  (by expert index when k > 1, so samples using the same set of experts are adjacent) and the batch is sorted
  by them, so every top-k column splits into segments of contiguous samples sharing one expert (`_Group`;
  column 0: one per expert, column 1: at most one per pair of experts, ...). A linear runs the base GEMM
  once, then ONE GEMM pair x[seg] V_t, (. * w) (U_t S_t)^T per segment, added in place into the segment's
  rows, as multi-LoRA servers do (punica's segmented SGMV, S-LoRA): O(k r_t (d_in + d_out)) per token, no
  gather, no scatter, no work for unused experts. (Gathering each expert's column-1 samples into one group
  instead, index_select + index_add_, measured slower on the real bundle: top-2 0.65x the static model
  against 0.67x for these segments.)
- cached top-1 (k = 1, weights 1, `ExpertCache` capacity > 0): a group whose expert is resident runs each
  Linear as one plain GEMM with the materialised W_s + delta_t, i.e. at the static model's speed.
The grouped and cached paths write into preallocated outputs (out=, in place; a copy while autograd records).

Top-k routing (`top_k_weights`) keeps each sample's k largest weights and RENORMALISES them to sum to 1 (so a
softmax row becomes the softmax over its k largest logits). `twinmerge.router.route` uses the same function.

Heads are never merged: every module owning `head.*` tensors (normally `classifier`) becomes a dispatcher
that runs each sample through its own expert's head: argmax of w (the router's choice), or given `head_ids`
(the paper's oracle protocol). Logits are returned padded to the largest label count with -inf, together
with each sample's label count (`DynamicOutput`).
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

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


class _Group(NamedTuple):
    """A segment of the expert-sorted batch: contiguous samples `rows` (a slice) using expert `expert` in one
    top-k column. scale: their weights [b, 1, 1], None when all are 1 (top-1). base: a column-0 segment (they
    tile the batch; a linear computes their base output x W^T + b per segment when some segment is cached, else
    once for the batch); cached: Linear modules use the expert's materialised weights (no correction)."""

    expert: int
    rows: slice
    scale: torch.Tensor | None
    base: bool
    cached: bool


def _lexsort(idx):
    """Order [B] sorting the rows of idx [B, k] lexicographically (stable sorts, last column first): then every
    top-k column is piecewise constant, so each column splits into contiguous segments."""
    order = torch.arange(idx.shape[0])
    for j in reversed(range(idx.shape[1])):
        order = order[idx[order, j].argsort(stable=True)]
    return order


def _groups(idx, kept, n, cached=frozenset()):
    """The `_Group`s of a batch sorted by `_lexsort(idx)`: one per maximal run of equal idx[:, j] in column j
    (punica's SGMV segments). idx, kept [B, k]: experts and weights; in columns j >= 1 a weight-0 entry has
    expert n, which sorts last and forms no group. `cached`: experts whose column-0 segments run materialised."""
    groups = []
    for j in range(idx.shape[1]):
        column = idx[:, j].tolist()
        starts = [b for b in range(len(column)) if b == 0 or column[b] != column[b - 1]]
        for start, stop in zip(starts, starts[1:] + [len(column)]):
            t = column[start]
            if t < n:
                w = kept[start:stop, j]
                scale = None if bool((w == 1).all()) else w[:, None, None]
                groups.append(_Group(t, slice(start, stop), scale, j == 0, j == 0 and t in cached))
    return groups


def _tokens(rows, length):
    """Rows of a [B * length, d] view holding samples `rows` (a slice)."""
    return slice(rows.start * length, rows.stop * length)


def _scaled(h, scale):
    """h [b*L, k] with sample i's rows multiplied by scale[i] (scale [b, 1, 1]; None: h itself), in place."""
    if scale is not None:
        h.view(scale.shape[0], -1, h.shape[-1]).mul_(scale)
    return h


class _Routing:
    """The current batch's routing, shared by all dynamic modules (set inside RoutedDeltaModel.forward).

    dense: [B, n] weights (zeros for experts a sample does not use); groups: None (batched path, every expert)
    or the batch's `_Group`s (grouped path; the batch is then sorted by its experts); head_ids: [B] expert whose
    head each sample uses.
    """

    def __init__(self):
        self.dense = self.groups = self.head_ids = None

    def column_weights(self, experts):
        """Per-sample weights of each factor column's expert (experts [W]): [B, W]."""
        return self.dense.index_select(1, experts)


def _expert_factors(factors, name, shape, dtype):
    """Per expert, (U S [m, r_t], V [d, r_t]) of the 2-D tensor `name` [m, d] (a dense delta D as exact factors
    of rank min(m, d)), or None when it does not store the tensor."""
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
    return pairs


def _blocks(factors, name, shape, dtype, db=None, multiple=1):
    """Experts' factors of the 2-D tensor `name` [m, d] side by side: (U S [m, W], V [d, W], widths [n]).

    Expert t's block is its r_t columns U_t S_t, V_t (none when it does not store the tensor: a budget can
    drop a weight in every expert and keep its bias), zero columns, and, when bias deltas db [n, m] are given,
    a last column U S = db_t, V = 0; its width r_t' is r_t (+ 1) rounded up to `multiple`, W = sum_t r_t'."""
    us_blocks, v_blocks = [torch.zeros(shape[0], 0, dtype=dtype)], [torch.zeros(shape[1], 0, dtype=dtype)]
    widths = []
    for t, pair in enumerate(_expert_factors(factors, name, shape, dtype)):
        r = 0 if pair is None else pair[0].shape[1]
        width = -(-(r + (db is not None)) // multiple) * multiple
        us, v = torch.zeros(shape[0], width, dtype=dtype), torch.zeros(shape[1], width, dtype=dtype)
        if pair is not None:
            us[:, :r], v[:, :r] = pair
        if db is not None:
            us[:, -1] = db[t]
        us_blocks.append(us)
        v_blocks.append(v)
        widths.append(width)
    return torch.cat(us_blocks, 1), torch.cat(v_blocks, 1), widths


class _Blocks:
    """Mixin of a dynamic module whose experts' rank components sit side by side (`_blocks`): expert t's are
    offsets[t]:offsets[t + 1] (`_block(t)`); buffer `col_expert` [W] names each component's expert (for
    `_Routing.column_weights`)."""

    def _set_blocks(self, widths):
        self.offsets = [0]
        for w in widths:
            self.offsets.append(self.offsets[-1] + w)
        experts = torch.arange(len(widths)).repeat_interleave(torch.tensor(widths, dtype=torch.long))
        self.register_buffer("col_expert", experts, persistent=False)

    def _block(self, t):
        """Expert t's rank components (columns of U S and V)."""
        return slice(self.offsets[t], self.offsets[t + 1])


def _all_dense(factors, name):
    """True when some expert has a dense delta for the 2-D tensor `name` and none has factors (layer-wise
    merging's upper layers, EMR's masked deltas): then the delta runs as a plain matmul per expert group, not
    as factors of rank min(m, d)."""
    return any(name in f.dense for f in factors) and not any(name in f.lowrank for f in factors)


def _stack_dense(factors, name, shape, dtype):
    """Experts' dense deltas of the 1-D tensor `name` stacked as [n, d] (zeros where absent), or None."""
    if not any(name in f.dense for f in factors):
        return None
    return torch.stack([f.dense[name].to(dtype) if name in f.dense else torch.zeros(shape, dtype=dtype) for f in factors])


def _per_sample(delta, routing):
    """sum_t w_t delta_t for delta [n, d] -> [B, d]."""
    return routing.dense @ delta


def _linear_into(out2, x2, weight, bias):
    """out2 (a contiguous [N, d_out] view) = x2 [N, d_in] @ weight^T + bias, written in place (by the GEMM
    itself, or by a copy while autograd records, as out= does not support it)."""
    if torch.is_grad_enabled() and (x2.requires_grad or weight.requires_grad):
        out2.copy_(F.linear(x2, weight, bias))
    elif bias is None:
        torch.mm(x2, weight.T, out=out2)
    else:
        torch.addmm(bias, x2, weight.T, out=out2)


class DynamicLinear(nn.Module, _Blocks):
    """nn.Linear with per-sample corrections. Input [B, ..., d_in] -> [B, ..., d_out].

    Low-rank buffers: vt_cat [W, d_in] (rows V_t^T; expert t's block of rows `_block(t)` is contiguous, so the
    GEMM takes it without a copy, which a column slice of V [d_in, W] costs), us_cat [W, d_out] (rows
    (U_t S_t)^T). A block is r_t (+ 1 bias) rows rounded up to a multiple of 8 with zero rows (an x V GEMM 40
    wide runs ~1.4x faster than 39 on AVX2); each block is its expert's own width, not the widest expert's.
    When some expert has a bias delta, the last row of each V^T block is zero, the last row of each U S block
    is db_t, and `_project` adds bias_ones [W] (1 in those columns) to h = x V, so the GEMM h @ us_cat also
    adds sum_t w_t db_t (no extra pass over the output).
    Dense buffers (every expert's delta dense): dense [n, d_out, d_in], db [n, d_out] or None.
    cached: {expert t: (W_s + delta_t, b_s + db_t)}, filled by `ExpertCache`.
    """

    def __init__(self, base, factors, name, routing):
        super().__init__()
        self.weight, self.bias, self.routing = base.weight, base.bias, routing
        dtype, (d_out, d_in) = base.weight.dtype, base.weight.shape
        self.cached = {}
        db = _stack_dense(factors, f"{name}.bias", (d_out,), dtype)
        self.register_buffer("dense", None, persistent=False)
        self.register_buffer("db", None, persistent=False)
        self.bias_col = False
        if _all_dense(factors, f"{name}.weight"):  # [n, d_out, d_in]; no factors
            self.dense, self.db = _stack_dense(factors, f"{name}.weight", (d_out, d_in), dtype), db
            us, vs, widths = _blocks([], f"{name}.weight", (d_out, d_in), dtype)
        else:
            self.bias_col = db is not None
            us, vs, widths = _blocks(factors, f"{name}.weight", (d_out, d_in), dtype, db, multiple=8)
        self._set_blocks(widths)
        self.register_buffer("vt_cat", vs.T.contiguous(), persistent=False)
        self.register_buffer("us_cat", us.T.contiguous(), persistent=False)
        self.register_buffer("bias_ones", None, persistent=False)
        if self.bias_col:  # 1 in each block's last column
            last = torch.tensor(self.offsets[1:]) - 1
            self.bias_ones = torch.zeros(vs.shape[1], dtype=dtype).index_fill_(0, last, 1)

    def forward(self, x):
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        y3 = self._batched(x3) if self.routing.groups is None else self._grouped(x3)
        return y3.reshape(*x.shape[:-1], y3.shape[-1])

    def _project(self, x2, cols):
        """h = x2 [N, d_in] @ V[:, cols] [N, w], plus 1 in every block's bias column (in the GEMM)."""
        return F.linear(x2, self.vt_cat[cols], self.bias_ones[cols] if self.bias_col else None)

    def _batched(self, x3):
        """Every expert at once: y = x W_s^T + b_s + ((x V) * w) US_cat, two GEMMs over W columns."""
        y = F.linear(x3, self.weight, self.bias)
        if self.dense is not None:
            return y + self._dense_batched(x3)
        h = self._project(x3.reshape(-1, x3.shape[-1]), slice(None))
        h.view(*x3.shape[:2], -1).mul_(self.routing.column_weights(self.col_expert)[:, None])
        y.view(-1, y.shape[-1]).addmm_(h, self.us_cat)
        return y

    def _dense_batched(self, x3):
        """sum_t w_t (x D_t^T + db_t) [B, L, d_out]: all experts in one matmul against [n * d_out, d_in]."""
        n, d_out, d_in = self.dense.shape
        h = (x3 @ self.dense.reshape(n * d_out, d_in).T).view(*x3.shape[:2], n, d_out)
        corr = (h * self.routing.dense[:, None, :, None]).sum(2)
        return corr if self.db is None else corr + _per_sample(self.db, self.routing)[:, None]

    def _grouped(self, x3):
        """The base output (one GEMM for the batch, or per column-0 segment with the materialised weights of
        cached experts), then every uncached segment's correction, on [B*L, d] views."""
        groups, length, x2 = self.routing.groups, x3.shape[1], x3.reshape(-1, x3.shape[-1])
        if any(g.cached for g in groups):
            y2 = x2.new_empty(x2.shape[0], self.weight.shape[0])
            for g in groups:
                if g.base:
                    tokens = _tokens(g.rows, length)
                    _linear_into(y2[tokens], x2[tokens], *(self.cached[g.expert] if g.cached else
                                                           (self.weight, self.bias)))
        else:
            y2 = F.linear(x2, self.weight, self.bias)
        for g in groups:
            if not g.cached:
                self._add_correction(x2, y2, g, _tokens(g.rows, length))
        return y2.view(*x3.shape[:2], -1)

    def _add_correction(self, x2, y2, g, tokens):
        """y2[tokens] += w ((x V_t) (U_t S_t)^T + db_t), or w (x D_t^T + db_t) for dense sets, x = x2[tokens]."""
        if self.dense is None:
            block = self._block(g.expert)
            if block.start == block.stop:  # the expert stores no delta of this weight
                return
            y2[tokens].addmm_(_scaled(self._project(x2[tokens], block), g.scale), self.us_cat[block])
            return
        x = x2[tokens] if g.scale is None else _scaled(x2[tokens].clone(), g.scale)
        y2[tokens].addmm_(x, self.dense[g.expert].T)
        if self.db is not None:
            rows = y2[tokens].view(g.rows.stop - g.rows.start, -1, y2.shape[-1])
            rows += self.db[g.expert] if g.scale is None else g.scale * self.db[g.expert]

    @torch.no_grad()
    def materialise(self, t):
        """(W_s + delta_t [d_out, d_in], b_s + db_t) of expert t at weight 1 (the module's own bias when no expert
        has a bias delta; the bias column's V is zero, so its U S row adds nothing to the weight)."""
        if self.dense is not None:
            return self.weight + self.dense[t], self.bias if self.db is None else self.bias + self.db[t]
        block = self._block(t)
        weight = self.weight + self.us_cat[block].T @ self.vt_cat[block]
        return weight.contiguous(), self.bias + self.us_cat[block][-1] if self.bias_col else self.bias


class DynamicEmbedding(nn.Module, _Blocks):
    """nn.Embedding with per-sample low-rank corrections. ids [B, L] (or [1, L], broadcast) -> [B, L, d].

    Buffers: us_cat [num, W] (rows of U_t S_t, expert t in columns `_block(t)`, r_t wide), vt_cat [W, d] (V_t^T
    blocks), or dense [n, num, d] when every expert's delta is dense. Never materialised by `ExpertCache`: the
    correction is a row gather and a [tokens, r_t] x [r_t, d] product.
    """

    def __init__(self, base, factors, name, routing):
        super().__init__()
        self.weight, self.padding_idx, self.routing = base.weight, base.padding_idx, routing
        shape, dtype = tuple(base.weight.shape), base.weight.dtype
        self.register_buffer("dense", None, persistent=False)
        if _all_dense(factors, f"{name}.weight"):  # [n, num, d]
            self.dense = _stack_dense(factors, f"{name}.weight", shape, dtype)
            us, vs, widths = _blocks([], f"{name}.weight", shape, dtype)
        else:
            us, vs, widths = _blocks(factors, f"{name}.weight", shape, dtype)
        self._set_blocks(widths)
        self.register_buffer("us_cat", us.contiguous(), persistent=False)
        self.register_buffer("vt_cat", vs.T.contiguous(), persistent=False)

    def forward(self, ids):
        r = self.routing
        ids = ids.expand(r.dense.shape[0], *ids.shape[1:])
        y = F.embedding(ids, self.weight, self.padding_idx)
        if r.groups is None:
            self._add_batched(y, ids)
        else:
            for g in r.groups:
                self._add_group(y, ids, g)
        return y

    def _add_batched(self, y, ids):
        """y += sum_t w_t (U_t S_t)[ids] V_t^T for every expert (one gather, one GEMM over W columns)."""
        r = self.routing
        if self.dense is not None:
            y += torch.einsum("nbld,bn->bld", self.dense[:, ids], r.dense)
        else:
            h = F.embedding(ids, self.us_cat) * r.column_weights(self.col_expert)[:, None]
            y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), self.vt_cat)

    def _add_group(self, y, ids, g):
        """y[g.rows] += w (U_t S_t)[ids] V_t^T (or w D_t[ids]) for group g's expert t."""
        ids = ids[g.rows].reshape(-1)
        if self.dense is not None:
            y[g.rows] += _scaled(F.embedding(ids, self.dense[g.expert]), g.scale).view_as(y[g.rows])
        else:
            block = self._block(g.expert)
            if block.start == block.stop:  # the expert stores no delta of this table
                return
            h = _scaled(F.embedding(ids, self.us_cat[:, block]), g.scale)
            y[g.rows].view(-1, y.shape[-1]).addmm_(h, self.vt_cat[block])


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
        return torch.addcmul(beta.view(view), F.layer_norm(x, self.shape, None, None, self.eps), gamma.view(view))


class ExpertCache:
    """LRU of materialised Linear weights for top-1 serving (`RoutedDeltaModel(cache_experts=...)`).

    A resident expert t's top-1 inputs run every dynamic Linear as one GEMM with W_s + delta_t and
    b_s + db_t (`DynamicLinear.materialise`): the static model's cost. Only Linear modules are materialised:
    embeddings keep their low-rank correction (a row gather and a [tokens, r_t] x [r_t, d] product, ~0.1% of
    MiniLM's FLOPs) and LayerNorms their per-sample gamma/beta, so one expert costs the bytes of the model's
    dynamic Linear weights and biases in the model dtype (MiniLM float32: 41 MiB, 48% of the 87 MiB dense
    model, whose word embeddings are half of it); all T experts cost T times that (`nbytes`).

    Filled on use: each top-1 batch admits its experts, largest group first, up to `capacity`, evicting the
    least recently used others (a miss materialises the expert: about one static forward pass of GEMM work).
    A batch with more experts than `capacity` runs the rest on the grouped low-rank path. capacity 0: off.
    """

    def __init__(self, linears, capacity=0):
        self.linears, self.capacity, self.experts = list(linears), int(capacity), OrderedDict()

    def admit(self, experts):
        """Make the first `capacity` of `experts` resident and most recently used; return them as a set."""
        chosen = list(experts)[: self.capacity]
        for t in chosen:
            if t not in self.experts:
                self._shrink(self.capacity - 1)
                for m in self.linears:
                    m.cached[t] = m.materialise(t)
            self.experts[t] = None
            self.experts.move_to_end(t)
        return set(chosen)

    def resize(self, capacity):
        """Set how many experts to keep (0 disables the cache), evicting the least recently used beyond it."""
        self.capacity = int(capacity)
        self._shrink(self.capacity)

    def _shrink(self, size):
        while len(self.experts) > max(size, 0):
            t, _ = self.experts.popitem(last=False)
            for m in self.linears:
                del m.cached[t]

    @property
    def nbytes(self):
        """Bytes held by the resident experts' materialised weights and biases (a module's own bias, reused
        when no expert changes it, is not counted)."""
        return sum(x.numel() * x.element_size() for m in self.linears for entry in m.cached.values()
                   for x in entry if x is not None and x is not m.bias)


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


def exclusive_params(factors) -> dict[str, set[str]]:
    """{module path: {parameter names}} of every tensor with exclusive knowledge in some expert."""
    params = {}
    for f in factors:
        for name in [*f.lowrank, *f.dense]:
            path, _, param = name.rpartition(".")
            params.setdefault(path, set()).add(param)
    return params


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
    cache_experts: capacity of the `ExpertCache` of materialised Linear weights used by top-1 batches (0: off;
    each resident expert costs the model's dynamic Linear bytes, see `ExpertCache`); `expert_cache.resize`
    changes it later.
    """

    def __init__(self, shared_model: PreTrainedModel, factors, dtype=torch.float32, cache_experts: int = 0):
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
        linears = [m for m in self.model.modules() if isinstance(m, DynamicLinear)]
        self.expert_cache = ExpertCache(linears, cache_experts)

    def _replace_modules(self):
        for path, names in sorted(exclusive_params(self.factors).items()):
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
        (renormalised, see `top_k_weights`). Experts with weight 0 are never computed: when some expert is
        unused by a row (top-k, or already sparse weights) the batch runs grouped (and cached when top-1 with
        weight 1 and the cache is on), else batched (see the module docstring). Returns DynamicOutput.
        """
        self._check_weights(weights, input_ids.shape[0])
        head_ids = weights.to(self.dtype).argmax(dim=1) if head_ids is None else head_ids.long()
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        width = int(self.num_labels.max())  # same width for every batch, whatever heads it used

        def logits(batch):
            out = self.model(**batch).logits
            return F.pad(out, (0, width - out.shape[-1]), value=float("-inf"))

        return DynamicOutput(self._routed(logits, inputs, weights, top_k, head_ids), self.num_labels[head_ids],
                             head_ids)

    def _check_weights(self, weights, batch: int) -> None:
        n = len(self.factors)
        if weights is None or weights.shape != (batch, n):
            raise TwinMergeError(f"weights must have shape [batch, n_experts] = [{batch}, {n}]")

    def _routed(self, run, inputs, weights, top_k=None, head_ids=None):
        """run(inputs) -> [B, ...] under per-sample routing (weights [B, n], top_k, head_ids [B] or None), in
        input order: batched when every row uses every expert, else grouped: each row's k experts (its largest
        |weights|; k > 1: in increasing expert order, unused slots last), the batch sorted by them (`_lexsort`)
        and run as `_groups` segments (cached top-1 segments when the `ExpertCache` is on)."""
        n = len(self.factors)
        weights = weights.to(self.dtype)
        if top_k is not None and top_k < n:
            weights = top_k_weights(weights, top_k)[0]
        active = int((weights != 0).sum(dim=1).max())
        if active == n:
            return self._under(run, inputs, weights, None, head_ids)
        idx = weights.abs().topk(max(active, 1), dim=1).indices
        kept = weights.gather(1, idx)
        idx[:, 1:][kept[:, 1:] == 0] = n  # unused slots: no segment
        if idx.shape[1] > 1:  # a row's experts in increasing order: rows using the same SET of experts sort
            idx, slots = idx.sort(dim=1)  # together, so column 1 has one segment per pair, not per ordered pair
            kept = kept.gather(1, slots)
        order = _lexsort(idx)
        idx, kept = idx[order], kept[order]
        groups = _groups(idx, kept, n, self._cached_experts(idx, kept))
        out = self._under(run, {name: value[order] for name, value in inputs.items()}, weights[order], groups,
                          None if head_ids is None else head_ids[order])
        return out[order.argsort()]

    def _cached_experts(self, idx, kept):
        """The experts of a top-1 batch (idx, kept [B, 1]) resident in the `ExpertCache` after admitting them,
        largest segment first; none when the cache is off or some weight is not 1 (a materialised expert is
        theta_s + v_t, i.e. weight 1)."""
        if idx.shape[1] != 1 or not self.expert_cache.capacity or not bool((kept == 1).all()):
            return set()
        counts = idx[:, 0].bincount(minlength=len(self.factors))
        used = counts.argsort(descending=True, stable=True)[: int((counts > 0).sum())]
        return self.expert_cache.admit(used.tolist())

    def _under(self, run, inputs, weights, groups, head_ids):
        """run(inputs) with the shared routing set to (weights [B, n], groups, head_ids), cleared afterwards."""
        r = self.routing
        r.dense, r.groups, r.head_ids = weights, groups, head_ids
        try:
            return run(inputs)
        finally:
            r.dense = r.groups = r.head_ids = None

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
