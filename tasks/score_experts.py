"""Step `score_experts`: the reference rows -> `artifacts/eval/experts.json`.

Each expert on its own task (validation: the selection subset methods choose options on; test: the
normalisation reference, 100 normalised by definition)
and the pretrained base backbone with each task's expert head (test), with their stored bytes. Methods select
their options against the validation scores; `evaluate` normalises every row by the test scores.
Generative registries (causal LMs, no heads): the base row is the base model itself, zero-shot (`base`).
"""
from pathlib import Path

from transformers import AutoTokenizer

from tasks.method import task_pool
from tasks.modularize import open_pool
from tasks.params import Params, load_params
from twinmerge.io import write_json_atomic
from twinmerge.methods.base import backbone_bytes, head_bytes, result_row

ROWS = {
    "experts": ("Individual experts (upper bound; task id picks the expert)", True),
    "base_heads": ("Base model + expert heads (task id picks the head)", True),
}
GENERATIVE_ROWS = {
    "experts": ROWS["experts"],
    "base": ("Base model, zero-shot (one causal LM for every task, no task id)", False),
}


def score_experts(params: Params, artifacts: str | Path = "artifacts") -> dict:
    artifacts = Path(artifacts)
    pool = open_pool(params, artifacts / "base", artifacts / "checkpoints")
    tokenizer = AutoTokenizer.from_pretrained(artifacts / "base")
    val, test = (task_pool(params, pool, s, tokenizer) for s in ("validation", "test"))
    backbone, heads = backbone_bytes(pool), head_bytes(pool)
    base = {k: pool.base_tensor(k) for k in pool.mergeable_keys()}
    rows = GENERATIVE_ROWS if params.generative else ROWS
    base_row = list(rows)[1]
    scores = {"experts": test.score_experts(), base_row: test.score_backbone(base, "base")}
    stored = {"experts": len(pool.names) * backbone + heads, base_row: backbone + heads}
    out = {"tasks": list(pool.names), "validation": val.score_experts(), "test": scores["experts"],
           "rows": {row: result_row(label, row, None, uses, "none", stored[row], scores[row])
                    for row, (label, uses) in rows.items()}}
    write_json_atomic(out, artifacts / "eval" / "experts.json")
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--params", default="params.yaml")


def main(args) -> None:
    out = score_experts(load_params(args.params))
    for name, s in out["test"].items():
        print(f"expert {name:16s} test {s:.1f}  validation {out['validation'][name]:.1f}")
