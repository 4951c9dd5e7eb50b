"""The generative task pool: scores any causal LM on every task's prompts by what it generates (the decoder
counterpart of `twinmerge.taskpool.TaskPool`; FusionBench's split of method and evaluation).

A task is (prompts, references) with a metric of `twinmerge.metrics.GENERATIVE_METRICS`:
- exact_match (short answers: MMLU letters, TruthfulQA / BBQ choices): the first non-empty line of the
  generation, SQuAD-normalised, equals a reference;
- rouge_l (summaries, CNN-DailyMail): ROUGE-L F1 of the whole generation against the reference.
Scores are x100; the normalised score is `twinmerge.taskpool.summarize`'s (100 * method / expert).

Generation is greedy (deterministic) with HF's own `generate` and its KV cache, `max_new_tokens` new tokens,
prompts left-padded in fixed batches of `batch_size` in task order (so every model sees the same batches). A
static model (an expert, a merged backbone) is any HF causal LM (`score_model`), or, given the pool's
`ExpertSet`, a canonical state dict assembled into one (`score_backbone`, `score_experts`: the interface of the
classification pool, so a static method scores a causal LM's merge as it scores an encoder's; a causal LM has
no task heads, so one model answers every task and no task id is used). A routed model is a
`twinmerge.decoder.RoutedCausalLM` with per-prompt weights [N, n] computed once from each prompt (the router
reads the prompt's features, before any token is generated) and fixed for all its new tokens (`score_routed`).
"""
from collections.abc import Mapping, Sequence

import torch
from transformers import AutoModelForCausalLM

from twinmerge.decoder import _tied_head
from twinmerge.errors import CheckpointError, TwinMergeError
from twinmerge.io import ExpertSet
from twinmerge.metrics import GENERATIVE_METRICS
from twinmerge.metrics import score as metric_score
from twinmerge.modelpool import check_state_names, config_from_dict
from twinmerge.progress import progress_bar
from twinmerge.taskpool import TaskPool

GenerativeSplit = Mapping[str, tuple[Sequence[str], Sequence[str | Sequence[str]]]]


