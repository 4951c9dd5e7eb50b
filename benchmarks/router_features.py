"""Which router design routes best? Chosen by k-fold cross-validation over the validation splits; test once.

Runs on a finished shared expert (artifacts/shared and the task tables of params.yaml). Features are extracted
once per (layer set, pooling) from the validation and test splits under the shared expert. Each setting is
scored by stratified k-fold CV over the VALIDATION data only: per fold the router is trained as the `router`
stage trains it (early stopping on a held-out part of the training folds, optionally a refit on all of them)
and routes the left-out fold; a setting's score is its mean fold accuracy (per-task accuracy pooled over the
folds). The setting with the best mean CV accuracy is then trained on all validation data, as the `router`
stage would, and scored on the test splits ONCE: test is printed for the chosen row only.

Settings are overrides of a fixed reference router (the paper's: last layer, mean pooling, MLP 2 x D, no refit)
whose training knobs (lr, epochs, patience, ...) come from params.yaml's `router:` section.

    python benchmarks/router_features.py [--params params.yaml] [--shared artifacts/shared] [--folds 5]
                                         [--only REGEX]
"""
import argparse
import re
import time

import torch
from transformers import AutoModel, AutoTokenizer

from tasks.params import load_params
from tasks.route import router_config
from tasks.taskdata import load_registry_split
from twinmerge.router import features_from_batch, route, stratified_split, train_router

ALL6 = (1, 2, 3, 4, 5, 6)
REFERENCE = {"hidden_mult": 2.0, "depth": 2, "dropout": 0.5, "refit": False}  # the paper's router
SETTINGS = [  # (name, layers, pooling, overrides of REFERENCE)
    ("last layer, mean (paper)", (-1,), "mean", {}),
    ("last layer, cls", (-1,), "cls", {}),
    ("last layer, mean+max", (-1,), "mean_max", {}),
    ("layers -1,-3, mean", (-1, -3), "mean", {}),
    ("layers -1,-2,-3,-4, mean", (-1, -2, -3, -4), "mean", {}),
    ("embeddings + last, mean", (0, -1), "mean", {}),
    ("all 6 layers, mean", ALL6, "mean", {}),
    ("last layer, mean, dropout 0.1", (-1,), "mean", {"dropout": 0.1}),
    ("last layer, mean, linear router", (-1,), "mean", {"depth": 0}),
    ("last layer, mean, half the training data", (-1,), "mean", {"train_share": 0.5}),
    ("last layer, mean, refit", (-1,), "mean", {"refit": True}),
    ("layers -1,-3, mean, refit", (-1, -3), "mean", {"refit": True}),
    ("embeddings + last, mean, refit", (0, -1), "mean", {"refit": True}),
    ("all 6 layers, mean, refit", ALL6, "mean", {"refit": True}),
    ("embeddings + all 6 layers, mean, refit", (0, *ALL6), "mean", {"refit": True}),
    ("all 6 layers, mean, narrow MLP (0.25 D)", ALL6, "mean", {"hidden_mult": 0.25}),
    ("all 6 layers, mean, refit, narrow MLP (0.25 D)", ALL6, "mean", {"refit": True, "hidden_mult": 0.25}),
    ("all 6 layers, mean, refit, linear router", ALL6, "mean", {"refit": True, "depth": 0}),
    ("embeddings + last, mean, refit, narrow MLP (0.25 D)", (0, -1), "mean", {"refit": True, "hidden_mult": 0.25}),
]


def all_hidden(model, tokenizer, texts, max_length, settings):
    """Every setting's pooled features, computed in one pass: {(layers, pooling): Tensor[N, D]}."""
    wanted = {(layers, pooling) for _, layers, pooling, _ in settings}
    out = {key: [] for key in wanted}
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            idx = order[start:start + 64]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            hidden = model(**enc, output_hidden_states=True).hidden_states
            for layers, pooling in wanted:
                out[(layers, pooling)].append((idx, features_from_batch(hidden, enc["attention_mask"], layers,
                                                                        pooling)))
    result = {}
    for key, chunks in out.items():
        feats = torch.empty(len(texts), chunks[0][1].shape[1])
        for idx, f in chunks:
            feats[torch.tensor(idx)] = f
        result[key] = feats
    return result


