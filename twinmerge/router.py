"""The router: pooled hidden-state features of the shared expert -> MLP -> routing weights over n experts.

Features: hidden states of the chosen layers (index into HF `hidden_states`: 0 = embeddings, -1 = last),
pooled over non-padding tokens ("mean", "cls", "max" or "mean_max" = [mean, max]) and concatenated:
D = len(layers) * H (2 * len(layers) * H for mean_max).
MLP (the paper's): D -> h -> h -> n with h = hidden_mult * D, each hidden layer Linear, BatchNorm1d,
LeakyReLU, Dropout; inputs standardised with the training features' mean/std (buffers).
Training uses labelled task inputs that are never test data (the `router` stage: the validation splits, the
paper's protocol, optionally with the training splits): a seeded stratified fit/holdout split, AdamW +
cross-entropy, early stopping on holdout accuracy (ties: lower loss), best state restored; optionally (`refit`)
a fresh router is then trained on all of them for the best epoch count.
Optionally (`ensemble: char_ngrams`) a character n-gram classifier over the texts (`twinmerge.char_ngrams`) is
fitted on the same fit part and multiplies the MLP's probabilities p by its own q (a product of experts): the
router's logits are then log p + log q, so softmax gives p q / sum(p q). A product keeps the weights as sharp
as the MLP's where both agree (an average would soften every mixture; Twin-Merging merges by these weights).
Early stopping still reads the MLP alone; the holdout report is the ensemble's.
Routing weights: softmax(logits / T); with top_k the k largest are kept and renormalised to sum 1
(`twinmerge.routed.top_k_weights`, the same rule the dynamic model applies). T and top_k are inference
options of the consumer (evaluation, bundle), not part of the router.

A saved router describes its own features (format `twinmerge-router/2`): router.json holds the layers,
pooling and max_length, the sha256 of the feature model's weights (the shared expert it was trained on), and
`tokenizer/` the tokenizer (with an ensemble, `ngrams.*` its n-gram classifier); `SavedRouter.features`
computes features from that recipe only, `SavedRouter.weights` routes texts, and
`check_feature_model` refuses a feature model other than the one the router was trained on.
"""
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from twinmerge.progress import progress_bar

from twinmerge.char_ngrams import VOCAB_FILE, WEIGHTS_FILE, CharNgramClassifier
from twinmerge.routed import top_k_weights
from twinmerge.errors import CheckpointError, TwinMergeError
from twinmerge.io import atomic_dir, save_safetensors_atomic, weights_sha256, write_json_atomic

POOLINGS = ("mean", "cls", "max", "mean_max")
ENSEMBLES = (None, "char_ngrams")
ROUTER_FORMAT = "twinmerge-router/2"
TOKENIZER_DIR = "tokenizer"


def features_from_batch(hidden_states, attention_mask, layers=(-1,), pooling="mean"):
    """Pool hidden_states (sequence of [B, L, H]) over tokens where attention_mask [B, L] is 1.

    mean = sum_l m_l h_l / sum_l m_l; cls = h_0; max = max over unmasked tokens. Returns [B, D].
    """
    if pooling not in POOLINGS:
        raise TwinMergeError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    mask = attention_mask[:, :, None].to(hidden_states[0].dtype)
    pooled = []
    for layer in layers:
        h = hidden_states[layer]
        if pooling in ("mean", "mean_max"):
            pooled.append((h * mask).sum(1) / mask.sum(1).clamp(min=1))
        if pooling in ("max", "mean_max"):
            pooled.append(h.masked_fill(mask == 0, float("-inf")).max(1).values)
        if pooling == "cls":
            pooled.append(h[:, 0])
    return torch.cat(pooled, dim=1)


