"""Step `evaluate`: every method on every task's test split -> `artifacts/eval/`.

Methods (rows of metrics.json `methods`):
- experts: each expert on its own task (the upper bound; normalised score 100 by definition);
- base_heads: the pretrained base backbone with each task's expert head;
- shared: the shared expert of params.merge with each task's head;
- one row per `params.evaluate.baselines` entry (static merges with task heads), options chosen on the
  validation splits from the entry's grid by mean normalised score (choice recorded in `choices`);
- twin_router: Twin-Merging, routing weights AND head from the router (no task id at inference: our headline);
- twin_oracle: Twin-Merging with router weights but the gold task's head (task id given; the official code
  also gave each input its gold task's fine-tuned biases, which this row does not);
- twin_true_routing: one-hot weights on the gold task (diagnostic: what a perfect router would give).
Every row records its label and whether it uses the task id at inference (`uses_task_id`).
Scoring is what a user sees: an input answered by another task's head (routed to the wrong task) is wrong,
whatever index that head outputs. Scores are x100; normalised = 100 * score / expert's score on the same task.
Outputs: metrics.json (DVC metrics), scores.csv (method, task, score, normalized) and routing.csv for plots.
"""
import itertools
import json
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModel, AutoTokenizer

from tasks.modularize import load_shared, open_pool
from tasks.params import Params, load_params
from tasks.taskdata import load_registry_split
from twinmerge.dynamic import DynamicTwinModel
from twinmerge.exclusive import load_factors
from twinmerge.io import SAFETENSORS, ExpertSet, write_json_atomic, write_text_atomic
from twinmerge.merge import MERGE_METHODS, build_shared_expert
from twinmerge.metrics import answered_predictions
from twinmerge.metrics import score as metric_score
from twinmerge.modelpool import assemble_classifier, map_batches, predict_logits
from twinmerge.progress import progress_bar
from twinmerge.router import load_router, route

Split = dict[str, tuple[list[str], list[int]]]

# row -> (label, uses the task id at inference)
ROWS = {
    "experts": ("Individual experts (upper bound; task id picks the expert)", True),
    "base_heads": ("Base model + expert heads (task id picks the head)", True),
    "shared": ("Shared expert alone (task id picks the head)", True),
    "twin_router": ("Twin-Merging, router weights and router-chosen head (no task id)", False),
    "twin_oracle": ("Twin-Merging, router weights + gold task's head (task id picks the head; the official code "
                    "also used the gold task's biases)", True),
    "twin_true_routing": ("Twin-Merging, one-hot routing on the gold task (task id; diagnostic)", True),
}


def row_info(name: str, method: str | None = None) -> dict:
    """{label, uses_task_id} of a metrics row; a static baseline of merge method `method` uses task heads."""
    if method is not None:
        return {"label": f"{MERGE_METHODS[method].label} (task id picks the head)", "uses_task_id": True,
                "reference": MERGE_METHODS[method].reference}
    label, uses = ROWS[name]
    return {"label": label, "uses_task_id": uses}


class Evaluator:
    """Scores backbones (canonical state dicts) with each expert's own head on one split of every task."""

    def __init__(self, params: Params, pool: ExpertSet, tokenizer):
        self.params, self.pool, self.tokenizer = params, pool, tokenizer
        self.names = list(params.experts)
        self.heads = {n: {k: pool.expert_tensor(n, k) for k in pool.head_keys()} for n in self.names}

    def score(self, name: str, logits: torch.Tensor, labels: list[int], heads: torch.Tensor | None = None) -> float:
        """x100 metric of task `name`; heads [N]: the expert whose head answered each input (None: task
        `name`'s own). An input answered by another task's head counts as predicting no label of this task."""
        preds = answered_predictions(logits, heads, self.names.index(name))
        return 100.0 * metric_score(self.params.experts[name].metric, preds.tolist(), labels)

    def backbone_scores(self, backbone: dict[str, torch.Tensor], split: Split, desc: str,
                        only: str | None = None) -> dict[str, float]:
        """{task: score} of `backbone` with each task's own head (only task `only` when given)."""
        out = {}
        for name in [only] if only else self.names:
            model = assemble_classifier(self.pool.experts[name].config, {**backbone, **self.heads[name]})
            texts, labels = split[name]
            logits = predict_logits(model, self.tokenizer, texts, self.params.evaluate.batch_size,
                                    self.params.evaluate.max_length, desc=f"{desc}/{name}")
            out[name] = self.score(name, logits, labels)
        return out

    def expert_scores(self, split: Split) -> dict[str, float]:
        """Each expert (its own backbone and head) on its own task."""
        out = {}
        for name in self.names:
            own = {k: self.pool.expert_tensor(name, k) for k in self.pool.mergeable_keys()}
            out[name] = self.backbone_scores(own, {name: split[name]}, "expert", only=name)[name]
        return out


