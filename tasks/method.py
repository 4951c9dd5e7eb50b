"""Step `method`: build one method of `params.methods` and score it on every task's test split.

DVC runs it as stage `static@<key>` or `routed@<key>` (dvc.yaml), so that a method's stage re-runs only when its
own entry, its inputs or its code change. Writes the method's artifact `artifacts/methods/<key>/` (what it
stores: a merged backbone, masks, deltas, or a record of Twin-Merging's artifacts) and its rows
`artifacts/eval/methods/<key>.json`: per row the label, whether the task id is used at inference, the data it
learned or selected from, stored bytes and per-task test scores (x100); `evaluate` gathers these.
Options in a method's `grid` are chosen on the validation splits (normalised by the experts' validation scores
from `score_experts`); the test splits are used once, to score.

Generative registries (causal LM experts, `Params.generative`) are scored by `twinmerge.genpool` on generated
text: a static merge is one causal LM for every task (no task id), a routed method generates each prompt under
its routing weights (`evaluate_routed`).
"""
import json
import random
from pathlib import Path

import torch
from transformers import AutoTokenizer

from tasks.modularize import open_pool
from tasks.params import METHOD_KINDS, Params, ParamsError, load_params, stage_item
from tasks.taskdata import load_registry_split
from twinmerge.genpool import GenerativeTaskPool
from twinmerge.io import atomic_dir, write_json_atomic
from twinmerge.methods import METHODS, Context
from twinmerge.methods.base import backbone_bytes, gold_one_hot, head_bytes, more_data, result_row, router_bytes
from twinmerge.taskpool import TaskPool

RESULT_FORMAT = "twinmerge-method-result/1"


def task_pool(params: Params, pool, split: str, tokenizer, capped: bool = True) -> TaskPool | GenerativeTaskPool:
    """The task pool of one split (generative registries: a `GenerativeTaskPool`). The validation pool that
    methods select options on keeps at most `evaluate.selection_max_per_task` inputs per task: a seeded random
    subset (seed `params.seed`), in order; `capped=False` gives the whole split (what learning methods learn
    from)."""
    data = load_registry_split(params, split)
    e = params.evaluate
    if split == "validation" and e.selection_max_per_task is not None and capped:
        data = {name: _subset(texts, labels, e.selection_max_per_task, params.seed)
                for name, (texts, labels) in data.items()}
    metrics = {n: spec.metric for n, spec in params.experts.items()}
    if params.generative:
        return GenerativeTaskPool(data, metrics, tokenizer, e.batch_size, e.max_new_tokens, e.max_length, pool=pool)
    return TaskPool(pool, data, metrics, tokenizer, e.batch_size, e.max_length)


def _subset(texts: list[str], labels: list, cap: int, seed: int) -> tuple[list[str], list]:
    if len(texts) <= cap:
        return texts, labels
    keep = sorted(random.Random(seed).sample(range(len(texts)), cap))
    return [texts[i] for i in keep], [labels[i] for i in keep]


def _row(method, label: str, uses_task_id: bool, data: str, stored: int, scores: dict) -> dict:
    return result_row(label, method.key, method.reference, uses_task_id, data, stored, scores)


def routing_stats(names: list[str], weights: torch.Tensor, task_ids: torch.Tensor) -> dict:
    """Routing accuracy (argmax == gold task), per task, and the confusion matrix [gold, routed]."""
    routed = weights.argmax(1)
    confusion = torch.zeros(len(names), len(names), dtype=torch.long)
    confusion.index_put_((task_ids, routed), torch.ones_like(routed), accumulate=True)
    return {"experts": names, "accuracy": (routed == task_ids).float().mean().item(),
            "per_task": {n: (confusion[i, i] / confusion[i].sum()).item() for i, n in enumerate(names)},
            "confusion": confusion.tolist()}


