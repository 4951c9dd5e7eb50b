"""Step `evaluate`: gather the reference rows and every listed method's rows -> `artifacts/eval/`.

Rows (metrics.json `methods`), in order: `experts` (each expert on its own task: the upper bound, normalised
100 by definition) and `base_heads` (generative registries: `base`, zero-shot; from `score_experts`), then each method of `params.methods.static` and
`params.methods.routed` in the order listed (from `artifacts/eval/methods/<key>.json`, written by `method`).
Every row carries its label, whether it uses the task id at inference (`uses_task_id`), the data it learned
or selected from (`data`), the bytes it stores to serve every task (`stored_bytes`), per-task test scores (x100)
and normalised scores (100 * score / expert's score on the same task) with their means.
Outputs: metrics.json (DVC metrics), scores.csv (method, task, score, normalized) and routing.csv for plots.
"""
import json
from pathlib import Path

import pandas as pd

from tasks.method import RESULT_FORMAT
from tasks.params import METHOD_KINDS, Params, ParamsError, load_params
from twinmerge.io import write_json_atomic, write_text_atomic
from twinmerge.taskpool import summarize


def read_result(path: Path, kind: str, key: str, spec: dict) -> dict:
    """A method's result file, checked to be from the current params entry (else one line: re-run it)."""
    if not path.is_file():
        raise ParamsError(f"{path}: not found (run `dvc repro {kind}@{key}`)")
    result = json.loads(path.read_text())
    if result.get("format") != RESULT_FORMAT or result.get("spec") != spec or result.get("kind") != kind:
        raise ParamsError(f"{path}: built from another methods.{kind}.{key} entry than params.yaml's "
                          f"(run `dvc repro {kind}@{key}`)")
    return result


def gather(params: Params, eval_dir: str | Path = "artifacts/eval") -> dict:
    eval_dir = Path(eval_dir)
    reference = json.loads((eval_dir / "experts.json").read_text())
    names = list(params.experts)
    if reference["tasks"] != names:
        raise ParamsError(f"{eval_dir / 'experts.json'}: scored experts {reference['tasks']}, params.yaml lists "
                          f"{names} (run `dvc repro score_experts`)")
    rows, choices, routing, storage = dict(reference["rows"]), {}, None, {}
    for kind in METHOD_KINDS:
        for key, spec in getattr(params.methods, kind).items():
            result = read_result(eval_dir / "methods" / f"{key}.json", kind, key, spec.model_dump())
            clash = sorted(set(result["rows"]) & set(rows))
            if clash:
                raise ParamsError(f"params.yaml: methods.{kind}.{key}: row name(s) {', '.join(clash)} already "
                                  "used by another method; rename the entry")
            rows.update(result["rows"])
            if result["choice"]:
                choices[key] = result["choice"]
            routing = routing or result["routing"]
            storage.update(result["storage"] or {})
    labels = [r["label"] for r in rows.values()]
    for row, r in rows.items():  # two entries of one method with the same label (e.g. ties twice): name the rows
        if labels.count(r["label"]) > 1:
            r["label"] = f"{r['label']} [{row}]"
    methods = {row: {**{k: v for k, v in r.items() if k != "scores"}, **summarize(r["scores"], reference["test"])}
               for row, r in rows.items()}
    return {"tasks": names, "metric": {n: params.experts[n].metric for n in names}, "methods": methods,
            "choices": choices, "routing": routing, "storage": storage}


def evaluate(params: Params, eval_dir: str | Path = "artifacts/eval") -> dict:
    eval_dir = Path(eval_dir)
    metrics = gather(params, eval_dir)
    write_json_atomic(metrics, eval_dir / "metrics.json")
    names = metrics["tasks"]
    table = pd.DataFrame([{"method": m, "task": t, "score": r["scores"][t], "normalized": r["normalized"][t]}
                          for m, r in metrics["methods"].items() for t in names])
    _write_csv(table, eval_dir / "scores.csv")
    routing = metrics["routing"]
    _write_csv(pd.DataFrame([{"task": t, "routing_accuracy": routing["per_task"][t] if routing else None}
                             for t in names]), eval_dir / "routing.csv")
    return metrics


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    write_text_atomic(df.to_csv(index=False, float_format="%.4f"), path)


def add_arguments(parser) -> None:
    parser.add_argument("--params", default="params.yaml")


def main(args) -> None:
    metrics = evaluate(load_params(args.params))
    for m, r in metrics["methods"].items():
        print(f"{m:24s} mean normalised {r['mean_normalized']:.1f}")