def summarize(scores: dict[str, float], reference: dict[str, float]) -> dict:
    normalized = {t: 100.0 * s / reference[t] if reference[t] else None for t, s in scores.items()}
    valid = [v for v in normalized.values() if v is not None]
    return {"scores": scores, "normalized": normalized, "mean_score": sum(scores.values()) / len(scores),
            "mean_normalized": sum(valid) / len(valid) if valid else None}


def grid_points(grid: dict[str, list[float]]) -> list[dict]:
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))] or [{}]


def grid_backbones(pool: ExpertSet, spec):
    """Yield (options, backbone) for every grid point of a baseline spec.

    All registered methods are linear in `scaling` (theta_0 + scaling * m(tau)), so a grid over `scaling`
    alone merges once with scaling 1 and rescales: theta_0 + s * (theta_1 - theta_0), equal to merging with
    scaling s up to float rounding.
    """
    points = grid_points(spec.grid)
    if set(spec.grid) == {"scaling"}:
        unit, _ = build_shared_expert(pool, spec.method, {**spec.options, "scaling": 1.0}, progress=False)
        base = {k: pool.base_tensor(k) for k in unit}
        for point in points:
            yield {**spec.options, **point}, {k: base[k] + point["scaling"] * (unit[k] - base[k]) for k in unit}
    else:
        for point in points:
            options = {**spec.options, **point}
            yield options, build_shared_expert(pool, spec.method, options, progress=False)[0]


def choose_baseline(ev: Evaluator, spec, val: Split, val_ref: dict[str, float]) -> tuple[dict, dict, float]:
    """(options, backbone, validation mean normalised) of the best grid point of one baseline spec."""
    best = None
    for options, backbone in grid_backbones(ev.pool, spec):
        mean = summarize(ev.backbone_scores(backbone, val, f"{spec.method} val"), val_ref)["mean_normalized"]
        if best is None or mean > best[2]:
            best = (options, backbone, mean)
    return best


def twin_scores(ev: Evaluator, params: Params, test: Split, shared: dict, shared_dir: Path, factors_dir: Path,
                router_dir: Path) -> tuple[dict, dict]:
    """Twin-Merging rows (router heads, oracle heads, true routing) and routing statistics on the test splits.

    Router features follow the saved router's own recipe (layers, pooling, max_length, tokenizer), checked
    against the shared model it was trained on; temperature and top_k are evaluate's inference options."""
    names = ev.names
    texts = [t for n in names for t in test[n][0]]
    task_ids = torch.tensor([i for i, n in enumerate(names) for _ in test[n][0]])
    saved = load_router(router_dir)
    saved.check_feature_model(shared_dir / SAFETENSORS)
    features = saved.features(AutoModel.from_pretrained(shared_dir).eval(), texts)
    weights = route(saved.router, features, params.evaluate.temperature, params.evaluate.top_k)
    routed = weights.argmax(1)
    first = names[0]
    model = assemble_classifier(ev.pool.experts[first].config, {**shared, **ev.heads[first]})
    dynamic = DynamicTwinModel(model, [load_factors(factors_dir / f"{n}.safetensors") for n in names])
    modes = {"twin_router": (weights, routed), "twin_oracle": (weights, task_ids),
             "twin_true_routing": (torch.nn.functional.one_hot(task_ids, len(names)).float(), task_ids)}
    rows = {}
    for mode, (w, heads) in modes.items():
        def run(idx, enc, w=w, heads=heads):
            idx_t = torch.tensor(idx)
            return dynamic(**enc, weights=w[idx_t], head_ids=heads[idx_t]).logits
        logits = map_batches(run, ev.tokenizer, texts, params.evaluate.batch_size, params.evaluate.max_length,
                             desc=mode)
        scores, start = {}, 0
        for n in names:
            k = len(test[n][0])
            scores[n] = ev.score(n, logits[start:start + k], test[n][1], heads[start:start + k])
            start += k
        rows[mode] = scores
    confusion = torch.zeros(len(names), len(names), dtype=torch.long)
    confusion.index_put_((task_ids, routed), torch.ones_like(routed), accumulate=True)
    routing = {"experts": names, "accuracy": (routed == task_ids).float().mean().item(),
               "per_task": {n: (confusion[i, i] / confusion[i].sum()).item() for i, n in enumerate(names)},
               "confusion": confusion.tolist(), "top_k": params.evaluate.top_k,
               "temperature": params.evaluate.temperature,
               "features": {k: getattr(saved.config, k) for k in ("layers", "pooling", "max_length")}}
    return rows, routing


