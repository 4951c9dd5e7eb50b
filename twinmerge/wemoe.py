"""WEMoE (Tang et al., ICML 2024, arXiv 2402.00433): Weight-Ensembling Mixture of Experts on the routed-delta
engine (`twinmerge.routed`).

- Every non-MLP tensor (attention, embeddings, LayerNorms, pooler): Task Arithmetic theta_0 + lambda sum_t tau_t
  (lambda = init_lambda).
- Layer i's MLP tensors (BERT / RoBERTa: `layer.<i>.intermediate.dense`, `layer.<i>.output.dense`; DistilBERT:
  `layer.<i>.ffn.lin1`, `lin2`; weights and biases): W_i(x) = W_0 + sum_t r_{i,t}(x) tau_t, with r_i [B, T] the
  masked token mean of gate_i(h) over the sample's tokens, h [B, L, d] the hidden states entering the MLP.
- gate_i (`Gate`, hidden_layers=2): r = fc2(ReLU(fc1(h))), fc1: d -> d, fc2: d -> T, no softmax; weights
  ~ N(0, std^2) (seeded), fc1.bias = 0, fc2.bias = init_lambda: at init (std -> 0) exactly Task Arithmetic.
  hidden_layers=1: r = fc(h); hidden_layers=0: r = a learned constant [T] (task-wise AdaMerging of the MLPs).

The MLP deltas run as dense delta sets of `RoutedDeltaModel` (per-sample weights, never materialised: each MLP
linear computes x W_0^T + b_0 + sum_t r_t (x tau_t^T + db_t)); each layer's two linears read their own `_Routing`
whose weights the layer's `GatedEntry` sets from its gate; the attention mask for the masked mean comes from a
small context set in `WEMoEModel.forward`. Heads are never merged: each sample uses head_ids[b].
"""
import re

import torch
from torch import nn

from twinmerge.errors import MergeError, TwinMergeError
from twinmerge.io import ExpertSet
from twinmerge.learning import TaskVectors
from twinmerge.modelpool import assemble_classifier
from twinmerge.routed import DynamicOutput, RoutedDeltaModel, _Routing, dense_delta_set

# (pattern over canonical tensor names -> (layer prefix, linear), the MLP's entry module, its first linear):
# the gate reads the input of the entry module; every matched linear of the layer is mixed.
_MLP_PATTERNS = (
    (re.compile(r"^(.*\.layers?\.\d+)\.(intermediate\.dense|output\.dense)\.(?:weight|bias)$"),
     "intermediate", "intermediate.dense"),  # BERT, RoBERTa, ELECTRA, XLM-R (not attention.output.dense)
    (re.compile(r"^(.*\.layers?\.\d+)\.(ffn\.lin1|ffn\.lin2)\.(?:weight|bias)$"), "ffn", "ffn.lin1"),  # DistilBERT
)


def mlp_layout(keys, model_type: str = "?") -> dict[str, dict]:
    """{entry module path: {"linears": [linear paths], "first": first linear path, "keys": [tensor names]}} of every
    layer's MLP among canonical tensor names `keys`, in layer order; MergeError if none is found."""
    layout = {}
    for key in keys:
        for pattern, entry, first in _MLP_PATTERNS:
            m = pattern.match(key)
            if m:
                item = layout.setdefault(f"{m.group(1)}.{entry}", {"linears": [], "first": f"{m.group(1)}.{first}",
                                                                    "keys": []})
                item["keys"].append(key)
                if f"{m.group(1)}.{m.group(2)}" not in item["linears"]:
                    item["linears"].append(f"{m.group(1)}.{m.group(2)}")
                break
    if not layout:
        raise MergeError(f"WEMoE: no transformer MLP tensors found for model type {model_type!r} "
                         "(supported: BERT/RoBERTa-style intermediate/output.dense, DistilBERT ffn.lin1/lin2)")
    return layout


