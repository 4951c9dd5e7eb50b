"""Expert registry: `twinmerge expert add|remerge|list`, source fingerprints and the watcher's recorded state.

The registry is params.yaml `experts:` (name -> {path, task, data, metric}) plus `hub_sources:` for Hub experts
(whose path is `data/hub/<name>`). `expert add` validates the checkpoint against the base before it touches
params.yaml, rewrites params.yaml in ruamel round-trip mode (comments and order kept) atomically and under an
exclusive lock (`.<params file>.lock` beside it: concurrent adds all land), then emits the Prefect event
`expert.added` (a deployment trigger of `flows/serve.py` starts a run at once).

Sources are watched by content:
- a local folder: sha256 over its checkpoint files (the files `download` copies: *.safetensors, *.json,
  tokenizer files), as "relative path <tab> sha256" lines sorted by path;
- a Hub expert: the latest commit of its tracked revision (`HfApi().model_info(repo_id, revision).sha`).
The last recorded state lives in `artifacts/registry_state.json` (git-ignored, independent of DVC); only
`flows/watch.py` writes it, after a successful pipeline run.
"""
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from tasks.download import (_checkpoint_files, check_fits_task, check_task_files, fetch_hub,
                            resolve_base, sha256_file)
from tasks.params import ExpertSpec, HubSource, Params, ParamsError, check_name, load_params, read_yaml
from twinmerge.errors import CheckpointError, SourceError, TwinMergeError
from twinmerge.io import ExpertSet

log = logging.getLogger(__name__)

STATE_PATH = "artifacts/registry_state.json"
HUB_DIR = "data/hub"
EVENT = "expert.added"


# ---------------------------------------------------------------------------------------------- fingerprints
def folder_fingerprint(folder: str | Path) -> str | None:
    """sha256 of a checkpoint folder's files ("name<TAB>sha256" lines, sorted); None when the folder is missing.

    Same file selection as `tasks.download` (top level, checkpoint patterns), so the fingerprint of a source
    folder equals `manifest_fingerprint` of its copy in artifacts/checkpoints/<name>."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    return _digest({f.relative_to(folder).as_posix(): sha256_file(f) for f in _checkpoint_files(folder)})


def manifest_fingerprint(manifest_path: str | Path) -> str | None:
    """The same fingerprint, read from a `download` manifest.json (no re-hashing)."""
    p = Path(manifest_path)
    if not p.is_file():
        return None
    files = json.loads(p.read_text())["files"]
    return _digest({name: meta["sha256"] for name, meta in files.items()})


def _digest(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\t{files[name]}\n".encode())
    return h.hexdigest()


def hub_key(params: Params, expert: str) -> str | None:
    """The hub_sources key whose fetch folder (data/hub/<key>) is this expert's path, else None."""
    path = Path(params.experts[expert].path)
    return next((k for k in params.hub_sources if path == Path(HUB_DIR) / k), None)


def hub_commit(source: HubSource, api=None) -> str:
    """Latest commit of the tracked revision (`api` defaults to huggingface_hub.HfApi())."""
    if api is None:
        import huggingface_hub

        api = huggingface_hub.HfApi()
    return api.model_info(source.repo_id, revision=source.revision).sha


def fetched_commit(key: str) -> str | None:
    """The commit currently fetched into data/hub/<key> (its source.json), if any."""
    p = Path(HUB_DIR) / key / "source.json"
    return json.loads(p.read_text()).get("commit") if p.is_file() else None


def fingerprints(params: Params, api=None) -> dict[str, dict]:
    """name -> {"source", "hash", "hub"?}. Local: folder_fingerprint; Hub: "commit:<sha>" of the tracked
    revision (falls back to the fetched commit, flagged "offline", when the Hub cannot be asked)."""
    out = {}
    for name, spec in params.experts.items():
        key = hub_key(params, name)
        if key is None:
            out[name] = {"source": f"local:{spec.path}", "hash": folder_fingerprint(spec.path)}
            continue
        src = params.hub_sources[key]
        entry = {"source": f"hub:{src.repo_id}@{src.revision}" + (f"/{src.subfolder}" if src.subfolder else ""),
                 "hub": key}
        try:
            entry["hash"] = f"commit:{hub_commit(src, api)}"
        except Exception as e:  # offline, rate-limited, gone: keep what we have, the next check retries
            log.warning("hub %s: cannot read the latest commit (%s: %s)", key, type(e).__name__, e)
            commit = fetched_commit(key)
            entry["hash"] = f"commit:{commit}" if commit else None
            entry["offline"] = True
        out[name] = entry
    return out