def router_report(artifacts: Path) -> dict:
    """The `router` stage's report.json in `artifacts`/router; `inputs` (inputs per split it learnt from) is
    {"validation": None} for a report from before `router.splits` existed."""
    report = json.loads((artifacts / "router" / "report.json").read_text())
    return {"inputs": {"validation": None}, **report}


def _routing(ctx: Context, names: list[str], weights: torch.Tensor, task_ids: torch.Tensor, report: dict) -> dict:
    """routing_stats on test plus the router's options, the splits it learnt from and its holdout accuracy (its
    `router_report`) and feature recipe."""
    recipe = json.loads((ctx.artifacts / "router" / "router.json").read_text())["config"]
    return {**routing_stats(names, weights, task_ids), "temperature": ctx.temperature, "top_k": ctx.top_k,
            "splits": list(report["inputs"]), "holdout_accuracy": report["holdout_accuracy"],
            "features": {k: recipe[k] for k in ("layers", "pooling", "max_length")}}


def _mode_weights(mode, weights: torch.Tensor | None, task_ids: torch.Tensor, n: int) -> torch.Tensor:
    """A mode's per-input weights [N, n]: the router's, one-hot on the router's choice, or one-hot on the gold task."""
    if mode.weights == "gold":
        return gold_one_hot(task_ids, n)
    return weights if mode.weights == "router" else gold_one_hot(weights.argmax(1), n)


def evaluate_routed(method, ctx: Context, out_dir: Path, test: TaskPool | GenerativeTaskPool, key: str,
                    data: str) -> tuple[dict, dict | None]:
    """Rows of a routed method (one per mode, plus its static rows) and routing statistics on test.

    Classifiers: a mode is its weights and heads (`modes`); its static rows use each task's own head (a task
    id). Causal LMs (`ctx.generative`): a mode is its weights (`generative_modes`: no heads), each prompt is
    generated under them (a misrouted prompt by the wrong mixture, scored as generated), and a static row is one
    model for every task."""
    lm = ctx.generative
    stored = method.stored_bytes(ctx, out_dir)
    static_bytes = backbone_bytes(ctx.pool) + (0 if lm else head_bytes(ctx.pool))
    rows = {row: _row(method, label, not lm, "none", static_bytes, test.score_backbone(backbone, row))
            for row, (label, backbone) in method.static_rows(ctx, out_dir).items()}
    modes = method.generative_modes if lm else method.modes
    report = router_report(ctx.artifacts)
    router_data = "train_inputs" if "train" in report["inputs"] else "validation_inputs"
    n, task_ids = len(test.names), test.task_ids
    needs_router = any(m.data != "none" for m in modes.values())
    weights = method.router_weights(ctx, test.prompts if lm else test.texts) if needs_router else None
    score = _generated(test, method.model_lm(ctx, out_dir)) if lm else \
        _through_heads(test, method.model(ctx, out_dir), weights, task_ids)
    for mode_name, mode in modes.items():
        row = f"{key}_{mode_name}"
        top_k = ctx.top_k if mode.weights == "router" else 1
        stored_row = stored + (router_bytes(ctx.artifacts) if mode.data != "none" else 0)
        scores = score(mode, _mode_weights(mode, weights, task_ids, n), top_k, row)
        mode_data = router_data if mode.data == "validation_inputs" else mode.data  # the router's inputs
        rows[row] = _row(method, mode.label, mode.uses_task_id, more_data(data, mode_data), stored_row, scores)
    return rows, None if weights is None else _routing(ctx, test.names, weights, task_ids, report)


def _through_heads(test: TaskPool, model, weights: torch.Tensor | None, task_ids: torch.Tensor):
    """score(mode, w, top_k, row) of a routed classifier: logits under w through the mode's heads (the gold
    task's, or the router's choice); a mode whose (w, heads) equal the previous mode's at that top_k reuses
    its logits."""
    computed = {}  # top_k -> (weights, heads, logits) of the last mode run

    def score(mode, w, top_k, row):
        heads = task_ids if mode.heads == "gold" else weights.argmax(1)
        logits = test.routed_logits(model, w, heads, top_k, desc=row, reuse=computed.get(top_k))
        computed[top_k] = (w, heads, logits)
        return test.score_logits(logits, heads)

    return score


