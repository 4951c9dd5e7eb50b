"""`twinmerge predict`: route raw texts through a Twin-Merging bundle and print, per input, the routed task,
the routing weights and the predicted label (a table, or JSON lines with --json)."""
import json
import sys
from pathlib import Path

from twinmerge.bundle import TwinBundle


def read_texts(texts: list[str], file: str | None) -> list[str]:
    if file:
        stream = sys.stdin if file == "-" else open(file, encoding="utf-8")
        with stream:
            texts = texts + [line.rstrip("\n") for line in stream if line.strip()]
    if not texts:
        raise FileNotFoundError("no input texts: pass texts as arguments or --file FILE (one text per line)")
    return texts


def add_arguments(parser) -> None:
    parser.add_argument("texts", nargs="*", help="texts to classify")
    parser.add_argument("--file", help="a file with one text per line ('-' for standard input)")
    parser.add_argument("--bundle", default="artifacts/twin")
    parser.add_argument("--top-k", type=int, default=None, help="route to the k highest-weighted experts only")
    parser.add_argument("--json", action="store_true", help="print one JSON object per input")


def main(args) -> None:
    texts = read_texts(args.texts, args.file)
    results = TwinBundle.load(Path(args.bundle)).predict(texts, top_k=args.top_k)
    for r in results:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
            continue
        weights = " ".join(f"{n}={w:.2f}" for n, w in sorted(r["weights"].items(), key=lambda kv: -kv[1])[:3])
        print(f"{r['task']:>14} | {r['label']:<16} p={r['probability']:.2f} | {weights} | {r['text'][:60]}")