def load_state(path: str | Path = STATE_PATH) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else {"experts": {}}


def save_state(prints: dict[str, dict], path: str | Path = STATE_PATH, **extra) -> dict:
    state = {"updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra,
             "experts": {n: {k: v for k, v in e.items() if k != "offline"} for n, e in prints.items()}}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, p)
    return state


def compare(prints: dict[str, dict], state: dict) -> dict[str, str]:
    """name -> new | changed | unchanged | missing (source folder absent) | removed (recorded, now unregistered)."""
    seen = state.get("experts", {})
    out = {}
    for name, e in prints.items():
        if e.get("hash") is None:
            out[name] = "missing"
        elif name not in seen:
            out[name] = "new"
        else:
            out[name] = "unchanged" if seen[name].get("hash") == e["hash"] else "changed"
    out.update({name: "removed" for name in seen if name not in prints})
    return out


# ----------------------------------------------------------------------------------------------- params.yaml
def _yaml():
    from ruamel.yaml import YAML

    y = YAML()  # round-trip: comments, order, flow style kept
    y.preserve_quotes = True
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)
    y.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def _flow_map(d: dict):
    from ruamel.yaml.comments import CommentedMap

    m = CommentedMap((k, v) for k, v in d.items() if v is not None)
    m.fa.set_flow_style()
    return m


