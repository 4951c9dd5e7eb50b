"""The generative task pool: scores any causal LM on every task's prompts by what it generates (the decoder
counterpart of `twinmerge.taskpool.TaskPool`; FusionBench's split of method and evaluation).

A task is (prompts, references) with a metric of `twinmerge.metrics.GENERATIVE_METRICS`:
- exact_match (short answers: MMLU letters, TruthfulQA / BBQ choices): the first non-empty line of the
  generation, SQuAD-normalised, equals a reference;
- rouge_l (summaries, CNN-DailyMail): ROUGE-L F1 of the whole generation against the reference.
Scores are x100; the normalised score is `twinmerge.taskpool.summarize`'s (100 * method / expert).

Generation is greedy (deterministic) with HF's own `generate` and its KV cache, `max_new_tokens` new tokens,
prompts left-padded in fixed batches of `batch_size` in task order (so every model sees the same batches). A
static model (an expert, a merged backbone) is any HF causal LM (`score_model`). A routed model is a
`twinmerge.decoder.RoutedCausalLM` with per-prompt weights [N, n] computed once from each prompt (the router
reads the prompt's features, before any token is generated) and fixed for all its new tokens (`score_routed`).
"""
from collections.abc import Mapping, Sequence

import torch

from twinmerge.errors import TwinMergeError
from twinmerge.metrics import GENERATIVE_METRICS
from twinmerge.metrics import score as metric_score
from twinmerge.progress import progress_bar
from twinmerge.taskpool import TaskPool

GenerativeSplit = Mapping[str, tuple[Sequence[str], Sequence[str | Sequence[str]]]]


def answer_text(generation: str, metric: str) -> str:
    """The part of a generation a metric scores: its first non-empty line for exact_match, else all of it."""
    text = generation.strip()
    return text.split("\n", 1)[0].strip() if metric == "exact_match" else text


def left_padded(tokenizer, prompts: Sequence[str], max_length: int, pad_id: int):
    """input_ids and attention_mask [B, L] of prompts tokenised one by one (truncated to their LAST max_length
    tokens, the ones next to the answer) and left-padded with pad_id, without touching the tokenizer's state."""
    rows = [tokenizer(p, add_special_tokens=True)["input_ids"][-max_length:] for p in prompts]
    if not all(rows):
        raise TwinMergeError("a prompt tokenises to nothing: every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = torch.tensor(r), 1
    return ids, mask


class GenerativeTaskPool:
    """Every task's (prompts, references) of one split and the generation options.

    split: {task: (prompts, references)} in registry order (a reference is a string or a list of acceptable
    strings); metrics: {task: "exact_match" | "rouge_l"}; max_length: prompt tokens kept (the last ones).
    """

    def __init__(self, split: GenerativeSplit, metrics: Mapping[str, str], tokenizer, batch_size: int = 16,
                 max_new_tokens: int = 32, max_length: int = 512):
        unknown = {t: m for t, m in metrics.items() if m not in GENERATIVE_METRICS}
        if unknown or set(metrics) != set(split):
            raise TwinMergeError(f"generative tasks need one of {', '.join(GENERATIVE_METRICS)} per task; got "
                                 f"{dict(metrics)} for tasks {list(split)}")
        self.split, self.metrics, self.tokenizer = split, dict(metrics), tokenizer
        self.batch_size, self.max_new_tokens, self.max_length = batch_size, max_new_tokens, max_length
        self.names = list(split)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise TwinMergeError("the tokenizer has neither a pad nor an eos token: cannot left-pad prompts")
        self.pad_id = pad

    # the classification pool's: every task's prompts concatenated in task order ([N]), and each one's task [N]
    prompts = TaskPool.texts
    task_ids = TaskPool.task_ids

    @torch.inference_mode()
    def generate(self, model, prompts: Sequence[str], weights: torch.Tensor | None = None,
                 top_k: int | None = None, desc: str | None = None) -> list[str]:
        """Greedy generations (new tokens only, special tokens dropped) of `model` for prompts, in order.

        weights [len(prompts), n]: per-prompt routing weights of a RoutedCausalLM (None: a plain causal LM)."""
        out = []
        with progress_bar(total=len(prompts), desc=desc, disable=desc is None) as bar:
            for start in range(0, len(prompts), self.batch_size):
                ids, mask = left_padded(self.tokenizer, prompts[start:start + self.batch_size], self.max_length,
                                        self.pad_id)
                kw = dict(max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.pad_id)
                if weights is not None:
                    kw.update(weights=weights[start:start + len(ids)], top_k=top_k)
                sequences = model.generate(input_ids=ids, attention_mask=mask, **kw)
                out += self.tokenizer.batch_decode(sequences[:, ids.shape[1]:], skip_special_tokens=True)
                bar.update(len(ids))
        return out

    def score_texts(self, name: str, generations: Sequence[str]) -> float:
        """x100 metric of task `name` from its generations (one per prompt, in order)."""
        metric = self.metrics[name]
        return 100.0 * metric_score(metric, [answer_text(g, metric) for g in generations], self.split[name][1])

    def score_model(self, model, only: str | None = None, desc: str = "model") -> dict[str, float]:
        """{task: score} of a plain HF causal LM (an expert, or a static merge) on every task (or `only`)."""
        return {name: self.score_texts(name, self.generate(model, self.split[name][0], desc=f"{desc}/{name}"))
                for name in ([only] if only else self.names)}

    def score_routed(self, model, weights: torch.Tensor, top_k: int | None = None,
                     desc: str = "routed") -> dict[str, float]:
        """{task: score} of a RoutedCausalLM over `prompts` with per-prompt weights [N, n] (task order)."""
        generations = self.generate(model, self.prompts, weights, top_k, desc)
        scores, start = {}, 0
        for name in self.names:
            k = len(self.split[name][0])
            scores[name] = self.score_texts(name, generations[start:start + k])
            start += k
        return scores
