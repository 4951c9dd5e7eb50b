"""How should the router's n-gram member combine with its MLP? Scored on validation only, as a user sees it.

Routing accuracy alone does not decide it: Twin-Merging merges the experts' exclusive knowledge by the routing
weights, so a rule that routes more inputs right but softens the weights can lose score. On the `router`
stage's own holdout part of the validation inputs (the same seeded stratified split; the n-gram member never
trained on it, the MLP used it only for early stopping) this runs the bundle's dynamic model under three
weightings of the same router: the MLP alone (p), the average (p + q) / 2 and the product p q / sum(p q) (the
rule `twinmerge.router.router_logits` applies), and prints each one's routing accuracy, strict router-head
accuracy (an input routed to another task is wrong; mean over tasks, then per task) and mean largest weight.

    python benchmarks/router_ensemble.py [--params params.yaml] [--bundle artifacts/twin]
"""
import argparse

import torch

from tasks.params import load_params
from tasks.taskdata import load_registry_split
from twinmerge.bundle import TwinBundle
from twinmerge.metrics import answered_predictions
from twinmerge.modelpool import map_batches
from twinmerge.router import stratified_split


def combinations(bundle, texts):
    """{rule: routing weights [N, n]} for the MLP alone, the average and the product with the n-gram member."""
    with torch.no_grad():
        router = bundle.router.router.eval()
        p = torch.softmax(router(bundle.router.features(bundle.feature_model, texts, progress=False)), dim=1)
        q = router.ngrams.predict_proba(texts)
    return {"MLP alone": p, "average": (p + q) / 2, "product": p * q / (p * q).sum(1, keepdim=True)}


def strict_accuracy(bundle, texts, tasks, gold, weights):
    """(routing accuracy, strict router-head accuracy per task [n]): right task AND right label
    (`twinmerge.metrics.answered_predictions`, the rule evaluate scores by)."""
    logits = map_batches(lambda idx, enc: bundle.dynamic(**enc, weights=weights[torch.tensor(idx)]).logits,
                         bundle.tokenizer, texts, 32, bundle.max_length)
    routed = weights.argmax(1)
    per_task = []
    for t, name in enumerate(bundle.experts):
        mine = tasks == t
        answered = answered_predictions(logits[mine, :len(bundle.labels[name])], routed[mine], t)
        per_task.append((answered == gold[mine]).float().mean())
    return (routed == tasks).float().mean().item(), torch.stack(per_task)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--bundle", default="artifacts/twin")
    args = parser.parse_args()
    params = load_params(args.params)
    bundle = TwinBundle.load(args.bundle)
    if bundle.router.router.ngrams is None:
        raise SystemExit(f"{args.bundle}/router: no n-gram member (router.ensemble is null)")
    val = load_registry_split(params, "validation")
    names = list(params.experts)
    texts = [t for n in names for t in val[n][0]]
    gold = torch.tensor([label for n in names for label in val[n][1]])
    tasks = torch.tensor([i for i, n in enumerate(names) for _ in val[n][0]])
    _, hold = stratified_split(tasks, bundle.router.config.holdout_fraction, bundle.router.config.seed)
    held = [texts[i] for i in hold.tolist()]
    print(f"validation holdout of the router stage: {len(held)} inputs ({', '.join(names)})")
    for rule, weights in combinations(bundle, held).items():
        routing, per_task = strict_accuracy(bundle, held, tasks[hold], gold[hold], weights)
        print(f"{rule:9s}: routing {100 * routing:.2f}%  strict router heads {100 * per_task.mean():.2f} ("
              + ", ".join(f"{n} {100 * a:.1f}" for n, a in zip(names, per_task.tolist()))
              + f")  mean largest weight {weights.max(1).values.mean():.3f}")


if __name__ == "__main__":
    main()