@contextlib.contextmanager
def params_lock(params_path: str | Path):
    """Exclusive flock on `.<name>.lock` beside the params file, held for a read-modify-write (the lock file
    stays: removing it would race with the next holder)."""
    path = Path(params_path)
    with open(path.with_name(f".{path.name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_params_entry(params_path: str | Path, name: str, expert: dict, hub: dict | None = None,
                       replace: bool = True) -> None:
    """Add/replace experts.<name> (and hub_sources.<name>) in params.yaml, keeping comments and order. Under
    `params_lock`; the new file is validated before it atomically replaces the old one."""
    path = Path(params_path)
    y = _yaml()
    with params_lock(path):
        read_yaml(path)  # a duplicate key: the one-line ParamsError of load_params, not ruamel's traceback
        original = path.read_text()
        doc = y.load(original)
        if not replace and name in (doc.get("experts") or {}):
            raise ParamsError(f"{path}: experts: '{name}' is already registered (use --replace)")
        if hub is not None:
            if doc.get("hub_sources") is None:
                doc["hub_sources"] = {}
            doc["hub_sources"][name] = _flow_map(hub)
        if doc.get("experts") is None:
            doc["experts"] = {}
        if name not in doc["experts"]:
            _keep_shared_frozen(doc)
        doc["experts"][name] = _flow_map(expert)
        _replace_validated(path, _dump(y, doc, original, ("hub_sources", "experts", "merge")))


def _keep_shared_frozen(doc) -> None:
    """Incremental mode (merge.incremental), before a NEW expert is added to `doc`: pin merge.experts to the
    experts merged so far (the new one stays out of the shared expert), or set it back to null (full re-merge)
    when the new expert would leave merge.remerge_after experts outside it."""
    merge = doc.get("merge") or {}
    if not merge.get("incremental"):
        return
    merged = list(merge.get("experts") or doc["experts"])
    outside = len(doc["experts"]) + 1 - len(merged)
    after = merge.get("remerge_after")
    value = None if after and outside >= after else _flow_list(merged)
    if "experts" in merge or not hasattr(merge, "insert") or not merge:
        merge["experts"] = value
    else:  # before the last key, which carries the comments that precede the next section
        merge.insert(len(merge) - 1, "experts", value)
    doc["merge"] = merge


def _flow_list(items: list):
    from ruamel.yaml.comments import CommentedSeq

    seq = CommentedSeq(items)
    seq.fa.set_flow_style()
    return seq


def remerge(params_path: str | Path = "params.yaml") -> list[str]:
    """Full re-merge on the next run: merge.experts -> null (every expert). Returns the experts it adds back."""
    path = Path(params_path)
    y = _yaml()
    with params_lock(path):
        params = load_params(path)
        outside = [n for n in params.experts if n not in params.shared_experts]
        original = path.read_text()
        doc = y.load(original)
        if (doc.get("merge") or {}).get("experts") is not None:
            doc["merge"]["experts"] = None
            _replace_validated(path, _dump(y, doc, original, ("merge",)))
    return outside


def _dump(y, doc, original: str, sections: tuple[str, ...]) -> str:
    """The YAML text of `doc` (ruamel writer `y`), edited only in its top-level `sections`: every other section,
    and the lines before the first key, keep their `original` text (ruamel's round trip keeps comments and
    order, but joins a flow mapping written over several lines into one line)."""
    buf = io.StringIO()
    y.dump(doc, buf)
    new, old = _top_level_blocks(buf.getvalue()), _top_level_blocks(original)
    return "".join(old[key] if key in old and key not in sections else text for key, text in new.items())


def _top_level_blocks(text: str) -> dict[str | None, str]:
    """{top-level key: its text} in order (None: the lines before the first key); a block runs from its key's
    line to the next top-level key, comments before that key included."""
    blocks: dict[str | None, list[str]] = {None: []}
    key = None
    for line in text.splitlines(keepends=True):
        if line[:1] not in ("", " ", "\t", "#", "\n", "-") and ":" in line:
            key = line.split(":", 1)[0].strip().strip("'\"")
            blocks[key] = []
        blocks[key].append(line)
    return {k: "".join(v) for k, v in blocks.items()}


def _replace_validated(path: Path, text: str) -> None:
    """Write `text` to a temp file beside `path`, validate it as params, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        load_params(tmp)  # never leave an invalid params.yaml behind
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------------------ expert add
def base_folder(params: Params) -> Path:
    """artifacts/base when the pipeline already resolved it, else the base of params (tasks.download)."""
    local = Path("artifacts/base")
    return local if (local / "config.json").is_file() else Path(resolve_base(params))


def validate_expert(name: str, folder: str | Path, base: str | Path) -> ExpertSet:
    """ExpertSet(base, {name: folder}) + check_finite; any problem -> one-line CheckpointError. Returns the
    validated set (its expert's config: a LoRA adapter folder's is the base's with the adapter's label fields)."""
    from twinmerge.lora import is_adapter_folder

    folder = Path(folder)
    if not (folder / "config.json").is_file() and not is_adapter_folder(folder):
        raise CheckpointError(f"expert {name}: {folder} is not a checkpoint folder (no config.json) nor a PEFT "
                              "adapter folder (no adapter_config.json)")
    try:
        experts = ExpertSet(base, {name: folder})
        experts.check_finite()
        return experts
    except TwinMergeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"expert {name} ({folder}) is incompatible with the base {base}: {first}") from None


def check_expert(name: str, folder: str | Path, base: str | Path, data: str | Path, generative: bool) -> None:
    """`validate_expert`, then what its task needs: a causal LM with the base's tensors only (generative metric)
    or a head with as many labels as the task's labels.json."""
    check_fits_task(name, validate_expert(name, folder, base), folder, data, generative)


def add_expert(name: str, task: str, data: str, metric: str = "accuracy", path: str | None = None,
               repo_id: str | None = None, subfolder: str | None = None, revision: str = "main",
               params_path: str | Path = "params.yaml", replace: bool = False, api=None,
               snapshot_download=None) -> dict:
    """Validate, then register one expert in params.yaml. Returns the experts entry written."""
    if (path is None) == (repo_id is None):
        raise ParamsError("expert add: give exactly one of --path FOLDER or --repo-id REPO")
    try:
        check_name(name)
        check_name(task)
    except ParamsError as e:
        raise ParamsError(f"expert add: {e}") from None
    params = load_params(params_path)
    if name in params.experts and not replace:
        raise ParamsError(f"{params_path}: experts: '{name}' is already registered (use --replace)")
    try:
        ExpertSpec._known_metric(metric)  # the params schema's rule (regression metrics refused)
    except ValueError as exc:
        raise ParamsError(f"expert add: --metric: {exc}") from None
    generative = ExpertSpec.generative_metric(metric)
    others = [n for n in params.experts if n != name]
    if others and params.generative != generative:
        kind, registered = ("generative", "classification") if generative else ("classification", "generative")
        raise ParamsError(f"expert add: --metric {metric} is a {kind} metric, but {params_path} registers "
                          f"{registered} experts; a registry is all classification experts or all generative ones "
                          "(causal LMs)")
    check_task_files(data, generative)
    base = base_folder(params)
    hub = None
    if repo_id is None:
        check_expert(name, path, base, data, generative)
    else:
        source = HubSource(repo_id=repo_id, subfolder=subfolder, revision=revision)
        Path(HUB_DIR).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=HUB_DIR, prefix=f".validate-{name}.") as tmp:
            fetch_hub(source, Path(tmp) / name, api=api, snapshot_download=snapshot_download)
            check_expert(name, Path(tmp) / name, base, data, generative)
        hub = source.model_dump(exclude_none=True)
        path = f"{HUB_DIR}/{name}"
    entry = {"path": str(path), "task": task, "data": str(data), "metric": metric}
    write_params_entry(params_path, name, entry, hub, replace=replace)  # re-checks `name` under the lock
    return entry