class Gate(nn.Module):
    """The routing gate of one layer: h [..., d] -> r [..., T] (see module docstring; no softmax)."""

    def __init__(self, d: int, n: int, hidden_layers: int = 2, init_lambda: float = 0.3, std: float = 0.01,
                 generator: torch.Generator | None = None):
        super().__init__()
        if hidden_layers not in (0, 1, 2):
            raise MergeError(f"WEMoE: hidden_layers={hidden_layers!r} must be 0, 1 or 2")
        self.hidden_layers = hidden_layers

        def normal(*shape):
            return nn.Parameter(torch.randn(*shape, generator=generator) * std)

        if hidden_layers == 0:
            self.weight = nn.Parameter(torch.full((n,), float(init_lambda)))
        elif hidden_layers == 1:
            self.fc = nn.Linear(d, n)
            self.fc.weight, self.fc.bias = normal(n, d), nn.Parameter(torch.full((n,), float(init_lambda)))
        else:
            self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, n)
            self.fc1.weight, self.fc1.bias = normal(d, d), nn.Parameter(torch.zeros(d))
            self.fc2.weight, self.fc2.bias = normal(n, d), nn.Parameter(torch.full((n,), float(init_lambda)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.hidden_layers == 0:
            return self.weight.expand(*h.shape[:-1], -1)
        if self.hidden_layers == 1:
            return self.fc(h)
        return self.fc2(torch.relu(self.fc1(h)))


class _Context:
    """The current batch's attention mask [B, L] (set in WEMoEModel.forward), read by every GatedEntry."""

    mask = None


def masked_mean(r: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """r [B, L, T] averaged over each sample's real tokens (mask [B, L], 1 = token) -> [B, T]."""
    if mask is None:
        return r.mean(1)
    m = mask.to(r.dtype)[..., None]
    return (r * m).sum(1) / m.sum(1).clamp(min=1)


class GatedEntry(nn.Module):
    """Wraps a layer's MLP entry module: sets the layer's routing weights r = masked_mean(gate(h)) [B, T] from
    its input h [B, L, d], then runs the wrapped module (whose MLP linears, and the layer's later MLP linears,
    read that routing)."""

    def __init__(self, entry: nn.Module, gate: Gate, routing: _Routing, context: _Context):
        super().__init__()
        self.entry, self.gate, self.routing, self.context = entry, gate, routing, context

    def forward(self, hidden, *args, **kwargs):
        self.routing.dense = masked_mean(self.gate(hidden), self.context.mask)
        return self.entry(hidden, *args, **kwargs)


class WEMoEModel(RoutedDeltaModel):
    """RoutedDeltaModel whose MLP delta weights come from per-layer gates instead of the `weights` argument.

    shared_model: classifier with TA non-MLP tensors and W_0 MLP tensors; factors: per-expert dense MLP task
    vectors + heads; layout: `mlp_layout`. Only the gates (`gates`, keys "<entry path>.<param>") require grad.
    """

    def __init__(self, shared_model, factors, layout: dict, hidden_layers: int = 2, init_lambda: float = 0.3,
                 std: float = 0.01, seed: int = 0, dtype=torch.float32):
        super().__init__(shared_model, factors, dtype)
        self.requires_grad_(False)
        self.context, self.layout = _Context(), layout
        gen = torch.Generator().manual_seed(seed)
        gates, self._routings = {}, []
        for entry, item in layout.items():
            routing = _Routing()
            self._routings.append(routing)
            for path in item["linears"]:
                self.model.get_submodule(path).routing = routing
            d_in = self.model.get_submodule(item["first"]).weight.shape[1]
            gates[entry] = Gate(d_in, len(factors), hidden_layers, init_lambda, std, gen).to(dtype)
            self.model.set_submodule(entry, GatedEntry(self.model.get_submodule(entry), gates[entry], routing,
                                                       self.context))
        self.gates = nn.ModuleDict({k.replace(".", "/"): g for k, g in gates.items()})

    def gate_state(self) -> dict[str, torch.Tensor]:
        """{"<entry path>.<param>": tensor} of every gate (float32, detached)."""
        return {f"{k.replace('/', '.')}.{n}": p.detach().float() for k, g in self.gates.items()
                for n, p in g.named_parameters()}

    def load_gate_state(self, state: dict[str, torch.Tensor]) -> None:
        own = {f"{k.replace('/', '.')}.{n}": p for k, g in self.gates.items() for n, p in g.named_parameters()}
        if set(own) != set(state):
            raise TwinMergeError(f"WEMoE gates: expected tensors {sorted(own)[:3]}..., got {sorted(state)[:3]}...")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state[k].to(p.dtype))

    def forward(self, input_ids, attention_mask, token_type_ids=None, weights=None, head_ids=None, top_k=None):
        """Logits [B, C_max] of each sample under its own gated MLPs and head head_ids[b] (default argmax of
        weights [B, n]; weights and top_k are otherwise ignored: the gates choose the mixing). -> DynamicOutput."""
        if head_ids is None:
            if weights is None:
                raise TwinMergeError("WEMoE needs head_ids or weights (whose argmax picks the head)")
            head_ids = weights.argmax(dim=1)
        head_ids = head_ids.long()
        self.routing.head_ids, self.context.mask = head_ids, attention_mask
        try:
            kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
            logits = nn.functional.pad(logits, (0, int(self.num_labels.max()) - logits.shape[-1]), value=float("-inf"))
        finally:
            self.routing.head_ids = self.context.mask = None
            for routing in self._routings:
                routing.dense = None
        return DynamicOutput(logits, self.num_labels[head_ids], head_ids)

    def materialize(self, weights, head_id=None):
        raise TwinMergeError("WEMoE's MLP weights depend on each input (gates); it has no single merged model")


def build_wemoe(pool: ExpertSet, init_lambda: float = 0.3, hidden_layers: int = 2, seed: int = 0,
                std: float = 0.01, gates: dict[str, torch.Tensor] | None = None, dtype=torch.float32) -> WEMoEModel:
    """The WEMoE model of `pool`: TA(init_lambda) non-MLP backbone, W_0 MLPs + per-expert dense MLP task vectors
    tau_t, heads; gates seeded-initialised (seed, std) or loaded from `gates` (`WEMoEModel.gate_state`)."""
    first = pool.names[0]
    config = pool.experts[first].config
    layout = mlp_layout(pool.mergeable_keys(), config.get("model_type", "?"))
    mlp = [k for item in layout.values() for k in item["keys"]]
    mlp_set = set(mlp)
    tv = TaskVectors(pool)
    lam, zero = torch.full((tv.n,), float(init_lambda)), torch.zeros(tv.n)
    backbone = tv.combine(lambda k: zero if k in mlp_set else lam)
    heads = [{k: pool.expert_tensor(n, k) for k in pool.head_keys()} for n in pool.names]
    deltas = [dense_delta_set(n, pool.experts[n].config, {k: tv.taus[k][t] for k in mlp}, heads[t])
              for t, n in enumerate(pool.names)]
    model = WEMoEModel(assemble_classifier(config, {**backbone, **heads[0]}), deltas, layout, hidden_layers,
                       init_lambda, std, seed, dtype)
    if gates is not None:
        model.load_gate_state(gates)
    return model