@torch.no_grad()
def extract_features(model, tokenizer, texts, layers=(-1,), pooling="mean", batch_size=64, max_length=128,
                     progress=True):
    """Router features [N, D] of `texts` from the base encoder of `model` (an HF model, e.g. theta_s).

    Texts are batched in length order (less padding) and returned in input order.
    """
    encoder = getattr(model, "base_model", model)
    was_training = encoder.training
    encoder.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [None] * len(texts)
    try:
        for start in progress_bar(range(0, len(texts), batch_size), desc="router features", disable=not progress):
            chunk = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in chunk], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt").to(next(encoder.parameters()).device)
            hidden = encoder(**enc, output_hidden_states=True).hidden_states
            feats = features_from_batch(hidden, enc["attention_mask"], layers, pooling).float().cpu()
            for i, f in zip(chunk, feats):
                out[i] = f
    finally:
        encoder.train(was_training)
    return torch.stack(out)


@dataclass
class RouterConfig:
    """Router architecture, training and routing options (JSON-serialisable via asdict / from_dict)."""

    in_dim: int
    n_experts: int
    hidden_mult: float = 2.0
    depth: int = 2
    dropout: float = 0.5
    lr: float = 5e-4
    weight_decay: float = 0.01
    epochs: int = 100
    batch_size: int = 64
    patience: int = 10
    holdout_fraction: float = 0.2
    seed: int = 0
    layers: list[int] = field(default_factory=lambda: [-1])  # feature recipe: hidden-state layers,
    pooling: str = "mean"                                       # their pooling,
    max_length: int = 128                                       # and the tokenizer's truncation length
    refit: bool = False  # after early stopping, retrain on all its inputs (holdout too) for the best epoch count
    ensemble: str | None = None  # "char_ngrams": times a char n-gram classifier of the texts (router_logits)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


class Router(nn.Module):
    """MLP router: x [N, in_dim] -> standardise -> depth x (Linear, BatchNorm1d, LeakyReLU, Dropout) -> [N, n].

    `ngrams` (a CharNgramClassifier, or None) is the ensemble's text member, applied by `router_logits`."""

    def __init__(self, config: RouterConfig):
        super().__init__()
        hidden, layers, width = round(config.hidden_mult * config.in_dim), [], config.in_dim
        for _ in range(config.depth):
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(), nn.Dropout(config.dropout)]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, config.n_experts))
        self.register_buffer("mean", torch.zeros(config.in_dim))
        self.register_buffer("std", torch.ones(config.in_dim))
        self.ngrams: CharNgramClassifier | None = None

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def stratified_split(labels, fraction, seed):
    """Seeded stratified split of indices into (fit, holdout); each class with >= 2 samples gives
    max(1, round(fraction * n_c)) to holdout (none when fraction == 0), keeping >= 1 to fit."""
    g = torch.Generator().manual_seed(seed)
    fit, holdout = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = 0 if fraction == 0 or len(idx) < 2 else min(len(idx) - 1, max(1, round(fraction * len(idx))))
        holdout.append(idx[:k])
        fit.append(idx[k:])
    return torch.cat(fit).sort().values, torch.cat(holdout).sort().values


@dataclass
class TrainReport:
    """Holdout accuracy (overall, per class), confusion [true, pred] counts, epochs run, per-epoch history."""

    holdout_accuracy: float | None
    per_class_accuracy: list
    confusion: list
    epochs_run: int
    best_epoch: int
    n_fit: int
    n_holdout: int
    history: list  # [{"epoch", "train_loss", "holdout_loss", "holdout_accuracy"}]


def router_logits(router, features, texts=None):
    """The router's logits [N, n]: the MLP's, or with an n-gram member log_softmax(MLP) + log q(texts)."""
    logits = router(features)
    if router.ngrams is None:
        return logits
    if texts is None or len(texts) != len(features):
        raise TwinMergeError("this router also reads the texts (router ensemble char_ngrams): pass one text per "
                             "feature row")
    return torch.log_softmax(logits, dim=1) + router.ngrams.predict_proba(texts).log()


@torch.no_grad()
def _evaluate(router, x, y, n, texts=None):
    router.eval()
    logits = router_logits(router, x, texts)
    pred = logits.argmax(1)
    confusion = torch.zeros(n, n, dtype=torch.long).index_put_((y, pred), torch.ones_like(y), accumulate=True)
    return F.cross_entropy(logits, y).item(), (pred == y).float().mean().item(), confusion


