"""Step `download`: resolve the base and every expert into `artifacts/` with a sha256 manifest.

- `fetch_hub(source, out_dir)`: a Hub checkpoint (repo_id, optional subfolder, revision) -> a local folder,
  safetensors/json/tokenizer files only, pinned to the resolved commit, retried with backoff.
- `resolve_base(params)`: the base model folder (installed package found with importlib, local path, or Hub).
- `download_expert(name, folder, base, out_dir)`: validate against the base (architecture, tensor names,
  shapes, dtypes, finite values) and the head against the task's labels.json before anything is written, then
  copy into `out_dir` with a manifest; `copy_task_data` copies the expert's task tables beside it.
"""
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from tasks.fetch import locate_base_model, sha256_file
from tasks.params import HubSource, Params, load_params
from tasks.taskdata import TASKDATA_DIR
from twinmerge.errors import CheckpointError, SourceError
from twinmerge.io import ExpertSet, atomic_dir

log = logging.getLogger(__name__)

CHECKPOINT_PATTERNS = ("*.safetensors", "*.json", "vocab.txt", "merges.txt", "*.model", "tokenizer*")
# Training logs, not part of the model: never copied, so never in an expert's fingerprint.
TRAINING_LOGS = ("scores.json", "trainer_state.json", "*results.json")


def _checkpoint_files(folder: Path) -> list[Path]:
    """Files of a checkpoint folder worth copying: weights (safetensors only), configs, tokenizer files."""
    files = set()
    for pattern in CHECKPOINT_PATTERNS:
        files.update(p for p in folder.glob(pattern) if p.is_file() and not any(p.match(t) for t in TRAINING_LOGS))
    return sorted(files)


