"""Which router design routes best? Chosen by k-fold cross-validation over the validation splits; test once.

Runs on a finished pipeline (artifacts/shared, artifacts/base and the task tables of params.yaml). Features are
extracted once per (source model, layer set, pooling) and per part (the validation texts, their word-window
crops, the training texts; the test texts only for the chosen setting). Each setting is scored by stratified
k-fold CV over the VALIDATION data: per fold the router is trained as the `router` stage trains it (early
stopping on a held-out part of its training rows, optionally a refit on all of them) on the other folds, plus
whatever the setting adds (crops of those folds' texts, the experts' training inputs), and routes the left-out
fold. A setting's score is its mean fold accuracy; per-task accuracy and the confusion matrix [true, routed] are
pooled over the folds. The eligible setting (validation data only) with the best mean CV accuracy is then
trained on all validation data and scored on the test splits ONCE: test is read for the chosen row only.

Settings are overrides of a fixed reference router (the paper's: last layer, mean pooling, MLP 2 x D, no refit)
whose training knobs (lr, epochs, patience, ...) come from params.yaml's `router:` section. Study keys besides
the router's own: `source` (features of the shared expert, the base model, both concatenated, or every fine-tuned
expert's: a probe of the features' limit, six forwards per input), `classifier`
("prototype": nearest class mean by cosine on standardised features), `crops` (that many seeded word-window
crops of every training text added as training rows), `train_share` (a seeded stratified subsample of the
training rows), `with_train` (the experts' training inputs added: reported, never eligible, as issue 15 asks
for validation data only; the `router.splits` option of the stage).

    python benchmarks/router_features.py [--params params.yaml] [--shared artifacts/shared] [--base artifacts/base]
                                         [--folds 5] [--only REGEX] [--json OUT.json]
"""
import argparse
import re
import time

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from tasks.params import load_params
from tasks.route import router_config
from tasks.taskdata import load_registry_split
from twinmerge.io import write_json_atomic
from twinmerge.router import features_from_batch, route, stratified_split, train_router

ALL6 = (1, 2, 3, 4, 5, 6)
REFERENCE = {"hidden_mult": 2.0, "depth": 2, "dropout": 0.5, "refit": False, "ensemble": None}  # the paper's router
STUDY_KEYS = ("source", "classifier", "crops", "train_share", "with_train")
NARROW = {"hidden_mult": 0.25}  # the default router's MLP (params.yaml)
SETTINGS = [  # (name, layers, pooling, overrides of REFERENCE and study keys)
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
    ("all 6 layers, mean, narrow MLP (0.25 D)", ALL6, "mean", NARROW),
    ("all 6 layers, mean, refit, narrow MLP (0.25 D)", ALL6, "mean", {"refit": True, **NARROW}),
    ("all 6 layers, mean, refit, linear router", ALL6, "mean", {"refit": True, "depth": 0}),
    ("embeddings + last, mean, refit, narrow MLP (0.25 D)", (0, -1), "mean", {"refit": True, **NARROW}),
    # issue 15's levers, each a change of the narrow MLP on all 6 layers
    ("all 6 layers, mean, narrow MLP, base-model features", ALL6, "mean", {"source": "base", **NARROW}),
    ("all 6 layers, mean, narrow MLP, shared + base features", ALL6, "mean", {"source": "shared+base", **NARROW}),
    ("all 6 layers, mean, nearest prototype", ALL6, "mean", {"classifier": "prototype"}),
    ("all 6 layers, mean, narrow MLP + char n-gram TF-IDF ensemble", ALL6, "mean",
     {"ensemble": "char_ngrams", **NARROW}),
    ("all 6 layers, mean, narrow MLP, 4 word-window crops per text", ALL6, "mean", {"crops": 4, **NARROW}),
    ("all 6 layers, mean, narrow MLP, a quarter of the training data", ALL6, "mean", {"train_share": 0.25, **NARROW}),
    ("all 6 layers, mean, narrow MLP, half the training data", ALL6, "mean", {"train_share": 0.5, **NARROW}),
    ("all 6 layers, mean, narrow MLP + the experts' training inputs", ALL6, "mean", {"with_train": True, **NARROW}),
    # a probe, not a router (six expert forwards per input): are the features the limit?
    ("every expert's own last layer, mean, narrow MLP", (-1,), "mean", {"source": "experts", **NARROW}),
]


def all_hidden(model, tokenizer, texts, max_length, wanted):
    """Pooled features of `texts` for every (layers, pooling) in `wanted`, in one pass: {key: Tensor[N, D]}."""
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


def word_crops(texts, n, seed):
    """(crops, parent index): n seeded word windows of each text, each 40-90% of its words (at least 2); a text
    of fewer than 4 words is its own crop."""
    g = torch.Generator().manual_seed(seed)
    crops, parents = [], []
    for i, text in enumerate(texts):
        words = text.split()
        for _ in range(n):
            if len(words) < 4:
                crops.append(text)
            else:
                share = 0.4 + 0.5 * torch.rand((), generator=g).item()
                length = max(2, round(share * len(words)))
                start = int(torch.randint(len(words) - length + 1, (), generator=g))
                crops.append(" ".join(words[start:start + length]))
            parents.append(i)
    return crops, torch.tensor(parents)