def _new_router(config, features, idx):
    """A seeded Router whose standardisation buffers are the mean/std of features[idx]."""
    torch.manual_seed(config.seed)
    router = Router(config)
    router.mean.copy_(features[idx].mean(0))
    router.std.copy_(features[idx].std(0).nan_to_num(1.0).clamp(min=1e-6))
    return router


def _fit(router, features, labels, fit, hold, config, epochs, progress):
    """AdamW + cross-entropy on features[fit] for up to `epochs`; with a holdout, early stopping on holdout
    accuracy (ties: lower loss) and the best state restored. Returns (history, best_epoch)."""
    opt = torch.optim.AdamW(router.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    g = torch.Generator().manual_seed(config.seed)
    best, best_key, best_epoch, history, stale = None, None, 0, [], 0
    for epoch in progress_bar(range(1, epochs + 1), desc="router", disable=not progress):
        router.train()
        perm, total = fit[torch.randperm(len(fit), generator=g)], 0.0
        for start in range(0, len(perm), config.batch_size):
            batch = perm[start:start + config.batch_size]
            if len(batch) < 2:  # BatchNorm needs >= 2 samples
                continue
            loss = F.cross_entropy(router(features[batch]), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        entry = {"epoch": epoch, "train_loss": total / len(fit)}
        if len(hold):
            loss, acc, _ = _evaluate(router, features[hold], labels[hold], config.n_experts)
            entry.update(holdout_loss=loss, holdout_accuracy=acc)
            if best_key is None or (acc, -loss) > best_key:
                best = {k: v.clone() for k, v in router.state_dict().items()}
                best_key, best_epoch, stale = (acc, -loss), epoch, 0
            else:
                stale += 1
        history.append(entry)
        if len(hold) and stale >= config.patience:
            break
    if best is not None:
        router.load_state_dict(best)
    router.eval()
    return history, best_epoch or len(history)


def _pick(texts, idx):
    return None if texts is None else [texts[i] for i in idx.tolist()]


def train_router(features, labels, config: RouterConfig, progress=True, texts=None):
    """Train a Router on (features [N, D], task-id labels [N]) of non-test inputs -> (router, TrainReport).

    With config.ensemble, `texts` (the N inputs the features came from) train the n-gram member on the same fit
    part. With config.refit, the router returned is retrained from scratch on ALL of (features, labels) for the
    best epoch count found with the holdout; the report still describes the holdout run (an honest estimate).
    """
    labels = torch.as_tensor(labels).long()
    if features.shape != (len(labels), config.in_dim) or labels.min() < 0 or labels.max() >= config.n_experts:
        raise TwinMergeError(f"router training needs features [N, {config.in_dim}] and labels in "
                             f"[0, {config.n_experts}); got {tuple(features.shape)}")
    if config.ensemble not in ENSEMBLES:
        raise TwinMergeError(f"unknown router ensemble {config.ensemble!r}; choose one of {ENSEMBLES}")
    if config.ensemble and (texts is None or len(texts) != len(labels)):
        raise TwinMergeError(f"router ensemble {config.ensemble}: needs the {len(labels)} texts of the features")
    features = features.float()
    fit, hold = stratified_split(labels, config.holdout_fraction, config.seed)
    router = _new_router(config, features, fit)
    history, best_epoch = _fit(router, features, labels, fit, hold, config, config.epochs, progress)
    if config.ensemble:
        router.ngrams = CharNgramClassifier.fit(_pick(texts, fit), labels[fit], config.n_experts)
    acc, per_class, confusion = None, [], []
    if len(hold):
        _, acc, conf = _evaluate(router, features[hold], labels[hold], config.n_experts, _pick(texts, hold))
        per_class = [(conf[c, c] / conf[c].sum()).item() if conf[c].sum() else None for c in range(config.n_experts)]
        confusion = conf.tolist()
    report = TrainReport(acc, per_class, confusion, len(history), best_epoch, len(fit), len(hold), history)
    if config.refit and len(hold):
        everything = torch.arange(len(labels))
        router = _new_router(config, features, everything)
        _fit(router, features, labels, everything, everything[:0], config, best_epoch, progress=False)
        if config.ensemble:
            router.ngrams = CharNgramClassifier.fit(texts, labels, config.n_experts)
    return router, report


@torch.no_grad()
def route(router, features, temperature=1.0, top_k=None, texts=None):
    """Routing weights [N, n] = softmax(router_logits(features, texts) / temperature); top_k: keep the k largest,
    renormalised. `texts` only for a router with an n-gram member."""
    router.eval()
    weights = torch.softmax(router_logits(router, features.float(), texts) / temperature, dim=1)
    return weights if top_k is None or top_k >= weights.shape[1] else top_k_weights(weights, top_k)[0]


def save_router(router, config: RouterConfig, folder, tokenizer, feature_model_sha256: str):
    """Write `folder`/model.safetensors (weights + standardisation buffers), router.json (config, feature
    model hash), `folder`/tokenizer/ and, with an ensemble, the n-gram member's files, each atomically."""
    folder = Path(folder)
    if (router.ngrams is None) != (config.ensemble is None):
        raise TwinMergeError(f"router config says ensemble {config.ensemble!r} but the router "
                             f"{'has no' if router.ngrams is None else 'has an'} n-gram member")
    save_safetensors_atomic(router.state_dict(), folder / "model.safetensors", {"format": ROUTER_FORMAT})
    if router.ngrams is not None:
        router.ngrams.save(folder)
    else:
        for stale in (WEIGHTS_FILE, VOCAB_FILE):
            (folder / stale).unlink(missing_ok=True)
    with atomic_dir(folder / TOKENIZER_DIR) as tmp:
        tokenizer.save_pretrained(tmp)
    write_json_atomic({"format": ROUTER_FORMAT, "config": asdict(config),
                       "feature_model_sha256": feature_model_sha256}, folder / "router.json")
    return folder


@dataclass
class SavedRouter:
    """A loaded router folder: the MLP (eval mode), its config (incl. the feature recipe), its tokenizer and
    the sha256 of the feature model it was trained on."""

    router: Router
    config: RouterConfig
    tokenizer: object
    feature_model_sha256: str
    folder: Path

    def check_feature_model(self, weights_file: str | Path) -> None:
        """CheckpointError unless `weights_file` (the feature model's safetensors, or its HF folder, sharded or
        not: `weights_sha256`) is the one trained on."""
        actual = weights_sha256(weights_file)
        if actual != self.feature_model_sha256:
            raise CheckpointError(f"{self.folder}/router.json: trained on features of a model with sha256 "
                                  f"{self.feature_model_sha256[:12]}..., but {weights_file} has {actual[:12]}...")

    def features(self, feature_model, texts, batch_size=64, progress=True):
        """Router features [N, D] of texts under `feature_model`, with the saved recipe and tokenizer."""
        c = self.config
        return extract_features(feature_model, self.tokenizer, texts, layers=tuple(c.layers), pooling=c.pooling,
                                batch_size=batch_size, max_length=c.max_length, progress=progress)

    def weights(self, feature_model, texts, temperature=1.0, top_k=None, batch_size=64, progress=True):
        """Routing weights [N, n] of texts (`route` on their features, and on the texts for an ensemble)."""
        features = self.features(feature_model, texts, batch_size=batch_size, progress=progress)
        return route(self.router, features, temperature, top_k, texts)


def load_router(folder) -> SavedRouter:
    """The router saved in `folder` by save_router (CheckpointError, one line, if it is not one)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    try:
        meta = json.loads((folder / "router.json").read_text())
        if meta.get("format") != ROUTER_FORMAT:
            raise CheckpointError(f"{folder}/router.json: format {meta.get('format')!r}, expected {ROUTER_FORMAT}")
        config = RouterConfig.from_dict(meta["config"])
        state = load_file(folder / "model.safetensors")
        tokenizer = AutoTokenizer.from_pretrained(folder / TOKENIZER_DIR)
        router = Router(config)
        router.load_state_dict(state, strict=True)
        if config.ensemble is not None:
            router.ngrams = CharNgramClassifier.load(folder)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"{folder}: not a router folder ({str(exc).splitlines()[0]})") from None
    return SavedRouter(router.eval(), config, tokenizer, meta["feature_model_sha256"], folder)