def stratified_folds(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Fold id in [0, k) per sample: each class is shuffled (seeded) and dealt round-robin over the folds."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        fold[idx[torch.randperm(len(idx), generator=g)]] = torch.arange(len(idx)) % k
    return fold


def fit(params, x, y, overrides):
    """Train a router on (x, y) as the `router` stage does, with REFERENCE + overrides on params.router."""
    overrides = {**REFERENCE, **overrides}
    share = overrides.pop("train_share", 1.0)
    if share < 1.0:  # a seeded stratified subsample of the training data
        keep, _ = stratified_split(y, 1.0 - share, params.seed)
        x, y = x[keep], y[keep]
    config = router_config(params, x.shape[1])
    for key, value in overrides.items():
        setattr(config, key, value)
    return train_router(x, y, config, progress=False)[0]


def cross_validate(params, x, y, overrides, folds, k):
    """(fold accuracies, per-task accuracy pooled over the folds) of a setting on validation data."""
    pred = torch.empty_like(y)
    accs = []
    for f in range(k):
        train, held = folds != f, folds == f
        pred[held] = route(fit(params, x[train], y[train], overrides), x[held]).argmax(1)
        accs.append((pred[held] == y[held]).float().mean().item())
    per_task = [(pred[y == i] == i).float().mean().item() for i in range(int(y.max()) + 1)]
    return accs, per_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--shared", default="artifacts/shared")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only", default="", help="run only the settings whose name matches this regex")
    args = parser.parse_args()
    settings = [s for s in SETTINGS if re.search(args.only, s[0])]
    params = load_params(args.params)
    names = list(params.experts)
    model = AutoModel.from_pretrained(args.shared).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.shared)
    splits = {s: load_registry_split(params, s) for s in ("validation", "test")}
    texts = {s: [t for n in names for t in splits[s][n][0]] for s in splits}
    labels = {s: torch.tensor([i for i, n in enumerate(names) for _ in splits[s][n][0]]) for s in splits}
    t0 = time.perf_counter()
    feats = {s: all_hidden(model, tokenizer, texts[s], params.router.max_length, settings) for s in splits}
    print(f"features for {len(texts['validation'])} validation + {len(texts['test'])} test texts: "
          f"{time.perf_counter() - t0:.1f}s; {args.folds}-fold CV over validation, seed {params.seed}")
    y_val = labels["validation"]
    folds = stratified_folds(y_val, args.folds, params.seed)
    print("| setting | CV mean | fold std | " + " | ".join(names) + " |\n" + "|---" * (3 + len(names)) + "|",
          flush=True)
    scores = []
    for name, layers, pooling, overrides in settings:
        accs, per_task = cross_validate(params, feats["validation"][(layers, pooling)], y_val, overrides, folds,
                                        args.folds)
        mean, std = torch.tensor(accs).mean().item(), torch.tensor(accs).std().item()
        scores.append(mean)
        print(f"| {name} | {100 * mean:.1f} | {100 * std:.1f} | "
              + " | ".join(f"{100 * a:.1f}" for a in per_task) + " |", flush=True)
    best = max(range(len(settings)), key=lambda i: scores[i])  # ties: the earlier (simpler) setting
    name, layers, pooling, overrides = settings[best]
    router = fit(params, feats["validation"][(layers, pooling)], y_val, overrides)
    pred = route(router, feats["test"][(layers, pooling)]).argmax(1)
    y_test = labels["test"]
    per_task = [(pred[y_test == i] == i).float().mean().item() for i in range(len(names))]
    print(f"chosen on validation: {name} (layers {list(layers)}, {pooling}, {({**REFERENCE, **overrides})}); "
          f"trained on all validation data, test routing accuracy {100 * (pred == y_test).float().mean():.1f} ("
          + ", ".join(f"{n} {100 * a:.1f}" for n, a in zip(names, per_task)) + ")")


if __name__ == "__main__":
    main()
