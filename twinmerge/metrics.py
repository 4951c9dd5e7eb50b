"""Task metrics (pure numpy / Python) and the paper's normalised score.

All metrics take predictions and labels (arrays, tensors or lists of equal length) and return Python floats
as fractions / correlations (not x100). `normalized_score` = 100 * method / expert, so the scale cancels.
Generative metrics (`exact_match`, `rouge_l`) take generated strings and reference strings (or lists of
acceptable references, the best one counts).
"""
import re
import string

import numpy as np

from twinmerge.errors import TwinMergeError


def _arrays(preds, labels):
    p, y = (np.asarray(a.detach().cpu() if hasattr(a, "detach") else a) for a in (preds, labels))
    if p.shape != y.shape or p.ndim != 1 or len(p) == 0:
        raise TwinMergeError(f"predictions {p.shape} and labels {y.shape} must be 1-D, non-empty, same length")
    return p, y


def _confusion(p, y):
    """Counts C[i, j] of (true class i, predicted class j) over the classes present in either array."""
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    c = np.zeros((len(classes), len(classes)))
    np.add.at(c, (inv[: len(y)], inv[len(y):]), 1)
    return c


def accuracy(preds, labels):
    """Fraction of preds == labels."""
    p, y = _arrays(preds, labels)
    return float((p == y).mean())


def macro_f1(preds, labels):
    """Unweighted mean over classes (in labels or preds) of F1 = 2 TP / (2 TP + FP + FN)."""
    c = _confusion(*_arrays(preds, labels))
    tp = np.diag(c)
    return float(np.mean(2 * tp / (c.sum(0) + c.sum(1))))


def binary_f1(preds, labels):
    """F1 of the positive class 1 (GLUE MRPC/QQP); 0.0 when class 1 is never predicted nor true."""
    p, y = _arrays(preds, labels)
    tp, fp, fn = np.sum((p == 1) & (y == 1)), np.sum((p == 1) & (y != 1)), np.sum((p != 1) & (y == 1))
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def matthews_corrcoef(preds, labels):
    """Multi-class MCC (Gorodkin's R_K, as sklearn): (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)), 0 if undefined.

    c = correct count, s = total, t / p = per-class true / predicted counts.
    """
    conf = _confusion(*_arrays(preds, labels))
    t, p, c, s = conf.sum(1), conf.sum(0), np.trace(conf), conf.sum()
    denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denom) if denom else 0.0


def pearson(preds, labels):
    """Pearson correlation; NaN when either input is constant."""
    p, y = (a.astype(np.float64) for a in _arrays(preds, labels))
    p, y = p - p.mean(), y - y.mean()
    denom = np.sqrt((p @ p) * (y @ y))
    return float(p @ y / denom) if denom else float("nan")


def _ranks(a):
    """1-based ranks, ties get the average of their positions."""
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    starts = np.r_[True, sorted_a[1:] != sorted_a[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(a)] - 1
    ranks = np.empty(len(a))
    ranks[order] = (first[group] + last[group]) / 2 + 1
    return ranks


def spearman(preds, labels):
    """Spearman correlation = Pearson of average ranks."""
    p, y = _arrays(preds, labels)
    return pearson(_ranks(p), _ranks(y))


def acc_f1(preds, labels):
    """GLUE MRPC/QQP: mean(accuracy, binary F1)."""
    return (accuracy(preds, labels) + binary_f1(preds, labels)) / 2


def pearson_spearman(preds, labels):
    """GLUE STS-B: mean(Pearson, Spearman)."""
    return (pearson(preds, labels) + spearman(preds, labels)) / 2


def _text_pairs(preds, refs):
    """(preds, refs) as lists of str and of reference lists; TwinMergeError unless equal non-zero lengths."""
    preds, refs = list(preds), list(refs)
    if len(preds) != len(refs) or not preds:
        raise TwinMergeError(f"{len(preds)} generations and {len(refs)} references: must be equal and non-zero")
    return preds, [[r] if isinstance(r, str) else list(r) for r in refs]


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text):
    """SQuAD's answer normalisation: lower case, drop punctuation and the articles a/an/the, collapse spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(preds, refs):
    """Fraction of generations whose normalised text (`normalize_answer`) equals a normalised reference."""
    preds, refs = _text_pairs(preds, refs)
    return float(np.mean([any(normalize_answer(p) == normalize_answer(r) for r in rs) for p, rs in zip(preds, refs)]))


def rouge_tokens(text):
    """ROUGE's default tokenisation (rouge-score without stemming): lower case, runs of [a-z0-9]."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _lcs_length(a, b):
    """Length of the longest common subsequence of token lists a and b (O(len a * len b) time, O(len b) space)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l_f1(pred, ref):
    """ROUGE-L F1 of one pair: LCS / len(pred) = P, LCS / len(ref) = R, 2 P R / (P + R); 0 when either is empty."""
    p, r = rouge_tokens(pred), rouge_tokens(ref)
    lcs = _lcs_length(p, r) if p and r else 0
    return 2 * lcs / (len(p) + len(r)) if lcs else 0.0


def rouge_l(preds, refs):
    """Mean over pairs of ROUGE-L F1 (`rouge_l_f1`; the best reference of each pair)."""
    preds, refs = _text_pairs(preds, refs)
    return float(np.mean([max(rouge_l_f1(p, r) for r in rs) for p, rs in zip(preds, refs)]))


METRICS = {f.__name__: f for f in (accuracy, macro_f1, binary_f1, matthews_corrcoef, pearson, spearman, acc_f1,
                                   pearson_spearman, exact_match, rouge_l)}
GENERATIVE_METRICS = ("exact_match", "rouge_l")


NO_LABEL = -1  # the prediction of an input that another task's head answered


def answered_predictions(logits, heads, task_index):
    """Class predictions of task `task_index`'s inputs as the user receives them: argmax of logits [N, C]
    where the input's own head answered (heads [N] == task_index), NO_LABEL where another task's head did
    (a label from another task's label set is always wrong, whatever its index). heads None: all own."""
    preds = logits.argmax(1)
    if heads is None:
        return preds
    return preds.masked_fill(heads.to(preds.device) != task_index, NO_LABEL)


CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "binary_f1", "matthews_corrcoef", "acc_f1")


def score(task_metric_name, preds, labels):
    """METRICS[task_metric_name](preds, labels)."""
    if task_metric_name not in METRICS:
        raise TwinMergeError(f"unknown metric {task_metric_name!r}; known: {', '.join(METRICS)}")
    return METRICS[task_metric_name](preds, labels)


def normalized_score(method_score, expert_score):
    """100 * method_score / expert_score (the paper's normalised score; can exceed 100)."""
    if not expert_score:
        raise TwinMergeError("normalised score undefined: the expert's score is 0")
    return 100.0 * float(method_score) / float(expert_score)


def mean_normalized(method_scores, expert_scores):
    """Mean over tasks of normalized_score; both arguments map task -> score (same task set)."""
    if set(method_scores) != set(expert_scores) or not method_scores:
        raise TwinMergeError(f"tasks differ: {sorted(method_scores)} vs {sorted(expert_scores)}")
    return float(np.mean([normalized_score(method_scores[t], expert_scores[t]) for t in method_scores]))