def emit_added(name: str, entry: dict) -> bool:
    """Emit `expert.added` for twinmerge.expert.<name>; True when a Prefect API took it."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:  # no server: an ephemeral one would swallow the event
        return False
    event = emit_event(event=EVENT, resource={"prefect.resource.id": f"twinmerge.expert.{name}",
                                              "prefect.resource.name": name},
                       payload={"expert": name, **entry})
    EventsWorker.drain_all()  # the CLI exits right after: send now
    return event is not None


# ------------------------------------------------------------------------------------------------------- CLI
def expert_table(params: Params, state_path: str | Path = STATE_PATH, api=None) -> list[dict]:
    prints = fingerprints(params, api)
    status = compare(prints, load_state(state_path))
    rows = []
    for name, e in prints.items():
        rows.append({"name": name, "task": params.experts[name].task, "source": e["source"],
                     "hash": (e["hash"] or "-")[:19], "status": status[name] + (" (offline)" if e.get("offline") else "")})
    rows += [{"name": n, "task": "-", "source": "-", "hash": "-", "status": "removed"}
             for n, s in status.items() if s == "removed"]
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ["name", "task", "source", "hash", "status"]
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="validate an expert against the base and register it in params.yaml")
    add.add_argument("name")
    src = add.add_mutually_exclusive_group(required=True)
    src.add_argument("--path", help="local checkpoint folder (Hugging Face layout)")
    src.add_argument("--repo-id", help="Hub repo id (fetched by stage hub_fetch@NAME into data/hub/NAME)")
    add.add_argument("--subfolder")
    add.add_argument("--revision", default="main")
    add.add_argument("--task", required=True)
    add.add_argument("--data", required=True, help="task tables folder: train/validation/test.parquet (text, "
                     "label) + labels.json, or (prompt, answer) for a generative metric")
    add.add_argument("--metric", default="accuracy")
    add.add_argument("--replace", action="store_true", help="overwrite an expert of the same name")
    add.add_argument("--no-event", action="store_true", help="do not emit the Prefect event expert.added")
    add.add_argument("--params", default="params.yaml")
    again = sub.add_parser("remerge", help="merge.experts -> null: the next run merges every expert into the "
                                           "shared expert and recompresses every expert against it")
    again.add_argument("--params", default="params.yaml")
    lst = sub.add_parser("list", help="registered experts, content hash and status vs the last recorded run")
    lst.add_argument("--params", default="params.yaml")
    lst.add_argument("--state", default=STATE_PATH)


def main(args) -> None:
    if args.action == "list":
        print(format_table(expert_table(load_params(args.params), args.state)))
        return
    if args.action == "remerge":
        outside = remerge(args.params)
        print(f"{args.params}: merge.experts: null; the next run re-merges every expert"
              + (f" (adds {', '.join(outside)} to the shared expert)" if outside else " (all were merged already)"))
        return
    entry = add_expert(args.name, args.task, args.data, args.metric, path=args.path, repo_id=args.repo_id,
                       subfolder=args.subfolder, revision=args.revision, params_path=args.params,
                       replace=args.replace)
    print(f"expert {args.name} added to {args.params}: {json.dumps(entry)}")
    params = load_params(args.params)
    if args.name not in params.shared_experts:
        print(f"incremental mode: the shared expert stays as it is ({', '.join(params.shared_experts)}); "
              f"`twinmerge expert remerge` merges every expert")
    if args.no_event:
        return
    if emit_added(args.name, entry):
        print(f"event {EVENT} emitted for twinmerge.expert.{args.name}")
    else:
        print(f"no Prefect server configured (PREFECT_API_URL): event {EVENT} not sent; the next scheduled "
              "check picks the expert up")
