"""`twinmerge predict`: route raw texts through a Twin-Merging bundle and print, per input, the routed task,
the routing weights and the predicted label, or for a bundle of causal LMs the generation (a table, or JSON
lines with --json).

Bad input is one line naming the file or option: a --file that is not UTF-8, an empty text argument (refused
with its position, never routed to an arbitrary task), --top-k below 1, an unreadable bundle file."""
import json
import sys
from pathlib import Path

from twinmerge.bundle import TwinBundle
from twinmerge.errors import InputError


def read_texts(texts: list[str], file: str | None) -> list[str]:
    """The argument texts, then the non-blank lines of `file` ('-': standard input; blank lines separate
    nothing and are skipped). A file that is not UTF-8 is refused in one line naming it and the byte."""
    if file:
        try:
            raw = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
        except OSError as e:
            raise InputError(f"{file}: cannot read ({e.strerror or e})") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{file}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # universal newlines, as open()
        texts = texts + [line for line in lines if line.strip()]
    if not texts:
        raise FileNotFoundError("no input texts: pass texts as arguments or --file FILE (one text per line)")
    return texts


def add_arguments(parser) -> None:
    parser.add_argument("texts", nargs="*", help="texts to classify")
    parser.add_argument("--file", help="a file with one text per line ('-' for standard input)")
    parser.add_argument("--bundle", default="artifacts/twin")
    parser.add_argument("--top-k", type=int, default=None, help="route to the k (>= 1) highest-weighted experts only")
    parser.add_argument("--json", action="store_true", help="print one JSON object per input")


def main(args) -> None:
    texts = read_texts(args.texts, args.file)
    results = TwinBundle.load(Path(args.bundle)).predict(texts, top_k=args.top_k)
    for r in results:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
            continue
        weights = " ".join(f"{n}={w:.2f}" for n, w in sorted(r["weights"].items(), key=lambda kv: -kv[1])[:3])
        if "generation" in r:
            print(f"{r['task']:>14} | {weights} | {r['text'][:40]} -> {r['generation'].strip()[:60]}")
            continue
        print(f"{r['task']:>14} | {r['label']:<16} p={r['probability']:.2f} | {weights} | {r['text'][:60]}")