def assemble_causal_lm(config: dict, state: Mapping[str, torch.Tensor]):
    """HF causal LM (`AutoModelForCausalLM` of `config`) holding exactly `state` (canonical names: the experts'
    own), float32, eval mode. A tied output head takes the input embedding (a saved tied head is left out of the
    checkpoint); CheckpointError listing missing or unexpected tensor names.

    The model is built in float32 whatever dtype its config names (a bfloat16 config would round a float32 merge)
    on the CPU (its initialisation draws random numbers in a forked RNG, so callers' seeds are untouched), then
    takes the state's tensors themselves (`assign`: float32 tensors are shared, not copied), so non-persistent
    buffers (rotary frequencies) stay computed. Memory: the random parameters until they are replaced."""
    with torch.random.fork_rng():
        model = AutoModelForCausalLM.from_config(
            config_from_dict({k: v for k, v in config.items() if k not in ("torch_dtype", "dtype")}))
    tied = {f"{head}.weight": f"{emb}.weight" for head, emb in _tied_head(model).items()}
    check_state_names(model, state, optional=tied)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict({**{h: state[e] for h, e in tied.items()}, **state}, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


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


def pad_token_id(tokenizer) -> int:
    """The id prompts are left-padded with: the tokenizer's pad token, else its eos token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise TwinMergeError("the tokenizer has neither a pad nor an eos token: cannot left-pad prompts")
    return pad


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, max_length: int = 512,
             batch_size: int = 16, weights: torch.Tensor | None = None, top_k: int | None = None,
             desc: str | None = None) -> list[str]:
    """Greedy generations (new tokens only, special tokens dropped) of `model` for prompts, in order: batches of
    `batch_size` prompts left-padded (`left_padded`, the last `max_length` tokens of each), at most
    `max_new_tokens` new tokens. weights [len(prompts), n]: per-prompt routing weights of a RoutedCausalLM and
    its top_k (None: a plain causal LM)."""
    pad, out = pad_token_id(tokenizer), []
    with progress_bar(total=len(prompts), desc=desc, disable=desc is None) as bar:
        for start in range(0, len(prompts), batch_size):
            ids, mask = left_padded(tokenizer, prompts[start:start + batch_size], max_length, pad)
            kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            if weights is not None:
                kw.update(weights=weights[start:start + len(ids)], top_k=top_k)
            sequences = model.generate(input_ids=ids, attention_mask=mask, **kw)
            out += tokenizer.batch_decode(sequences[:, ids.shape[1]:], skip_special_tokens=True)
            bar.update(len(ids))
    return out


class GenerativeTaskPool:
    """Every task's (prompts, references) of one split and the generation options.

    split: {task: (prompts, references)} in registry order (a reference is a string or a list of acceptable
    strings); metrics: {task: "exact_match" | "rouge_l"}; max_length: prompt tokens kept (the last ones);
    pool: the experts (causal LMs with exactly the base's tensors), needed by `score_backbone` / `score_experts`.
    """

    def __init__(self, split: GenerativeSplit, metrics: Mapping[str, str], tokenizer, batch_size: int = 16,
                 max_new_tokens: int = 32, max_length: int = 512, pool: ExpertSet | None = None):
        unknown = {t: m for t, m in metrics.items() if m not in GENERATIVE_METRICS}
        if unknown or set(metrics) != set(split):
            raise TwinMergeError(f"generative tasks need one of {', '.join(GENERATIVE_METRICS)} per task; got "
                                 f"{dict(metrics)} for tasks {list(split)}")
        self.split, self.metrics, self.tokenizer = split, dict(metrics), tokenizer
        self.batch_size, self.max_new_tokens, self.max_length = batch_size, max_new_tokens, max_length
        self.names = list(split)
        pad_token_id(tokenizer)  # refuse a tokenizer prompts cannot be padded with, before any model runs
        self.pool = pool
        if pool is not None and pool.head_keys():
            raise CheckpointError(f"expert tensors the base lacks ({', '.join(pool.head_keys()[:3])}): a causal LM "
                                  "expert holds the base's tensors only (no task head)")

    # the classification pool's: every task's prompts concatenated in task order ([N]), and each one's task [N]
    prompts = TaskPool.texts
    task_ids = TaskPool.task_ids

    def generate(self, model, prompts: Sequence[str], weights: torch.Tensor | None = None,
                 top_k: int | None = None, desc: str | None = None) -> list[str]:
        """`generate` with the pool's tokenizer and options."""
        return generate(model, self.tokenizer, prompts, self.max_new_tokens, self.max_length, self.batch_size,
                        weights, top_k, desc)

    def score_texts(self, name: str, generations: Sequence[str]) -> float:
        """x100 metric of task `name` from its generations (one per prompt, in order)."""
        metric = self.metrics[name]
        return 100.0 * metric_score(metric, [answer_text(g, metric) for g in generations], self.split[name][1])

    def score_model(self, model, only: str | None = None, desc: str = "model") -> dict[str, float]:
        """{task: score} of a plain HF causal LM (an expert, or a static merge) on every task (or `only`)."""
        return {name: self.score_texts(name, self.generate(model, self.split[name][0], desc=f"{desc}/{name}"))
                for name in ([only] if only else self.names)}

    def score_backbone(self, backbone: Mapping[str, torch.Tensor], desc: str = "backbone",
                       only: str | None = None) -> dict[str, float]:
        """{task: score} of the causal LM holding `backbone` (canonical state dict, e.g. a static merge): one model
        for every task (or task `only`)."""
        if self.pool is None:
            raise TwinMergeError("score_backbone needs the pool's experts (GenerativeTaskPool(..., pool=...))")
        model = assemble_causal_lm(self.pool.experts[self.pool.names[0]].config, backbone)
        return self.score_model(model, only, desc)

    # the classification pool's: each expert (its own weights) on its own task, through `score_backbone`
    score_experts = TaskPool.score_experts

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
