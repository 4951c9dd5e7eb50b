"""Which router features route best? Routing accuracy per task for several (layers, pooling, router) settings.

Runs on a finished pipeline (artifacts/shared and the task tables of params.yaml). Features are extracted once
per (layer set, pooling) from the validation and test splits under the shared expert; each router is trained
on validation data only (early stopping on a held-out part of it) and scored on the test splits.

    python benchmarks/router_features.py [--params params.yaml] [--shared artifacts/shared] [--only REGEX]
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

SETTINGS = [  # (name, layers, pooling, router overrides)
    ("last layer, mean (paper)", (-1,), "mean", {}),
    ("last layer, cls", (-1,), "cls", {}),
    ("last layer, mean+max", (-1,), "mean_max", {}),
    ("layers -1,-3, mean", (-1, -3), "mean", {}),
    ("layers -1,-2,-3,-4, mean", (-1, -2, -3, -4), "mean", {}),
    ("embeddings + last, mean", (0, -1), "mean", {}),
    ("all 6 layers, mean", (1, 2, 3, 4, 5, 6), "mean", {}),
    ("last layer, mean, dropout 0.1", (-1,), "mean", {"dropout": 0.1}),
    ("last layer, mean, linear router", (-1,), "mean", {"depth": 0}),
    ("last layer, mean, half the validation data", (-1,), "mean", {"validation_share": 0.5}),
    ("last layer, mean, refit on all validation", (-1,), "mean", {"refit": True}),
    ("layers -1,-3, mean, refit", (-1, -3), "mean", {"refit": True}),
    ("embeddings + last, mean, refit", (0, -1), "mean", {"refit": True}),
    ("all 6 layers, mean, refit", (1, 2, 3, 4, 5, 6), "mean", {"refit": True}),
    ("embeddings + all 6 layers, mean, refit", (0, 1, 2, 3, 4, 5, 6), "mean", {"refit": True}),
    ("all 6 layers, mean, refit, narrow MLP (0.25 D)", (1, 2, 3, 4, 5, 6), "mean", {"refit": True, "hidden_mult": 0.25}),
    ("all 6 layers, mean, refit, linear router", (1, 2, 3, 4, 5, 6), "mean", {"refit": True, "depth": 0}),
]


def all_hidden(model, tokenizer, texts, max_length, settings):
    """Every layer's pooled features, computed in one pass: {(layers, pooling): Tensor[N, D]}."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--shared", default="artifacts/shared")
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
          f"{time.perf_counter() - t0:.1f}s")
    header = "| setting | holdout | test | " + " | ".join(names) + " |"
    print(header + "\n" + "|---" * (3 + len(names)) + "|")
    for name, layers, pooling, overrides in settings:
        x_val, x_test = feats["validation"][(layers, pooling)], feats["test"][(layers, pooling)]
        y_val, overrides = labels["validation"], dict(overrides)
        share = overrides.pop("validation_share", 1.0)
        if share < 1.0:  # a seeded stratified subsample of the validation data
            keep, _ = stratified_split(y_val, 1.0 - share, params.seed)
            x_val, y_val = x_val[keep], y_val[keep]
        config = router_config(params, x_val.shape[1])
        for k, v in overrides.items():
            setattr(config, k, v)
        router, report = train_router(x_val, y_val, config, progress=False)
        pred = route(router, x_test).argmax(1)
        per_task = [(pred[labels["test"] == i] == i).float().mean().item() for i in range(len(names))]
        acc = (pred == labels["test"]).float().mean().item()
        print(f"| {name} | {100 * report.holdout_accuracy:.1f} | {100 * acc:.1f} | "
              + " | ".join(f"{100 * a:.1f}" for a in per_task) + " |")


if __name__ == "__main__":
    main()