def _generated(test: GenerativeTaskPool, model):
    """score(mode, w, top_k, row) of a RoutedCausalLM: every prompt generated under its weights w."""
    return lambda mode, w, top_k, row: test.score_routed(model, w, top_k, desc=row)


def run_method(params: Params, kind: str, key: str, artifacts: str | Path = "artifacts", progress: bool = True) -> dict:
    """Build method `key` of `params.methods.<kind>` into artifacts/methods/<key>/ and score it on test."""
    artifacts = Path(artifacts)
    specs = getattr(params.methods, kind)
    if key not in specs:
        raise ParamsError(f"params.yaml: methods.{kind}: no method {key!r} (listed: {', '.join(specs) or 'none'})")
    spec = specs[key]
    method = METHODS[spec.method]
    pool = open_pool(params, artifacts / "base", artifacts / "checkpoints")
    tokenizer = AutoTokenizer.from_pretrained(artifacts / "base")
    reference = json.loads((artifacts / "eval" / "experts.json").read_text())["validation"]
    test = task_pool(params, pool, "test", tokenizer)
    data = method.data(spec.grid, spec.options)
    ctx = Context(pool, task_pool(params, pool, "validation", tokenizer), reference,
                  task_pool(params, pool, "validation", tokenizer, capped=False), params.seed,
                  {n: list(texts) for n, (texts, _) in test.split.items()} if data == "test_inputs" else None,
                  artifacts, params.evaluate.temperature, params.evaluate.top_k, progress, params.generative)
    out_dir = artifacts / "methods" / key
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        info = method.build(ctx, tmp, dict(spec.grid), **spec.options)
    if method.kind == "static":
        tta = ", adapted on unlabelled TEST inputs: the paper's protocol, not comparable" if data == "test_inputs" \
            else ""
        how = "one causal LM for every task, no task id" if ctx.generative else f"task id picks the head{tta}"
        rows = {key: _row(method, f"{method.label}{method.variant(spec.options)} ({how})", not ctx.generative, data,
                          method.stored_bytes(ctx, out_dir), test.score_backbone(method.backbone(out_dir), key))}
        routing = None
    else:
        rows, routing = evaluate_routed(method, ctx, out_dir, test, key, data)
    result = {"format": RESULT_FORMAT, "key": key, "kind": kind, "spec": spec.model_dump(), "rows": rows,
              "choice": info.get("choice"), "storage": info.get("storage"), "routing": routing}
    write_json_atomic(result, artifacts / "eval" / "methods" / f"{key}.json")
    return result


def add_arguments(parser) -> None:
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "registered methods (params.yaml methods.<kind>.<key>: {method, options, grid}):\n" + "\n".join(
        f"  {key:16s} {m.kind:7s} {m.label}; options {m.defaults or '{}'}" for key, m in METHODS.items())
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--kind", choices=METHOD_KINDS, help="section of params.methods (default: from $DVC_STAGE)")
    parser.add_argument("--key", help="method entry to run (default: the <key> of $DVC_STAGE <kind>@<key>)")
    parser.add_argument("--no-progress", action="store_true")


def main(args) -> None:
    import os

    kind = args.kind or os.environ.get("DVC_STAGE", "").rpartition(":")[2].partition("@")[0]
    if kind not in METHOD_KINDS:
        raise ParamsError(f"give --kind ({' or '.join(METHOD_KINDS)}) or run as DVC stage <kind>@<key>")
    key = stage_item(args.key, kind, "--key")
    result = run_method(load_params(args.params), kind, key, progress=not args.no_progress)
    for row, r in result["rows"].items():
        mean = sum(r["scores"].values()) / len(r["scores"])
        print(f"{row:24s} mean test score {mean:.1f}")
