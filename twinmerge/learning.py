"""Learning how to merge from validation data: the pieces AdaMerging, Concrete subspace learning, Self
Positioning (`twinmerge.methods.learned`) and WEMoE (`twinmerge.methods.wemoe`) share.

- `TaskVectors`: theta_0 [*shape] and the stacked task vectors tau [T, *shape] (float32) of every mergeable
  tensor; `combine(coef)` gives theta_0 + sum_t coef_t tau_t, differentiable in the coefficients.
- `Probe`: each task's validation inputs (labels too, for methods that use them), drawn in seeded batches:
  step s takes, per task, the next `batch_size` inputs of a seeded permutation of that task's split (a fresh
  permutation each pass), so a run is the same for the same seed whatever the thread count.
- `FunctionalClassifier`: one HF classifier skeleton run with any backbone tensors and task t's own head
  through `torch.func.functional_call`: learning loops never copy a model per step.
- `entropy`: mean Shannon entropy of softmax(logits) over a batch (AdaMerging's unsupervised objective).
- `fit`: Adam over the learnable tensors for a fixed number of steps on one thread (bit-identical results
  whatever threads the flow gives the stage); returns the loss curve (one value per step).
"""
from collections.abc import Callable, Sequence

import torch
from torch.func import functional_call

from twinmerge.exclusive import one_thread
from twinmerge.io import ExpertSet
from twinmerge.modelpool import assemble_classifier
from twinmerge.progress import progress_bar


class TaskVectors:
    """theta_0 and tau_t = theta_t - theta_0 (float32, stacked over experts) of `keys` (default: every
    mergeable tensor). base[k]: [*shape]; taus[k]: [T, *shape]."""

    def __init__(self, pool: ExpertSet, keys: Sequence[str] | None = None):
        self.keys = list(pool.mergeable_keys() if keys is None else keys)
        self.base = {k: pool.base_tensor(k).float() for k in self.keys}
        self.taus = {k: torch.stack([pool.expert_tensor(n, k).float() - self.base[k] for n in pool.names])
                     for k in self.keys}
        self.n = len(pool.names)

    def combine(self, coef: Callable[[str], torch.Tensor], mask: Callable[[str], torch.Tensor] | None = None,
                base_coef: Callable[[str], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """{k: b_k theta_0 + m_k * sum_t c_{k,t} tau_t}: coef(k) -> c_k [T]; mask(k) -> m_k [*shape] (default 1);
        base_coef(k) -> b_k scalar (default 1)."""
        out = {}
        for k in self.keys:
            delta = torch.tensordot(coef(k), self.taus[k], dims=1)
            if mask is not None:
                delta = mask(k) * delta
            out[k] = (self.base[k] if base_coef is None else base_coef(k) * self.base[k]) + delta
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.taus.values())


class Probe:
    """Seeded batches of each task's (texts, labels). split: {task: (texts, labels)} in expert order."""

    def __init__(self, split: dict[str, tuple[Sequence[str], Sequence[int]]], tokenizer, batch_size: int,
                 max_length: int, seed: int):
        self.names, self.split, self.tokenizer = list(split), split, tokenizer
        self.batch_size, self.max_length, self.seed = batch_size, max_length, seed
        self._orders = [[] for _ in self.names]

    def _take(self, t: int, step: int) -> list[int]:
        """Indices of task t's batch at `step`: consecutive slices of seeded permutations (pass p: seed, t, p)."""
        size = len(self.split[self.names[t]][0])
        need = (step + 1) * min(self.batch_size, size)
        order = self._orders[t]
        while len(order) < need:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + t * 10_007 + len(order) // size)
            order.extend(torch.randperm(size, generator=g).tolist())
        b = min(self.batch_size, size)
        return order[step * b:(step + 1) * b]

    def batch(self, t: int, step: int) -> tuple[dict, torch.Tensor]:
        """(encoded inputs [B, L], labels [B]) of task t at `step`."""
        texts, labels = self.split[self.names[t]]
        idx = self._take(t, step)
        enc = self.tokenizer([texts[i] for i in idx], truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="pt")
        return dict(enc), torch.tensor([labels[i] for i in idx])


class FunctionalClassifier:
    """An HF sequence classifier skeleton (the first expert's config) whose tensors are supplied per call:
    logits(backbone, t, enc) = classifier with `backbone` tensors and expert t's head on inputs `enc` [B, L]
    -> [B, C_t]. Parameters of the skeleton itself never receive gradients."""

    def __init__(self, pool: ExpertSet):
        keys = pool.mergeable_keys()
        self.heads = [{k: pool.expert_tensor(n, k).float() for k in pool.head_keys()} for n in pool.names]
        self.model = assemble_classifier(pool.experts[pool.names[0]].config,
                                         {**{k: pool.base_tensor(k) for k in keys}, **self.heads[0]})
        self.model.requires_grad_(False)

    def logits(self, backbone: dict[str, torch.Tensor], t: int, enc: dict) -> torch.Tensor:
        return functional_call(self.model, {**backbone, **self.heads[t]}, args=(), kwargs=enc).logits


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of H(softmax(logits)) = -sum_c p_c log p_c; logits [B, C] -> scalar."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def fit(params: Sequence[torch.Tensor], loss_at: Callable[[int], torch.Tensor], steps: int, lr: float,
        after_step: Callable[[], None] | None = None, desc: str = "learn", progress: bool = True) -> list[float]:
    """Minimise loss_at(step) over `params` with Adam(lr) for `steps` steps on one thread; after_step() runs
    after each update (e.g. clamping). Returns the loss of every step (before its update)."""
    opt = torch.optim.Adam(params, lr=lr)
    curve = []
    with one_thread():
        for step in progress_bar(range(steps), desc=desc, disable=not progress):
            opt.zero_grad(set_to_none=True)
            loss = loss_at(step)
            loss.backward()
            opt.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step()
            curve.append(float(loss.detach()))
    return curve