class Features:
    """Lazily extracted, cached features: part ("validation", "crops", "train", "test") x source x recipe, with
    each part's texts and labels (crops: the labels of their parents, `crop_parents` [N_crops])."""

    def __init__(self, models, texts, labels, max_length, crops=0, seed=0):
        self.models, self.texts, self.labels, self.max_length, self.cache = models, texts, labels, max_length, {}
        self.texts["crops"], self.crop_parents = word_crops(texts["validation"], crops, seed)

    def prepare(self, part, sources, recipes):
        """Extract every (source, recipe) of `part` not cached yet, one pass per source model."""
        for source in sources:
            todo = {r for r in recipes if (part, source, r) not in self.cache}
            if todo:
                model, tokenizer = self.models[source]
                for recipe, f in all_hidden(model, tokenizer, self.texts[part], self.max_length, todo).items():
                    self.cache[(part, source, recipe)] = f

    def get(self, part, source, layers, pooling):
        """Features [N, D] of `part` ("shared+base": both sources concatenated; "experts": every expert's)."""
        sources = [m for m in self.models if m.startswith("expert:")] if source == "experts" else source.split("+")
        self.prepare(part, sources, {(layers, pooling)})
        return torch.cat([self.cache[(part, s, (layers, pooling))] for s in sources], dim=1)


def fit(params, x, y, overrides, texts=None):
    """Train a router on (x, y) as the `router` stage does, with REFERENCE + overrides on params.router (texts:
    the rows' inputs, read by an n-gram ensemble member)."""
    config = router_config(params, x.shape[1])
    for key, value in {**REFERENCE, **overrides}.items():
        setattr(config, key, value)
    return train_router(x, y, config, progress=False, texts=texts)[0]


def fit_predictor(params, x, y, texts, overrides):
    """A classifier on training rows (features x, labels y, their texts) -> predict(x, texts) -> probabilities."""
    if overrides.get("classifier") == "prototype":
        n = len(params.experts)
        mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
        protos = F.normalize(torch.stack([((x[y == c] - mean) / std).mean(0) for c in range(n)]), dim=1)
        return lambda xs, _: torch.softmax(10 * F.normalize((xs - mean) / std, dim=1) @ protos.T, dim=1)
    router = fit(params, x, y, {k: v for k, v in overrides.items() if k not in STUDY_KEYS}, texts)
    return lambda xs, ts: route(router, xs, texts=ts)


def training_rows(params, feats, key, overrides, rows):
    """(features, labels, texts) a router learns from when validation rows `rows` are its training folds."""
    source, layers, pooling = key
    y_val = feats.labels["validation"]
    if overrides.get("train_share", 1.0) < 1.0:  # a seeded stratified subsample of the training folds
        keep, _ = stratified_split(y_val[rows], 1.0 - overrides["train_share"], params.seed)
        rows = rows[keep]
    x = [feats.get("validation", source, layers, pooling)[rows]]
    y, texts = [y_val[rows]], [feats.texts["validation"][i] for i in rows.tolist()]
    if overrides.get("crops"):
        parents = feats.crop_parents
        mine = torch.isin(parents, rows).nonzero().flatten()
        x.append(feats.get("crops", source, layers, pooling)[mine])
        y.append(y_val[parents[mine]])
        texts += [feats.texts["crops"][i] for i in mine.tolist()]
    if overrides.get("with_train"):
        x.append(feats.get("train", source, layers, pooling))
        y.append(feats.labels["train"])
        texts += feats.texts["train"]
    return torch.cat(x), torch.cat(y), texts


def cross_validate(params, feats, key, overrides, folds, k):
    """(fold accuracies, per-task accuracy and confusion [true, routed] pooled over the folds) on validation."""
    x_val, y = feats.get("validation", *key), feats.labels["validation"]
    texts = feats.texts["validation"]
    pred, accs = torch.empty_like(y), []
    for f in range(k):
        held = (folds == f).nonzero().flatten()
        predict = fit_predictor(params, *training_rows(params, feats, key, overrides, (folds != f).nonzero().flatten()),
                                overrides)
        pred[held] = predict(x_val[held], [texts[i] for i in held.tolist()]).argmax(1)
        accs.append((pred[held] == y[held]).float().mean().item())
    n = len(params.experts)
    confusion = torch.zeros(n, n, dtype=torch.long).index_put_((y, pred), torch.ones_like(y), accumulate=True)
    per_task = [(confusion[i, i] / confusion[i].sum()).item() for i in range(n)]
    return accs, per_task, confusion