def _with_retries(fn, what: str, attempts: int = 4, first_delay: float = 2.0):
    """Call fn(); on an exception retry with exponential backoff, then raise SourceError naming `what`."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:  # network errors come in many types (requests, httpx, OSError)
            if attempt == attempts:
                raise SourceError(f"{what}: failed after {attempts} attempts: {type(e).__name__}: {e}") from None
            delay = first_delay * 2 ** (attempt - 1)
            log.warning("%s: attempt %d failed (%s); retrying in %.0fs", what, attempt, e, delay)
            time.sleep(delay)


def fetch_hub(source: HubSource, out_dir: str | Path, api=None, snapshot_download=None,
              retry_delay: float = 2.0) -> dict:
    """Download one Hub checkpoint into `out_dir` (the subfolder's files at its top level).

    The revision is resolved to a commit first and the download pinned to it; `out_dir/source.json` records
    repo_id, subfolder, revision and commit. `api`/`snapshot_download` default to huggingface_hub's.
    """
    import huggingface_hub

    api = api or huggingface_hub.HfApi()
    snapshot_download = snapshot_download or huggingface_hub.snapshot_download
    what = f"hub {source.repo_id}@{source.revision}" + (f"/{source.subfolder}" if source.subfolder else "")
    commit = _with_retries(lambda: api.model_info(source.repo_id, revision=source.revision).sha, what,
                           first_delay=retry_delay)
    prefix = f"{source.subfolder.strip('/')}/" if source.subfolder else ""
    with tempfile.TemporaryDirectory(prefix="twinmerge-hub-") as snapshot, atomic_dir(out_dir) as staged:
        _with_retries(lambda: snapshot_download(repo_id=source.repo_id, revision=commit, local_dir=snapshot,
                                                allow_patterns=[prefix + p for p in CHECKPOINT_PATTERNS]),
                      what, first_delay=retry_delay)
        files = _checkpoint_files(Path(snapshot) / prefix)
        if not any(f.suffix == ".safetensors" for f in files):
            raise SourceError(f"{what}: no .safetensors weights in the snapshot (pickled weights are never fetched)")
        for f in files:
            shutil.copy2(f, staged / f.name)
        record = {"repo_id": source.repo_id, "subfolder": source.subfolder, "revision": source.revision,
                  "commit": commit}
        (staged / "source.json").write_text(json.dumps(record, indent=2))
    return record


def resolve_base(params: Params, hub_dir: str | Path = "data/hub/_base") -> Path:
    """The base model folder: fetched/installed package or local path (see `tasks.fetch.locate_base_model`),
    or a Hub checkpoint fetched into `hub_dir`."""
    source = params.base
    if source.repo_id:
        fetch_hub(HubSource(repo_id=source.repo_id, subfolder=source.subfolder, revision=source.revision), hub_dir)
        return Path(hub_dir)
    return Path(locate_base_model(source, params.data.raw_dir))


def copy_with_manifest(files: list[Path], out_dir: Path, source: dict) -> dict:
    """Copy `files` into out_dir atomically and write manifest.json (source, sha256 and bytes per file)."""
    with atomic_dir(out_dir) as staged:
        entries = {}
        for f in files:
            shutil.copy2(f, staged / f.name)
            entries[f.name] = {"sha256": sha256_file(staged / f.name), "bytes": f.stat().st_size}
        manifest = {"source": source, "files": entries}
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


TASK_FILES = ("train.parquet", "validation.parquet", "test.parquet", "labels.json")


def check_task_files(src: str | Path) -> None:
    """One-line SourceError naming the TASK_FILES missing from the task folder `src`."""
    missing = [f for f in TASK_FILES if not (Path(src) / f).is_file()]
    if missing:
        raise SourceError(f"{src}: task data lacks {', '.join(missing)}")


def copy_task_data(src: str | Path, out_dir: str | Path) -> dict:
    """Copy an expert's task tables (TASK_FILES) into out_dir atomically, with manifest.json (sha256 per file).

    The router and evaluate stages read these copies (artifacts/taskdata/<expert>), so DVC tracks task data
    wherever the registry keeps it."""
    src = Path(src)
    check_task_files(src)
    return copy_with_manifest([src / name for name in TASK_FILES], Path(out_dir), {"path": str(src)})


def label_count(folder: str | Path) -> int:
    """Number of classes of a task: the entries of `<folder>/labels.json` ({"0": name, ...})."""
    path = Path(folder) / "labels.json"  # its presence is checked by check_task_files
    try:
        labels = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(labels, dict) or not labels or set(labels) != {str(i) for i in range(len(labels))}:
        raise SourceError(f"{path}: expected an object with keys \"0\"..\"n-1\"")
    return len(labels)


def check_head_labels(name: str, checkpoint: str | Path, data: str | Path) -> None:
    """The expert's classification head must have as many labels as its task: len(id2label) (or num_labels)
    of `<checkpoint>/config.json` == len(`<data>/labels.json`); else a one-line CheckpointError."""
    config_path = Path(checkpoint) / "config.json"
    config = json.loads(config_path.read_text())
    head = len(config["id2label"]) if config.get("id2label") else int(config.get("num_labels", 2))
    task = label_count(data)
    if head != task:
        raise CheckpointError(f"expert {name}: {config_path} has a {head}-label head but its task data "
                              f"{Path(data) / 'labels.json'} has {task} labels")


def download_base(params: Params, out_dir: str | Path) -> dict:
    folder = resolve_base(params)
    return copy_with_manifest(_checkpoint_files(folder), Path(out_dir), {"base": params.base.model_dump(exclude_none=True),
                                                    "folder": str(folder)})


def download_expert(name: str, params: Params, base_dir: str | Path, out_dir: str | Path) -> dict:
    """Validate expert `name` against the base, then copy it into out_dir with its manifest."""
    if name not in params.experts:
        raise CheckpointError(f"params.yaml: experts: no expert named '{name}' (have {sorted(params.experts)})")
    folder = Path(params.experts[name].path)
    experts = ExpertSet(base_dir, {name: folder})
    experts.check_finite()
    check_task_files(params.experts[name].data)  # before anything is written: main copies the tables next
    check_head_labels(name, folder, params.experts[name].data)
    source = {"path": str(folder)}
    if (folder / "source.json").is_file():
        source["hub"] = json.loads((folder / "source.json").read_text())
    return copy_with_manifest(_checkpoint_files(folder), Path(out_dir), source)


def add_arguments(parser) -> None:
    parser.add_argument("what", choices=["base", "expert", "hub"], help="what to resolve")
    parser.add_argument("--name", help="expert name (for expert/hub)")
    parser.add_argument("--params", default="params.yaml")


def main(args) -> None:
    params = load_params(args.params)
    if args.what == "base":
        download_base(params, "artifacts/base")
    elif args.what == "hub":
        if args.name not in params.hub_sources:
            raise SourceError(f"{args.params}: hub_sources: no entry '{args.name}'")
        fetch_hub(params.hub_sources[args.name], Path("data/hub") / args.name)
    else:
        download_expert(args.name, params, "artifacts/base", Path("artifacts/checkpoints") / args.name)
        copy_task_data(params.experts[args.name].data, Path(TASKDATA_DIR) / args.name)
