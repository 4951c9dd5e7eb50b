"""Step `download`: resolve the base and every expert into `artifacts/` with a sha256 manifest.

- `fetch_hub(source, out_dir)`: a Hub checkpoint (repo_id, optional subfolder, revision) -> a local folder,
  safetensors/json/tokenizer files only, pinned to the resolved commit, retried with backoff.
- `resolve_base(params)`: the base model folder (installed package found with importlib, local path, or Hub).
- `download_expert(name, folder, base, out_dir)`: validate against the base (architecture, tensor names,
  shapes, dtypes, finite values), the task tables (`check_task_files`: columns, dtypes, non-empty splits, label
  range) and the head against the task's labels.json before anything is written, then copy into `out_dir`
  with a manifest; `copy_task_data` copies the expert's task tables beside it. `expert add` runs the same
  checks.
"""
import fnmatch
import glob
import json
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path

from tasks.fetch import locate_base_model, sha256_file
from tasks.params import HubSource, Params, load_params, stage_item
from tasks.taskdata import TASKDATA_DIR
from twinmerge.errors import CheckpointError, SourceError
from twinmerge.io import ExpertSet, atomic_dir

log = logging.getLogger(__name__)

# What a checkpoint is: weights, configs and tokenizer files; not training logs (an expert folder's scores.json,
# trainer_state.json, ...), so an expert's copy and fingerprint change only when its weights or configs do.
CHECKPOINT_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                       "adapter_config.json", "twinmerge_adapter.json", "preprocessor_config.json", "special_tokens_map.json",
                       "added_tokens.json", "tokenizer*", "vocab.txt", "vocab.json", "merges.txt", "*.model")


def _checkpoint_files(folder: Path) -> list[Path]:
    """Files of a checkpoint folder worth copying: weights (safetensors only), configs, tokenizer files."""
    files = set()
    for pattern in CHECKPOINT_PATTERNS:
        files.update(p for p in folder.glob(pattern) if p.is_file())
    return sorted(files)


def _with_retries(fn, what: str, attempts: int = 4, first_delay: float = 2.0):
    """Call fn(); on an exception retry with exponential backoff, then raise a one-line SourceError naming `what`.

    An HTTP 4xx answer (repo, revision or file not found, no access; not 408/429) is final: raised at once."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:  # network errors come in many types (requests, httpx, OSError)
            status = getattr(getattr(e, "response", None), "status_code", None)
            if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
                raise SourceError(f"{what}: {type(e).__name__}: {_one_line(e)}") from None
            if attempt == attempts:
                raise SourceError(f"{what}: failed after {attempts} attempts: {type(e).__name__}: "
                                  f"{_one_line(e)}") from None
            delay = first_delay * 2 ** (attempt - 1)
            log.warning("%s: attempt %d failed (%s); retrying in %.0fs", what, attempt, _one_line(e), delay)
            time.sleep(delay)


def _one_line(e: Exception) -> str:
    """An exception's message on one line (huggingface_hub's span several)."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def is_commit(revision: str) -> bool:
    """True for a full 40-hex Git commit id (the only Hub revision that cannot move)."""
    return re.fullmatch(r"[0-9a-f]{40}", revision) is not None