def storage(pool: ExpertSet, factors_dir: Path, names: list[str]) -> dict:
    """Bytes kept per approach (tensor bytes; float32 dense as reference): dense experts vs shared backbone +
    exclusive factors (heads excluded, as compress's stats count them) + every expert's head, each once."""
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    backbone = sum(nbytes(pool.base_tensor(k)) for k in pool.mergeable_keys())
    heads = sum(nbytes(pool.expert_tensor(n, k)) for n in names for k in pool.head_keys())
    files = sum((factors_dir / f"{n}.safetensors").stat().st_size for n in names)
    stats = [json.loads((factors_dir / f"{n}.stats.json").read_text())["totals"] for n in names]
    dense_exclusive = sum(s["dense_bytes_float32"] for s in stats)
    exclusive = sum(s["exclusive_bytes"] for s in stats)
    twin = backbone + exclusive + heads
    return {"dense_experts_bytes": len(names) * backbone + heads, "exclusive_bytes": exclusive,
            "exclusive_file_bytes": files, "dense_exclusive_bytes": dense_exclusive,
            "exclusive_ratio": exclusive / dense_exclusive, "head_bytes": heads,
            "bytes_by_method": {"experts": len(names) * backbone + heads, "base_heads": backbone + heads,
                                "shared": backbone + heads, "twin_router": twin, "twin_oracle": twin,
                                "twin_true_routing": twin}}


def evaluate(params: Params, shared_dir="artifacts/shared", factors_dir="artifacts/exclusive",
             router_dir="artifacts/router", out_dir="artifacts/eval") -> dict:
    shared_dir, factors_dir, router_dir, out_dir = map(Path, (shared_dir, factors_dir, router_dir, out_dir))
    pool = open_pool(params)
    ev = Evaluator(params, pool, AutoTokenizer.from_pretrained(shared_dir))
    names = ev.names
    val, test = load_registry_split(params, "validation"), load_registry_split(params, "test")
    rows, choices, info = {}, {}, {}
    rows["experts"] = ev.expert_scores(test)
    rows["base_heads"] = ev.backbone_scores({k: pool.base_tensor(k) for k in pool.mergeable_keys()}, test, "base")
    shared = load_shared(shared_dir)
    rows["shared"] = ev.backbone_scores(shared, test, "shared")
    baselines = params.evaluate.baselines
    if baselines:
        val_ref = ev.expert_scores(val)
        for spec in progress_bar(baselines, desc="baselines"):
            name = spec.method if spec.method not in rows else f"{spec.method}_{len(rows)}"
            options, backbone, val_mean = choose_baseline(ev, spec, val, val_ref)
            choices[name] = {"options": options, "validation_mean_normalized": val_mean}
            rows[name] = ev.backbone_scores(backbone, test, name)
            info[name] = row_info(name, spec.method)
    twin, routing = twin_scores(ev, params, test, shared, shared_dir, factors_dir, router_dir)
    rows.update(twin)
    router_report = json.loads((router_dir / "report.json").read_text())
    routing["holdout_accuracy"] = router_report["holdout_accuracy"]
    metrics = {"tasks": names, "metric": {n: params.experts[n].metric for n in names},
               "methods": {m: {**(info.get(m) or row_info(m)), **summarize(s, rows["experts"])}
                           for m, s in rows.items()},
               "choices": choices, "routing": routing, "storage": storage(pool, factors_dir, names)}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(metrics, out_dir / "metrics.json")
    table = pd.DataFrame([{"method": m, "task": t, "score": r["scores"][t], "normalized": r["normalized"][t]}
                          for m, r in metrics["methods"].items() for t in names])
    _write_csv(table, out_dir / "scores.csv")
    _write_csv(pd.DataFrame([{"task": t, "routing_accuracy": routing["per_task"][t]} for t in names]),
               out_dir / "routing.csv")
    return metrics


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    write_text_atomic(df.to_csv(index=False, float_format="%.4f"), path)


def add_arguments(parser) -> None:
    parser.add_argument("--params", default="params.yaml")


def main(args) -> None:
    metrics = evaluate(load_params(args.params))
    for m, r in metrics["methods"].items():
        print(f"{m:20s} mean normalised {r['mean_normalized']:.1f}")