def stratified_folds(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Fold id in [0, k) per sample: each class is shuffled (seeded) and dealt round-robin over the folds."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        fold[idx[torch.randperm(len(idx), generator=g)]] = torch.arange(len(idx)) % k
    return fold


def top_confusions(confusion, names, k=3):
    """The k largest off-diagonal counts, e.g. "movie>fortune_topic 12"."""
    off = confusion.clone().fill_diagonal_(0)
    top = off.flatten().argsort(descending=True, stable=True)[:k]
    return ", ".join(f"{names[i // len(names)]}>{names[i % len(names)]} {off.flatten()[i]}" for i in top.tolist()
                     if off.flatten()[i] > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--shared", default="artifacts/shared")
    parser.add_argument("--base", default="artifacts/base")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only", default="", help="run only the settings whose name matches this regex")
    parser.add_argument("--json", default=None, help="also write every row (with its confusion matrix) here")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()  # an expert's unused classifier head is expected (source "experts")
    settings = [s for s in SETTINGS if re.search(args.only, s[0])]
    params = load_params(args.params)
    names = list(params.experts)
    sources = {s for *_, o in settings for s in o.get("source", "shared").split("+")} | {"shared"}
    paths = {"shared": args.shared, "base": args.base,
             **({f"expert:{n}": spec.path for n, spec in params.experts.items()} if "experts" in sources else {})}
    models = {name: (AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
              for name, path in paths.items() if name in sources or name.startswith("expert:")}
    parts = ["validation"] + (["train"] if any(o.get("with_train") for *_, o in settings) else [])
    splits = {s: load_registry_split(params, s) for s in parts}
    texts = {s: [t for n in names for t in splits[s][n][0]] for s in parts}
    labels = {s: torch.tensor([i for i, n in enumerate(names) for _ in splits[s][n][0]]) for s in parts}
    feats = Features(models, texts, labels, params.router.max_length,
                     crops=max([o.get("crops", 0) for *_, o in settings] + [0]), seed=params.seed)
    t0 = time.perf_counter()
    feats.prepare("validation", ["shared"], {(layers, pooling) for _, layers, pooling, _ in settings})
    print(f"features for {len(texts['validation'])} validation texts: {time.perf_counter() - t0:.1f}s; "
          f"{args.folds}-fold CV over validation, seed {params.seed}")
    y_val = labels["validation"]
    folds = stratified_folds(y_val, args.folds, params.seed)
    print("| setting | inputs | CV mean | fold std | " + " | ".join(names) + " | most confused (true>routed) |\n"
          + "|---" * (5 + len(names)) + "|", flush=True)
    rows = []
    for name, layers, pooling, overrides in settings:
        key = (overrides.get("source", "shared"), layers, pooling)
        accs, per_task, confusion = cross_validate(params, feats, key, overrides, folds, args.folds)
        mean, std = torch.tensor(accs).mean().item(), torch.tensor(accs).std().item()
        inputs = "validation + train" if overrides.get("with_train") else "validation"
        rows.append({"setting": name, "inputs": inputs, "eligible": not overrides.get("with_train"),
                     "cv_mean": mean, "fold_std": std, "fold_accuracies": accs, "per_task": dict(zip(names, per_task)),
                     "confusion": confusion.tolist()})
        print(f"| {name} | {inputs} | {100 * mean:.1f} | {100 * std:.1f} | "
              + " | ".join(f"{100 * a:.1f}" for a in per_task) + f" | {top_confusions(confusion, names)} |",
              flush=True)
    eligible = [i for i, r in enumerate(rows) if r["eligible"]]
    best = max(eligible, key=lambda i: rows[i]["cv_mean"])  # ties: the earlier (simpler) setting
    name, layers, pooling, overrides = settings[best]
    key = (overrides.get("source", "shared"), layers, pooling)
    test = load_registry_split(params, "test")  # read once, for the chosen setting only
    feats.texts["test"] = [t for n in names for t in test[n][0]]
    y_test = torch.tensor([i for i, n in enumerate(names) for _ in test[n][0]])
    predict = fit_predictor(params, *training_rows(params, feats, key, overrides, torch.arange(len(y_val))),
                            overrides)
    pred = predict(feats.get("test", *key), feats.texts["test"]).argmax(1)
    per_task = [(pred[y_test == i] == i).float().mean().item() for i in range(len(names))]
    accuracy = (pred == y_test).float().mean().item()
    print(f"chosen on validation: {name} (layers {list(layers)}, {pooling}, {({**REFERENCE, **overrides})}); "
          f"trained on all validation data, test routing accuracy {100 * accuracy:.1f} ("
          + ", ".join(f"{n} {100 * a:.1f}" for n, a in zip(names, per_task)) + ")")
    if args.json:
        write_json_atomic({"experts": names, "folds": args.folds, "seed": params.seed, "rows": rows,
                           "chosen": {"setting": name, "test_accuracy": accuracy,
                                      "test_per_task": dict(zip(names, per_task))}}, args.json)


if __name__ == "__main__":
    main()