def fetch_hub(source: HubSource, out_dir: str | Path, api=None, snapshot_download=None,
              retry_delay: float = 2.0) -> dict:
    """Download one Hub checkpoint into `out_dir` (the subfolder's files at its top level).

    The revision is resolved to a commit first and the download pinned to it; `out_dir/source.json` records
    repo_id, subfolder, revision and commit (so the commit is part of the folder's hash in dvc.lock, and of the
    `download` manifests). A revision that is not a commit (a branch or tag) is logged as a warning: it can
    resolve to another commit on the next fetch. `api`/`snapshot_download` default to huggingface_hub's.
    """
    import huggingface_hub

    api = api or huggingface_hub.HfApi()
    snapshot_download = snapshot_download or huggingface_hub.snapshot_download
    what = f"hub {source.repo_id}@{source.revision}" + (f"/{source.subfolder}" if source.subfolder else "")
    info = _with_retries(lambda: api.model_info(source.repo_id, revision=source.revision), what,
                         first_delay=retry_delay)
    commit = info.sha
    if not is_commit(source.revision):
        log.warning("%s: revision %r is a branch or tag, resolved to commit %s for this fetch only; pin "
                    "revision: %s in params for the same files on every machine", what, source.revision, commit, commit)
    log.info("%s: commit %s", what, commit)
    prefix = f"{source.subfolder.strip('/')}/" if source.subfolder else ""
    wanted = [prefix + p for p in CHECKPOINT_PATTERNS]
    if getattr(info, "siblings", None) is not None:  # the commit's file list: exactly the folder's own files
        # (a pattern's "*" also matches "/": "*.safetensors" would fetch every subfolder's weights too)
        wanted = [glob.escape(s.rfilename) for s in info.siblings if s.rfilename.startswith(prefix)
                  and "/" not in s.rfilename[len(prefix):]
                  and any(fnmatch.fnmatchcase(s.rfilename[len(prefix):], p) for p in CHECKPOINT_PATTERNS)]
    with tempfile.TemporaryDirectory(prefix="twinmerge-hub-") as snapshot, atomic_dir(out_dir) as staged:
        _with_retries(lambda: snapshot_download(repo_id=source.repo_id, revision=commit, local_dir=snapshot,
                                                allow_patterns=wanted),
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


SPLITS = ("train", "validation", "test")
TASK_FILES = tuple(f"{split}.parquet" for split in SPLITS) + ("labels.json",)
GENERATIVE_TASK_FILES = TASK_FILES[:-1]  # prompt/answer tables: no label names


def task_files(generative: bool = False) -> tuple[str, ...]:
    return GENERATIVE_TASK_FILES if generative else TASK_FILES


def check_task_files(src: str | Path, generative: bool = False) -> None:
    """The task tables of folder `src`, checked before anything is registered or copied; one-line SourceError
    naming the file. Checks: every file of `task_files(generative)` present; classification: labels.json
    {"0": name, ...} (n entries), each split a parquet table with a string column `text` and an integer column
    `label`, no nulls, at least one row, labels within 0..n-1; generative: `check_generative_table`."""
    missing = [f for f in task_files(generative) if not (Path(src) / f).is_file()]
    if missing:
        raise SourceError(f"{src}: task data lacks {', '.join(missing)}")
    if generative:
        for split in SPLITS:
            check_generative_table(Path(src) / f"{split}.parquet")
        return
    n = label_count(src)
    for split in SPLITS:
        check_task_table(Path(src) / f"{split}.parquet", n)


def _open_table(path: Path, columns: tuple[str, str], needs: str):
    """The parquet file at `path` (pyarrow ParquetFile), after checking that it is one and has `columns`; else a
    one-line SourceError naming the file (`needs`: what such a table needs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table_file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{path}: not a parquet table ({e})") from None
    names = table_file.schema_arrow.names
    absent = [c for c in columns if c not in names]
    if absent:
        raise SourceError(f"{path}: no column {' or '.join(absent)} (columns: {', '.join(names)}); {needs}")
    return table_file


def _read_rows(path: Path, table_file, columns: tuple[str, str]):
    """`columns` of the table (a pyarrow Table): SourceError when it has no rows or a column has nulls."""
    if table_file.metadata.num_rows == 0:
        raise SourceError(f"{path}: no rows (every split needs at least one)")
    table = table_file.read(columns=list(columns))
    for column in columns:
        if table.column(column).null_count:
            raise SourceError(f"{path}: column {column} has {table.column(column).null_count} missing values")
    return table


def check_generative_table(path: Path) -> None:
    """One split of a generative task: columns prompt (string) and answer (string, or list of strings: the
    acceptable answers, at least one, none null), no nulls, no empty prompt, at least one row; else a one-line
    SourceError naming the file."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = ("prompt", "answer")
    table_file = _open_table(path, columns, "a generative task table needs prompt (string) and answer (string or "
                                            "list of strings)")
    schema = table_file.schema_arrow
    strings = (pa.types.is_string, pa.types.is_large_string)
    answer = schema.field("answer").type
    if not any(f(schema.field("prompt").type) for f in strings):
        raise SourceError(f"{path}: column prompt has type {schema.field('prompt').type}, expected strings")
    if not (any(f(answer) for f in strings) or (pa.types.is_list(answer) and any(f(answer.value_type)
                                                                               for f in strings))):
        raise SourceError(f"{path}: column answer has type {answer}, expected strings or lists of strings")
    table = _read_rows(path, table_file, columns)
    empty = pc.sum(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(table.column("prompt"))), 0)).as_py()
    if empty:
        raise SourceError(f"{path}: {empty} prompt(s) empty or whitespace only")
    if pa.types.is_list(answer):
        answers = table.column("answer")
        no_answer = pc.sum(pc.equal(pc.list_value_length(answers), 0)).as_py()
        if no_answer or pc.list_flatten(answers).null_count:
            raise SourceError(f"{path}: column answer has {no_answer} empty list(s) and "
                              f"{pc.list_flatten(answers).null_count} missing value(s) inside lists; each row needs "
                              "at least one acceptable answer")


