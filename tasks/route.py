"""Step `router`: router features of the task inputs of `router.splits` (shared expert's hidden states,
pooled), router fit with early stopping on a held-out part of them -> `artifacts/router/`.

`router.splits` is the validation splits by default (the paper's protocol), optionally with the training splits
the experts were fine-tuned on. The test splits are never read here. The router folder carries its feature
recipe (layers, pooling, max_length, tokenizer, sha256 of the shared model's weights; see `twinmerge.router`),
so consumers never read params.router. `artifacts/router/report.json` holds the inputs per split, the holdout
routing accuracy, overall and per task, and the confusion matrix.
"""
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from tasks.params import Params, load_params
from tasks.taskdata import load_registry_split
from twinmerge.errors import TwinMergeError
from twinmerge.io import weights_sha256, write_json_atomic
from twinmerge.exclusive import one_thread
from twinmerge.router import RouterConfig, extract_features, save_router, train_router


def router_config(params: Params, in_dim: int) -> RouterConfig:
    r = params.router
    return RouterConfig(in_dim=in_dim, n_experts=len(params.experts), hidden_mult=r.hidden_mult, depth=r.depth,
                        dropout=r.dropout, lr=r.lr, weight_decay=r.weight_decay, epochs=r.epochs,
                        batch_size=r.batch_size, patience=r.patience, holdout_fraction=r.holdout_fraction,
                        seed=params.seed, layers=list(r.layers), pooling=r.pooling, max_length=r.max_length,
                        refit=r.refit, ensemble=r.ensemble)


def fit_router(params: Params, shared_dir: str | Path = "artifacts/shared", out_dir: str | Path = "artifacts/router",
               progress: bool = True) -> dict:
    names = list(params.experts)
    if len(names) < 2:
        raise TwinMergeError(f"params.yaml: experts: the router needs at least 2 experts, got {len(names)}")
    r = params.router
    texts, labels, counts = [], [], {}
    for split in r.splits:
        inputs = load_registry_split(params, split)
        texts += [t for name in names for t in inputs[name][0]]
        labels += [i for i, name in enumerate(names) for _ in inputs[name][0]]
        counts[split] = sum(len(inputs[name][0]) for name in names)
    labels = torch.tensor(labels)
    model = AutoModel.from_pretrained(shared_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(shared_dir)
    if params.generative:  # a causal LM reads a prompt left to right: pad on the right (positions from 0, as
        tokenizer.padding_side = "right"  # unpadded), with eos where the tokenizer has no pad token (GPT-2)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    with one_thread():  # bit-identical routers whatever threads the flow gives this stage (1 or all cores)
        features = extract_features(model, tokenizer, texts, layers=tuple(r.layers), pooling=r.pooling,
                                    max_length=r.max_length, progress=progress)
        config = router_config(params, features.shape[1])
        router, report = train_router(features, labels, config, progress=progress, texts=texts)
    save_router(router, config, out_dir, tokenizer, weights_sha256(shared_dir))
    summary = {"experts": names, "inputs": counts, "holdout_accuracy": report.holdout_accuracy,
               "per_task": dict(zip(names, report.per_class_accuracy)), "confusion": report.confusion,
               "epochs_run": report.epochs_run, "best_epoch": report.best_epoch, "n_fit": report.n_fit,
               "n_holdout": report.n_holdout, "history": report.history}
    write_json_atomic(summary, Path(out_dir) / "report.json")
    return summary


def add_arguments(parser) -> None:
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true")


def main(args) -> None:
    s = fit_router(load_params(args.params), progress=not args.no_progress)
    print(f"router holdout accuracy {s['holdout_accuracy']:.4f}; per task "
          + ", ".join(f"{k}: {v:.3f}" for k, v in s["per_task"].items() if v is not None))
