"""A character n-gram text classifier: the router's second member (`router.ensemble: char_ngrams`).

Features: char 1-4-grams of " text " (the text padded with one space each side), x_ig = (1 + log tf_ig) * idf_g,
each row L2-normalised; the vocabulary is every n-gram in >= 2 training texts (columns in sorted order) and
idf_g = log((1 + N) / (1 + df_g)) + 1 (smooth idf over the N training texts). N-grams outside the vocabulary are
ignored; a text with none gets the zero row, so the bias alone decides.
Classifier: multinomial logistic regression p = softmax(x W + b), W [V, C], fitted by full-batch L-BFGS on mean
cross-entropy + ||W||^2 / (2 c N) (c as in scikit-learn's C). Deterministic: no sampling, one fixed start (zero).

Surface cues (attributions "-- Name", "word: gloss", hashtags, casing) are what the sentence-embedding features
of the shared expert blur; multiplied into the MLP's probabilities (`twinmerge.router.router_logits`), they
routed better in 5-fold CV over the default's validation data (`benchmarks/router_features.py`, docs/DESIGN.md).
Saved as `ngrams.safetensors` (idf [V], weight [V, C], bias [C]) + `ngrams.json` (the vocabulary in column order).
"""
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from twinmerge.io import save_safetensors_atomic, write_json_atomic

NGRAM_SIZES = (1, 2, 3, 4)
WEIGHTS_FILE, VOCAB_FILE = "ngrams.safetensors", "ngrams.json"
FORMAT = "twinmerge-char-ngrams/1"


def _counts(texts):
    return [Counter(s[i:i + n] for n in NGRAM_SIZES for i in range(len(s) - n + 1)) for s in
            (f" {t} " for t in texts)]


def learn_vocabulary(texts) -> tuple[list[str], torch.Tensor]:
    """(vocabulary, idf [V]): the n-grams in >= 2 of `texts`, sorted, and their smooth idf."""
    df = Counter(g for c in _counts(texts) for g in c)
    vocab = sorted(g for g, d in df.items() if d >= 2)
    return vocab, torch.tensor([math.log((1 + len(texts)) / (1 + df[g])) + 1 for g in vocab])


def tfidf(texts, vocab: list[str], idf: torch.Tensor) -> torch.Tensor:
    """Sparse COO [N, V]: rows L2-normalised (1 + log tf) * idf over the vocabulary (module docstring)."""
    column = {g: j for j, g in enumerate(vocab)}
    rows, cols, vals = [], [], []
    for i, c in enumerate(_counts(texts)):
        for g, k in c.items():
            if g in column:
                rows.append(i), cols.append(column[g]), vals.append(1 + math.log(k))
    rows_t, cols_t = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
    vals_t = torch.tensor(vals, dtype=torch.float32) * idf[cols_t]
    norms = torch.zeros(len(texts)).index_add_(0, rows_t, vals_t ** 2).sqrt()
    return torch.sparse_coo_tensor(torch.stack([rows_t, cols_t]), vals_t / norms[rows_t], (len(texts), len(vocab)),
                                   check_invariants=True).coalesce()


@dataclass
class CharNgramClassifier:
    """vocab (V n-grams), idf [V], weight [V, C], bias [C]."""

    vocab: list[str]
    idf: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def fit(cls, texts, labels, n_classes: int, c: float = 10.0, max_iter: int = 100) -> "CharNgramClassifier":
        """Fit on (texts, labels in [0, n_classes)) by L-BFGS (strong Wolfe line search) from zero."""
        labels = torch.as_tensor(labels).long()
        vocab, idf = learn_vocabulary(texts)
        x = tfidf(texts, vocab, idf)
        w = torch.zeros(len(vocab), n_classes, requires_grad=True)
        b = torch.zeros(n_classes, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(torch.sparse.mm(x, w) + b, labels) + (w ** 2).sum() / (2 * c * len(labels))
            loss.backward()
            return loss

        opt.step(closure)
        return cls(vocab, idf, w.detach(), b.detach())

    def predict_proba(self, texts) -> torch.Tensor:
        """Class probabilities [N, C]."""
        return torch.softmax(torch.sparse.mm(tfidf(texts, self.vocab, self.idf), self.weight) + self.bias, dim=1)

    def save(self, folder: str | Path) -> None:
        """Write `folder`/ngrams.safetensors and `folder`/ngrams.json, each atomically."""
        folder = Path(folder)
        save_safetensors_atomic({"idf": self.idf, "weight": self.weight, "bias": self.bias},
                                folder / WEIGHTS_FILE, {"format": FORMAT})
        write_json_atomic({"format": FORMAT, "vocab": self.vocab}, folder / VOCAB_FILE)

    @classmethod
    def load(cls, folder: str | Path) -> "CharNgramClassifier":
        """Read what `save` wrote (errors: OSError, ValueError, KeyError; the caller names the folder)."""
        folder = Path(folder)
        meta = json.loads((folder / VOCAB_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{VOCAB_FILE}: format {meta.get('format')!r}, expected {FORMAT}")
        state = load_file(folder / WEIGHTS_FILE)
        model = cls(list(meta["vocab"]), state["idf"], state["weight"], state["bias"])
        if not (len(model.vocab) == len(model.idf) == len(model.weight) and model.weight.shape[1:] == model.bias.shape):
            raise ValueError(f"{WEIGHTS_FILE}: shapes do not match {VOCAB_FILE}'s {len(model.vocab)} n-grams")
        return model