def check_task_table(path: Path, n_labels: int) -> None:
    """One split's table: columns text (string) and label (integer in 0..n_labels-1), no nulls, non-empty."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = ("text", "label")
    table_file = _open_table(path, columns, "a task table needs text (string) and label (integer)")
    schema = table_file.schema_arrow
    text_type, label_type = schema.field("text").type, schema.field("label").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise SourceError(f"{path}: column text has type {text_type}, expected strings")
    if not pa.types.is_integer(label_type):
        raise SourceError(f"{path}: column label has type {label_type}, expected integers 0..{n_labels - 1}")
    table = _read_rows(path, table_file, columns)
    low, high = (v.as_py() for v in pc.min_max(table.column("label")).values())
    if low < 0 or high >= n_labels:
        raise SourceError(f"{path}: labels span {low}..{high}, outside 0..{n_labels - 1} "
                          f"({n_labels} labels in labels.json)")


def copy_task_data(src: str | Path, out_dir: str | Path, generative: bool = False) -> dict:
    """Copy an expert's task tables (`task_files`) into out_dir atomically, with manifest.json (sha256 per file).

    The router and evaluate stages read these copies (artifacts/taskdata/<expert>), so DVC tracks task data
    wherever the registry keeps it."""
    src = Path(src)
    check_task_files(src, generative)
    return copy_with_manifest([src / name for name in task_files(generative)], Path(out_dir), {"path": str(src)})


def label_count(folder: str | Path) -> int:
    """Number of classes of a task: the entries of `<folder>/labels.json` ({"0": name, ...})."""
    path = Path(folder) / "labels.json"  # its presence is checked first by check_task_files
    try:
        labels = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(labels, dict) or not labels or set(labels) != {str(i) for i in range(len(labels))}:
        raise SourceError(f"{path}: expected an object with keys \"0\"..\"n-1\"")
    return len(labels)


def check_head_labels(name: str, config: dict, checkpoint: str | Path, data: str | Path) -> None:
    """The expert's classification head must have as many labels as its task: len(id2label) (or num_labels)
    of its `config` (the checkpoint's config.json; a LoRA adapter's labels over the base's config) ==
    len(`<data>/labels.json`); else a one-line CheckpointError naming the checkpoint folder."""
    head = len(config["id2label"]) if config.get("id2label") else int(config.get("num_labels", 2))
    task = label_count(data)
    if head != task:
        where = Path(checkpoint) / "config.json"
        where = where if where.is_file() else Path(checkpoint) / "adapter_config.json"
        raise CheckpointError(f"expert {name}: {where} has a {head}-label head but its task data "
                              f"{Path(data) / 'labels.json'} has {task} labels")


def check_causal_lm(name: str, experts: ExpertSet, checkpoint: str | Path) -> None:
    """A generative expert is a causal LM with exactly the base's tensors: a classifier (a head the base lacks)
    registered with a generative metric is refused in one line naming its folder."""
    if experts.head_keys():
        extra = ", ".join(experts.head_keys()[:3])
        raise CheckpointError(f"expert {name}: {checkpoint} has tensors the base lacks ({extra}): a generative "
                              "metric needs a causal LM expert with the base's tensors only")


def _source(folder: Path, record: dict) -> dict:
    """`record` plus the Hub record (with its resolved commit) of a folder that `fetch_hub` wrote."""
    if (folder / "source.json").is_file():
        record["hub"] = json.loads((folder / "source.json").read_text())
    return record


def download_base(params: Params, out_dir: str | Path) -> dict:
    folder = resolve_base(params)
    source = _source(folder, {"base": params.base.model_dump(exclude_none=True), "folder": str(folder)})
    return copy_with_manifest(_checkpoint_files(folder), Path(out_dir), source)


def check_fits_task(name: str, experts: ExpertSet, folder: str | Path, data: str | Path, generative: bool) -> None:
    """What expert `name` (validated in `experts`) needs for its task: a causal LM with the base's tensors only
    (a generative metric), else a head with as many labels as the task's labels.json."""
    if generative:
        check_causal_lm(name, experts, folder)
    else:
        check_head_labels(name, experts.experts[name].config, Path(folder), data)


def download_expert(name: str, params: Params, base_dir: str | Path, out_dir: str | Path) -> dict:
    """Validate expert `name` against the base, then copy it into out_dir with its manifest."""
    if name not in params.experts:
        raise CheckpointError(f"params.yaml: experts: no expert named '{name}' (have {sorted(params.experts)})")
    folder = Path(params.experts[name].path)
    experts = ExpertSet(base_dir, {name: folder})
    experts.check_finite()
    spec = params.experts[name]
    check_task_files(spec.data, spec.generative)  # before anything is written: main copies the tables next
    check_fits_task(name, experts, folder, spec.data, spec.generative)
    return copy_with_manifest(_checkpoint_files(folder), Path(out_dir), _source(folder, {"path": str(folder)}))


def add_arguments(parser) -> None:
    parser.add_argument("what", choices=["base", "expert", "hub"], help="what to resolve")
    parser.add_argument("--name", help="expert or hub name (default: from $DVC_STAGE download@NAME / hub_fetch@NAME)")
    parser.add_argument("--params", default="params.yaml")


def main(args) -> None:
    params = load_params(args.params)
    if args.what == "base":
        download_base(params, "artifacts/base")
    elif args.what == "hub":
        name = stage_item(args.name, "hub_fetch", "--name")
        if name not in params.hub_sources:
            raise SourceError(f"{args.params}: hub_sources: no entry '{name}'")
        fetch_hub(params.hub_sources[name], Path("data/hub") / name)
    else:
        name = stage_item(args.name, "download", "--name")
        download_expert(name, params, "artifacts/base", Path("artifacts/checkpoints") / name)
        copy_task_data(params.experts[name].data, Path(TASKDATA_DIR) / name, params.experts[name].generative)
