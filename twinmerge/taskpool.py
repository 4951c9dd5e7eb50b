"""The task pool: scores any model on every task's split, without knowing which method made it (FusionBench's
split of method and evaluation).

A static method gives a backbone (canonical state dict without heads): task t is scored with expert t's own
head (`score_backbone`; the task id picks the head). A routed method gives a `RoutedDeltaModel` and, for the
concatenation of every task's inputs (task order, `texts`), per-sample weights [N, n] and head ids [N]
(`score_routed`). Scoring is what a user sees: an input answered by another task's head is wrong, whatever
index that head outputs (`answered_predictions`). Scores are x100.
"""
from collections.abc import Mapping, Sequence

import torch

from twinmerge.io import ExpertSet
from twinmerge.metrics import answered_predictions
from twinmerge.metrics import score as metric_score
from twinmerge.modelpool import assemble_classifier, map_batches, predict_logits

Split = Mapping[str, tuple[Sequence[str], Sequence[int]]]


class TaskPool:
    """Every task's (texts, labels) of one split, the experts' heads and configs, and the batching options.

    split: {expert name: (texts, labels)} in registry order; metrics: {name: metric name}.
    """

    def __init__(self, pool: ExpertSet, split: Split, metrics: Mapping[str, str], tokenizer,
                 batch_size: int = 64, max_length: int = 64):
        self.pool, self.split, self.metrics, self.tokenizer = pool, split, dict(metrics), tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.names = list(split)
        self.heads = {n: {k: pool.expert_tensor(n, k) for k in pool.head_keys()} for n in self.names}

    @property
    def texts(self) -> list[str]:
        """Every task's inputs concatenated in task order ([N])."""
        return [t for n in self.names for t in self.split[n][0]]

    @property
    def task_ids(self) -> torch.Tensor:
        """[N] index of each input's task (its gold expert)."""
        return torch.tensor([i for i, n in enumerate(self.names) for _ in self.split[n][0]])

    def score(self, name: str, logits: torch.Tensor, heads: torch.Tensor | None = None) -> float:
        """x100 metric of task `name` from logits [N_t, C]; heads [N_t]: the expert whose head answered each
        input (None: task `name`'s own)."""
        preds = answered_predictions(logits, heads, self.names.index(name))
        return 100.0 * metric_score(self.metrics[name], preds.tolist(), list(self.split[name][1]))

    def score_backbone(self, backbone: Mapping[str, torch.Tensor], desc: str = "backbone",
                       only: str | None = None) -> dict[str, float]:
        """{task: score} of `backbone` with each task's own head (task `only` alone when given)."""
        out = {}
        for name in [only] if only else self.names:
            model = assemble_classifier(self.pool.experts[name].config, {**backbone, **self.heads[name]})
            logits = predict_logits(model, self.tokenizer, self.split[name][0], self.batch_size, self.max_length,
                                    desc=f"{desc}/{name}")
            out[name] = self.score(name, logits)
        return out

    def score_experts(self) -> dict[str, float]:
        """Each expert (its own backbone and head) on its own task: the normalisation reference."""
        out = {}
        for name in self.names:
            own = {k: self.pool.expert_tensor(name, k) for k in self.pool.mergeable_keys()}
            out.update(self.score_backbone(own, "expert", only=name))
        return out

    def routed_logits(self, model, weights: torch.Tensor, head_ids: torch.Tensor, top_k: int | None = None,
                      desc: str = "routed", reuse: tuple | None = None) -> torch.Tensor:
        """Logits [N, C_max] of a RoutedDeltaModel over `texts` with per-sample weights [N, n] and heads [N].

        reuse: (weights, head_ids, logits) of an earlier call with the same model and top_k: inputs whose weights
        and head are equal there are not run again (e.g. an oracle row differs from the router row only on
        misrouted inputs)."""
        texts = self.texts
        todo = torch.arange(len(texts))
        if reuse is not None:
            same = (reuse[0] == weights).all(1) & (reuse[1] == head_ids)
            todo = (~same).nonzero().flatten()

        def run(idx, enc):
            i = todo[torch.tensor(idx)]
            return model(**enc, weights=weights[i], head_ids=head_ids[i], top_k=top_k).logits

        if reuse is not None and not len(todo):  # every input as in the previous mode (e.g. none misrouted)
            return reuse[2].clone()
        fresh = map_batches(run, self.tokenizer, [texts[i] for i in todo.tolist()], self.batch_size,
                            self.max_length, desc=desc)
        if reuse is None:
            return fresh
        logits = reuse[2].clone()
        logits[todo] = fresh
        return logits

    def score_logits(self, logits: torch.Tensor, head_ids: torch.Tensor) -> dict[str, float]:
        """{task: score} from logits [N, C] over `texts` answered by heads [N]."""
        scores, start = {}, 0
        for name in self.names:
            k = len(self.split[name][0])
            scores[name] = self.score(name, logits[start:start + k], head_ids[start:start + k])
            start += k
        return scores

    def score_routed(self, model, weights: torch.Tensor, head_ids: torch.Tensor, top_k: int | None = None,
                     desc: str = "routed") -> dict[str, float]:
        """{task: score} of a RoutedDeltaModel over `texts` with per-sample weights [N, n] and heads [N]."""
        return self.score_logits(self.routed_logits(model, weights, head_ids, top_k, desc), head_ids)


def summarize(scores: Mapping[str, float], reference: Mapping[str, float]) -> dict:
    """{scores, normalized, mean_score, mean_normalized}: normalised = 100 * score / reference (the expert's
    score on the same task; None where the reference is 0); means over tasks."""
    normalized = {t: 100.0 * s / reference[t] if reference[t] else None for t, s in scores.items()}
    valid = [v for v in normalized.values() if v is not None]
    return {"scores": dict(scores), "normalized": normalized, "mean_score": sum(scores.values()) / len(scores),
            "mean_normalized": sum(valid) / len(valid) if valid else None}
