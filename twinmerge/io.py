"""Checkpoint folders in Hugging Face layout: lazy per-tensor reading, expert-set validation, atomic writes,
streaming (and sharded) safetensors writers.

A checkpoint folder holds `config.json` and either `model.safetensors` or a sharded
`model.safetensors.index.json` (+ shards). Pickled `pytorch_model.bin` is only read with `allow_pickle=True`
(and then with `torch.load(weights_only=True)`). Tensors are read one at a time through
`safetensors.safe_open`, so peak memory is one tensor per open checkpoint, never a whole state dict.

Writers: `save_safetensors_atomic` / `save_hf_model` write a state dict held in memory; `SafetensorsWriter` /
`HFWeightsWriter` / `stream_hf_model` write tensors as they are produced (header planned from (name, shape,
dtype) up front, each tensor or block of rows written at its offset), with the same bytes for one file, so a
pipeline step's memory is one tensor, not a model.

Canonical tensor names are the experts' names (see docs/DESIGN.md "Tensor names").
"""
import fnmatch
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError

TensorSpec = tuple[str, tuple[int, ...], torch.dtype]  # (name, shape, dtype) of a tensor still to be written

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # huggingface_hub's and mergekit's default shard size ("5GB")

# Config fields that must agree between base and experts (num_labels / id2label may differ); GPT-2 names its
# sizes n_embd / n_layer / n_head / n_inner / n_positions, Llama-style decoders add grouped-query heads.
ARCH_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "vocab_size", "max_position_embeddings", "type_vocab_size", "n_embd", "n_layer", "n_head", "n_inner",
               "n_positions", "num_key_value_heads")
# Fields that change the computation; compared when both configs set them (an absent field means the model
# class's default, which is not known here without importing it).
COMPUTE_FIELDS = ("hidden_act", "layer_norm_eps", "position_embedding_type", "rms_norm_eps", "rope_theta",
                  "activation_function", "layer_norm_epsilon")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model")

# safetensors dtype codes -> torch dtypes (the ones read and written here).
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def is_causal_lm(config: Mapping) -> bool:
    """Whether a model config's architecture is a causal LM (`*ForCausalLM`, GPT-2's `*LMHeadModel`)."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or [])


def weight_files(folder: str | Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of an HF checkpoint folder, in load order.

    `model.safetensors` wins over a sharded index; a lone `pytorch_model.bin` is refused unless `allow_pickle`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if (folder / SAFETENSORS).is_file():
        return [folder / SAFETENSORS]
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: malformed safetensors index ({exc})") from None
        shards = [folder / name for name in dict.fromkeys(weight_map.values())]
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(f"{shard}: shard listed in {index.name} not found")
        return shards
    if (folder / PICKLE).is_file():
        if not allow_pickle:
            raise CheckpointError(f"{folder}: only pickled {PICKLE} found; "
                                  "pass allow_pickle=True to load untrusted pickles")
        return [folder / PICKLE]
    raise CheckpointError(f"{folder}: no weights ({SAFETENSORS}, {SAFETENSORS_INDEX} or {PICKLE})")


class Checkpoint:
    """A lazily read HF checkpoint folder: metadata at open, one tensor per `get`."""

    def __init__(self, folder: str | Path, name: str | None = None, allow_pickle: bool = False):
        self.folder = Path(folder)
        self.name = name or self.folder.name
        files = weight_files(self.folder, allow_pickle)
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: config.json not found")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{config_path}: invalid JSON ({exc})") from None
        self._file: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        if files[0].name == PICKLE:
            try:
                self._pickled = torch.load(files[0], map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
                raise CheckpointError(f"{files[0]}: cannot load ({exc})") from None
            for key, t in self._pickled.items():
                self._meta[key] = (tuple(t.shape), t.dtype)
            return
        for path in files:
            try:
                with safe_open(path, "pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
                        if dtype is None:
                            raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {sl.get_dtype()}")
                        self._file[key] = path
                        self._meta[key] = (tuple(sl.get_shape()), dtype)
            except CheckpointError:
                raise
            except Exception as exc:  # noqa: BLE001 - safetensors raises several types on corrupt headers
                raise CheckpointError(f"{path}: cannot read safetensors header ({exc})") from None

    def keys(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, key: str) -> bool:
        return key in self._meta

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[self._check(key)][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[self._check(key)][1]

    def get(self, key: str, rows: slice | None = None) -> torch.Tensor:
        """Read one tensor (CPU) without loading the rest of the checkpoint; with `rows`, only that slice of its
        first dimension (a block of a large tensor, read from the file alone)."""
        self._check(key)
        if self._pickled is not None:
            return self._pickled[key] if rows is None else self._pickled[key][rows]
        with safe_open(self._file[key], "pt") as f:
            return f.get_tensor(key) if rows is None else f.get_slice(key)[rows]

    @cached_property
    def base_model_prefix(self) -> str | None:
        """`base_model_prefix` of the transformers sequence-classification class for this model_type."""
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

        cls_name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(self.config.get("model_type"))
        cls = getattr(transformers, cls_name, None) if cls_name else None
        return getattr(cls, "base_model_prefix", None) or None

    def _check(self, key: str) -> str:
        if key not in self._meta:
            raise CheckpointError(f"{self.folder}: no tensor {key}")
        return key

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, {str(self.folder)!r}, {len(self._meta)} tensors)"


def _bare_backbone_prefix(base_keys: set[str], expert_keys: set[str]) -> str:
    """"p." when the base is a bare backbone whose tensors sit under prefix p in the experts (base key k ->
    expert key "p.k" for most k), else "". Read from the names alone: no model class is imported."""
    if len(base_keys & expert_keys) * 2 >= len(base_keys):
        return ""
    counts: dict[str, int] = {}
    for key in expert_keys:
        head, dot, rest = key.partition(".")
        if dot and rest in base_keys:
            counts[head] = counts.get(head, 0) + 1
    best = max(counts, key=counts.get, default=None)
    return f"{best}." if best is not None and counts[best] * 2 >= len(base_keys) else ""


def open_expert(folder: str | Path, name: str, allow_pickle: bool, base: Checkpoint,
                base_name: str | None = None) -> Checkpoint:
    """An expert folder: a full checkpoint, or a PEFT LoRA adapter folder (adapter_config.json) presented as the
    full checkpoint it stands for (`twinmerge.lora.LoraExpert`; `base_name` is the base's registered name)."""
    from .lora import open_expert as open_lora_or_full

    return open_lora_or_full(folder, name, allow_pickle, base, base_name)


class ExpertSet:
    """A base checkpoint and n experts fine-tuned from it, validated against each other.
    An expert folder may be a PEFT LoRA adapter trained on the base (see `open_expert`).

    Canonical names are the experts' tensor names. `base_key(k)` maps one to the base's name: identity, or
    `k` minus the experts' backbone prefix ("bert.") when the base is a bare backbone. Key classes:
      - mergeable: floating tensor in the base and in every expert, same shape and dtype everywhere;
      - head: floating tensor in every expert but not in the base (shapes may differ between experts);
      - ignored: base-only tensors, non-floating buffers.
    Structural checks run at construction; NaN/Inf is checked on every read (`check_finite` reads all).
    """

    def __init__(self, base: str | Path, experts: Mapping[str, str | Path] | Iterable[tuple[str, str | Path]],
                 allow_pickle: bool = False, base_name: str | None = None):
        pairs = list(experts.items()) if isinstance(experts, Mapping) else list(experts)
        if not pairs:
            raise CheckpointError("no experts given")
        self.base = Checkpoint(base, "base", allow_pickle)
        self.experts: dict[str, Checkpoint] = {}
        for name, folder in pairs:
            if name in self.experts:
                raise CheckpointError(f"duplicate expert name {name!r} ({folder} and {self.experts[name].folder})")
            self.experts[name] = open_expert(folder, name, allow_pickle, self.base, base_name)
        self.names = list(self.experts)
        first = self.experts[self.names[0]]
        self._check_configs()
        self._strip = _bare_backbone_prefix(set(self.base.keys()), set(first.keys()))
        self._check_key_sets()
        self._check_base_tensors()
        self._mergeable: list[str] = []
        self._heads: list[str] = []
        for key in first.keys():
            bkey = self.base_key(key)
            if bkey is not None and self.base.dtype(bkey).is_floating_point:
                self._check_tensor(key, bkey)
                self._mergeable.append(key)
            elif bkey is None and all(self.experts[n].dtype(key).is_floating_point for n in self.names):
                self._heads.append(key)

    @property
    def backbone_prefix(self) -> str:
        """The experts' backbone prefix with its dot ("bert."), "" when the experts have none: inferred from the
        tensor names when the base is a bare backbone, else transformers' `base_model_prefix`."""
        if self._strip:
            return self._strip
        prefix = self.experts[self.names[0]].base_model_prefix
        return f"{prefix}." if prefix else ""

    def base_key(self, key: str) -> str | None:
        """The base's name for canonical `key`, or None if the base has no such tensor (a head)."""
        if self._strip:
            if not key.startswith(self._strip):
                return None
            key = key[len(self._strip):]
        return key if key in self.base else None

    def mergeable_keys(self) -> list[str]:
        return list(self._mergeable)

    def head_keys(self) -> list[str]:
        return list(self._heads)

    def select(self, include: Iterable[str] = ("*",), exclude: Iterable[str] = ()) -> list[str]:
        """Mergeable keys matching any `include` fnmatch pattern and no `exclude` pattern."""
        include, exclude = list(include), list(exclude)
        return [k for k in self._mergeable if any(fnmatch.fnmatchcase(k, p) for p in include)
                and not any(fnmatch.fnmatchcase(k, p) for p in exclude)]

    def base_tensor(self, key: str, rows: slice | None = None) -> torch.Tensor:
        """theta_0 for canonical `key` (a mergeable key), in the base dtype (only `rows` of it, see
        `Checkpoint.get`)."""
        bkey = self.base_key(key)
        if bkey is None:
            raise CheckpointError(f"base ({self.base.folder}): no tensor for {key}")
        return _finite(self.base.get(bkey, rows), f"base ({self.base.folder})", bkey)

    def expert_tensor(self, name: str, key: str, rows: slice | None = None) -> torch.Tensor:
        """theta_t for expert `name` and canonical `key` (only `rows` of it, see `Checkpoint.get`)."""
        ckpt = self.experts[name]
        return _finite(ckpt.get(key, rows), f"expert {name!r} ({ckpt.folder})", key)

    def check_finite(self) -> None:
        """Read every mergeable and head tensor once; raise CheckpointError on the first NaN/Inf."""
        for key in self._mergeable:
            self.base_tensor(key)
        for name in self.names:
            for key in self._mergeable + self._heads:
                self.expert_tensor(name, key)

    def _check_configs(self) -> None:
        for name, ckpt in self.experts.items():
            both = [f for f in COMPUTE_FIELDS if f in ckpt.config and f in self.base.config]
            for field in ARCH_FIELDS + tuple(both):
                if ckpt.config.get(field) != self.base.config.get(field):
                    raise CheckpointError(
                        f"expert {name!r} ({ckpt.folder}): config {field}={ckpt.config.get(field)!r} differs from "
                        f"base ({self.base.folder}) {field}={self.base.config.get(field)!r}")

    def _check_key_sets(self) -> None:
        """Every expert must hold the same tensor names.

        A name held by some experts only is "missing" from the others when the base has it or more than half
        the experts hold it, else it is "extra" in the experts that hold it.
        """
        n = len(self.names)
        count: dict[str, int] = {}
        for ckpt in self.experts.values():
            for key in ckpt.keys():
                count[key] = count.get(key, 0) + 1
        for key, c in count.items():
            if c == n:
                continue
            missing = self.base_key(key) is not None or 2 * c > n
            for name, ckpt in self.experts.items():
                if missing and key not in ckpt:
                    raise CheckpointError(f"expert {name!r} ({ckpt.folder}): missing tensor {key} "
                                          f"(held by {c} of {n} experts)")
                if not missing and key in ckpt:
                    raise CheckpointError(f"expert {name!r} ({ckpt.folder}): extra tensor {key} "
                                          f"(held by {c} of {n} experts, not by the base)")

    def _check_base_tensors(self) -> None:
        """Every expert must hold each floating base tensor of the modules it keeps (so a single expert is checked
        against the base too, not only against other experts).

        A tensor's module is the first two parts of its canonical name ("roberta.encoder", "bert.pooler"). An
        expert may lack whole modules of the base (a masked-LM head; RoBERTa's pooler, unused by its sequence
        classifier) but not single tensors of a module it holds: such a checkpoint is truncated or foreign.
        """
        base = {self._strip + k: k for k in self.base.keys() if self.base.dtype(k).is_floating_point}
        for name, ckpt in self.experts.items():
            modules = {_module(k) for k in ckpt.keys()}
            for key, bkey in base.items():
                if key not in ckpt and _module(key) in modules:
                    raise CheckpointError(f"expert {name!r} ({ckpt.folder}): missing tensor {key} "
                                          f"(base ({self.base.folder}) has {bkey})")

    def _check_tensor(self, key: str, bkey: str) -> None:
        shape, dtype = self.base.shape(bkey), self.base.dtype(bkey)
        for name, ckpt in self.experts.items():
            if ckpt.shape(key) != shape:
                raise CheckpointError(f"expert {name!r} ({ckpt.folder}): tensor {key} has shape "
                                      f"{list(ckpt.shape(key))}, base ({self.base.folder}) {bkey} has {list(shape)}")
            if ckpt.dtype(key) != dtype:
                raise CheckpointError(f"expert {name!r} ({ckpt.folder}): tensor {key} has dtype "
                                      f"{ckpt.dtype(key)}, base ({self.base.folder}) {bkey} has {dtype}")


def _module(key: str) -> str:
    """The module a tensor name belongs to, for key-set checks: its first two dotted parts."""
    return ".".join(key.split(".")[:2])


def _finite(t: torch.Tensor, who: str, key: str) -> torch.Tensor:
    """`t` unchanged, or CheckpointError if it holds NaN/Inf.

    A finite float32 sum proves every entry finite (NaN/Inf propagate); only a non-finite sum (NaN/Inf, or
    overflow of huge values) pays for the exact, ~10x slower elementwise check.
    """
    if (t.is_floating_point() and not bool(torch.isfinite(t.sum(dtype=torch.float32)))
            and not bool(torch.isfinite(t).all())):
        raise CheckpointError(f"{who}: tensor {key} has NaN/Inf values")
    return t


# Temporaries of an atomic write sit beside their target (same filesystem, so the final rename is atomic) and
# are named `.<target>.tmp-<pid>-<random>`. `.dvcignore` hides `.*.tmp-*` from DVC, so one left by a killed
# step never enters the hash of a directory dependency (artifacts/checkpoints, artifacts/exclusive, ...); the
# next write of the same target deletes those whose process is gone (`sweep_stale_temps`).
TEMP_MARK = ".tmp-"
# Test-only hook (tests/test_kill.py): when PAUSE_ENV names a target (file or folder name), its atomic write
# prints "PAUSE_ENV: <temporary>" to stderr and waits, with the temporary complete, just before renaming it
# into place, so that a test can SIGKILL the step at the worst moment.
PAUSE_ENV = "TWINMERGE_TEST_PAUSE_BEFORE_RENAME"


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped, does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stale(entry: Path) -> bool:
    """Whether `entry` is a temporary (`.<target>.tmp-<pid>-*`) whose writer no longer runs."""
    head, mark, tail = entry.name.rpartition(TEMP_MARK)
    pid = tail.split("-", 1)[0]
    return bool(mark) and head.startswith(".") and pid.isdigit() and not _pid_alive(int(pid))


def _remove(entries: Iterable[Path]) -> list[Path]:
    removed = []
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def sweep_stale_temps(path: str | Path) -> list[Path]:
    """Delete the temporaries of `path` (`.<name>.tmp-<pid>-*` beside it) whose process no longer runs.

    Only this target's temporaries are looked at, and a live process's are kept, so two steps writing
    different targets into one folder (compress@a, compress@b in artifacts/exclusive) never touch each other's.
    """
    path = Path(path)
    return _remove(e for e in path.parent.glob(glob.escape(f".{path.name}{TEMP_MARK}") + "*") if _stale(e))


def sweep_stale_temps_under(folder: str | Path) -> list[Path]:
    """Delete every temporary under `folder` whose process no longer runs (those of live writers are kept).

    For a run's start: a step whose outputs DVC restores from its run-cache never writes them, so it never
    sweeps what a killed earlier run left beside them.
    """
    found = sorted(Path(folder).rglob(f".*{TEMP_MARK}*")) if Path(folder).is_dir() else []
    outer = [e for e in found if not set(e.parents) & set(found)]
    return _remove(e for e in outer if _stale(e))


def _temp_prefix(path: Path) -> str:
    """Prefix of a new temporary for `path`, after sweeping the stale ones (creates the parent folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path)
    return f".{path.name}{TEMP_MARK}{os.getpid()}-"


def _pause_before_rename(path: Path, tmp: str | Path) -> None:
    if os.environ.get(PAUSE_ENV) == path.name:
        print(f"{PAUSE_ENV}: {tmp}", file=sys.stderr, flush=True)
        time.sleep(600)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Run `write(tmp)` on a temp file beside `path`, then `os.replace` it into place (no partial files)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path))
    os.close(fd)
    try:
        write(tmp)
        _pause_before_rename(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_dir(folder: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `folder`; on success it replaces `folder` (an existing one is moved
    aside first and deleted after the swap), on error it is deleted and `folder` is left as it was."""
    folder = Path(folder)
    prefix = _temp_prefix(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=prefix))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        yield tmp
        _pause_before_rename(folder, tmp)
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=prefix))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(path: str | Path) -> str:
    """Hex sha256 that identifies a model's weights. `path` is a weight file, or an HF folder: for a folder
    with one `model.safetensors` (or that file's path), the file's sha256; for a sharded folder (or the path of
    its absent `model.safetensors`), the sha256 of the lines "<shard name> <shard sha256>" in load order."""
    path = Path(path)
    if path.name == SAFETENSORS and not path.exists():
        path = path.parent
    if not path.is_dir():
        return sha256_file(path)
    files = weight_files(path)
    if files == [path / SAFETENSORS]:
        return sha256_file(files[0])
    return hashlib.sha256("".join(f"{f.name} {sha256_file(f)}\n" for f in files).encode()).hexdigest()


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | Path,
                            metadata: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` (made contiguous, CPU, shared storage de-duplicated) to `path` atomically."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[key] = t

    def write(tmp: str) -> None:
        save_file(out, tmp, metadata=dict(metadata) if metadata else None)
        _sort_header_metadata(tmp)
    return atomic_write(path, write)


def _sort_header_metadata(path: str | Path) -> None:
    """Rewrite a safetensors header with its `__metadata__` keys sorted, in place and at the same length.

    The safetensors writer serialises metadata from a hash map whose order changes from process to process, so
    the same tensors and metadata gave different bytes (and DVC hashes) on every run. Header = 8-byte
    little-endian length N + N bytes of JSON, space-padded; the data offsets inside it do not depend on key
    order, and the sorted JSON is never longer (same entries, same compact separators)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None)
        if not meta:
            return
        text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"),
                          ensure_ascii=False).encode()
        if len(text) > n:
            raise CheckpointError(f"{path}: safetensors header grew when its metadata was sorted")
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def write_json_atomic(obj, path: str | Path) -> Path:
    """Write `obj` as indented JSON (trailing newline) to `path` atomically."""
    return write_text_atomic(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def write_text_atomic(text: str, path: str | Path) -> Path:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)
    return atomic_write(path, write)


def save_hf_model(state_dict: Mapping[str, torch.Tensor], config: Mapping, folder: str | Path,
                  tokenizer_src: str | Path | None = None, extra_files: Mapping[str, str] | None = None) -> Path:
    """Write an ordinary HF model folder (config.json + model.safetensors [+ tokenizer files] [+ extra text
    files]) atomically (see `atomic_dir`)."""
    with atomic_dir(folder) as tmp:
        write_json_atomic(dict(config), tmp / "config.json")
        save_safetensors_atomic(state_dict, tmp / SAFETENSORS, {"format": "pt"})
        _add_files(tmp, tokenizer_src, extra_files)
    return Path(folder)


def stream_hf_model(specs: Iterable[TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]], config: Mapping,
                    folder: str | Path, tokenizer_src: str | Path | None = None,
                    extra_files: Mapping[str, str] | None = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """`save_hf_model` for tensors produced one by one: `tensors` yields (name, tensor or its next block of rows)
    for the `specs` given up front, and each goes to disk as it comes (`HFWeightsWriter`, sharded above
    `max_shard_bytes`), so memory holds one block, not the model. One shard: the same bytes as `save_hf_model`."""
    with atomic_dir(folder) as tmp:
        write_json_atomic(dict(config), tmp / "config.json")
        with HFWeightsWriter(tmp, specs, max_shard_bytes) as out:
            for name, block in tensors:
                out.write(name, block)
        _add_files(tmp, tokenizer_src, extra_files)
    return Path(folder)


def _add_files(folder: Path, tokenizer_src: str | Path | None, extra_files: Mapping[str, str] | None) -> None:
    """Copy the tokenizer files found in `tokenizer_src` into `folder` and write `extra_files` {name: text}."""
    if tokenizer_src is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_src) / name).is_file():
                shutil.copy2(Path(tokenizer_src) / name, folder / name)
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)


# --- streaming safetensors writers --------------------------------------------------------------------------

# Order of dtypes in a safetensors file's data (safetensors sorts tensors by dtype, then by name): the writers
# below lay tensors out the same way, so that their files have `save_file`'s bytes (tests/test_streaming.py).
_LAYOUT_ORDER = {code: i for i, code in enumerate(
    ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"))}
_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def safetensors_header(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None,
                       where: str = "safetensors file") -> tuple[bytes, dict[str, int]]:
    """The header of a safetensors file holding `specs` [(name, shape, dtype)] and each tensor's offset in it.

    Header = 8-byte little-endian length N + N bytes of compact JSON, space-padded to a multiple of 8: the
    `__metadata__` (keys sorted, as `save_safetensors_atomic` leaves them), then every tensor in layout order
    (dtype as `_LAYOUT_ORDER`, then name) with its data offsets. Returns (header, {name: byte offset of its
    data from the start of the file}). CheckpointError naming `where` for a duplicate name, an unsupported
    dtype or non-string metadata.
    """
    specs = list(specs)
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{where}: safetensors metadata must map strings to strings")
    if len({name for name, _, _ in specs}) != len(specs):
        raise CheckpointError(f"{where}: duplicate tensor names")
    for name, _, dtype in specs:
        if dtype not in _DTYPE_CODES:
            raise CheckpointError(f"{where}: tensor {name} has unsupported dtype {dtype}")
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    begins, end = {}, 0
    for name, shape, dtype in sorted(specs, key=lambda s: (_LAYOUT_ORDER[_DTYPE_CODES[s[2]]], s[0])):
        begins[name], end = end, end + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [begins[name], end]}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, {name: 8 + len(text) + b for name, b in begins.items()}


class _CloseOrAbort:
    """`with writer:` closes (temp renamed into place) on success and aborts (temps deleted) on an exception."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SafetensorsWriter(_CloseOrAbort):
    """One safetensors file written tensor by tensor as the tensors are produced, atomically.

    The header is fixed up front from `specs` [(name, shape, dtype)], so every tensor has its final offset and
    is written there as soon as it comes, whole or in blocks of its first dimension's rows (in row order;
    tensors in any order), and nothing is kept in memory. The file is a temporary beside `path` (named and
    swept as in `atomic_write`) until `close` finds every tensor complete and renames it into place; `abort`,
    or an exception inside a `with` block, deletes it. Same bytes as `save_safetensors_atomic` for the same
    tensors and metadata.
    """

    def __init__(self, path: str | Path, specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        specs = [(name, tuple(shape), dtype) for name, shape, dtype in specs]
        header, self._offset = safetensors_header(specs, metadata, str(self.path))
        self._spec = {name: (shape, dtype) for name, shape, dtype in specs}
        self._rows_done = dict.fromkeys(self._spec, 0)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=_temp_prefix(self.path))
        with os.fdopen(fd, "wb") as f:
            f.write(header)

    def write(self, name: str, block: torch.Tensor) -> None:
        """Write tensor `name` whole, or the next block of its rows (first dimension), at its place in the file."""
        if name not in self._spec:
            raise CheckpointError(f"{self.path}: tensor {name} is not in the file's planned header")
        shape, dtype = self._spec[name]
        done = self._rows_done[name]
        fits = (tuple(block.shape) == shape if not shape else block.ndim == len(shape)
                and tuple(block.shape[1:]) == shape[1:] and done + block.shape[0] <= shape[0])
        if block.dtype != dtype or not fits:
            raise CheckpointError(f"{self.path}: tensor {name}: got {block.dtype} {list(block.shape)} after "
                                  f"{done} rows, planned {dtype} {list(shape)}")
        data = block.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        with open(self._tmp, "r+b") as f:
            f.seek(self._offset[name] + done * math.prod(shape[1:]) * dtype.itemsize)
            f.write(data)
        self._rows_done[name] = done + (block.shape[0] if shape else 1)

    def missing(self) -> list[str]:
        """Tensors not (completely) written yet."""
        return [n for n, (shape, _) in self._spec.items() if self._rows_done[n] < (shape[0] if shape else 1)]

    def close(self) -> Path:
        """Rename the complete file into place (CheckpointError, and the temporary deleted, if a tensor is
        missing)."""
        try:
            missing = self.missing()
            if missing:
                raise CheckpointError(f"{self.path}: {len(missing)} planned tensor(s) not written, first {missing[0]}")
            _pause_before_rename(self.path, self._tmp)
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Delete the temporary: nothing of this file is left."""
        Path(self._tmp).unlink(missing_ok=True)


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split `specs` into shards as transformers/huggingface_hub (and mergekit) do: in the given order, a new
    shard when the next tensor would take the current one past `max_shard_bytes`, a larger tensor alone."""
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise CheckpointError(f"max_shard_bytes {max_shard_bytes!r} must be an integer >= 1")
    shards, current, size = [], [], 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * spec[2].itemsize
        if nbytes > max_shard_bytes:
            shards.append([spec])
            continue
        if size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    return shards + [current] if current or not shards else shards


class HFWeightsWriter(_CloseOrAbort):
    """A model's weights in Hugging Face layout inside `folder`, streamed tensor by tensor.

    One `model.safetensors`, or, when the tensors pass `max_shard_bytes` (`plan_shards`), shards
    `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json` (transformers' layout; it loads with
    `from_pretrained`). Every file has metadata {"format": "pt"} and is a `SafetensorsWriter`; `close` renames
    them only when all are complete, then writes the index; `abort` deletes every temporary.
    """

    def __init__(self, folder: str | Path, specs: Iterable[TensorSpec],
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        specs = [(name, tuple(shape), dtype) for name, shape, dtype in specs]
        shards = plan_shards(specs, max_shard_bytes)
        n = len(shards)
        files = [SAFETENSORS] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        self.folder = Path(folder)
        self._writers: list[SafetensorsWriter] = []
        try:
            for file, shard in zip(files, shards):
                self._writers.append(SafetensorsWriter(self.folder / file, shard, {"format": "pt"}))
        except BaseException:
            self.abort()
            raise
        self._writer = {name: w for w, shard in zip(self._writers, shards) for name, _, _ in shard}
        self._index = None if n == 1 else {
            "metadata": {"total_parameters": sum(math.prod(s) for _, s, _ in specs),
                         "total_size": sum(math.prod(s) * d.itemsize for _, s, d in specs)},
            "weight_map": {name: file for file, shard in zip(files, shards) for name, _, _ in shard}}

    def write(self, name: str, block: torch.Tensor) -> None:
        """Write tensor `name` whole, or its next block of rows, into its shard."""
        if name not in self._writer:
            raise CheckpointError(f"{self.folder}: tensor {name} is not in the planned weights")
        self._writer[name].write(name, block)

    def close(self) -> None:
        """Rename every complete file into place and write the index (CheckpointError, and every temporary
        deleted, if a tensor is missing)."""
        missing = [name for w in self._writers for name in w.missing()]
        if missing:
            self.abort()
            raise CheckpointError(f"{self.folder}: {len(missing)} planned tensor(s) not written, first {missing[0]}")
        for w in self._writers:
            w.close()
        if self._index is not None:
            index = json.dumps(self._index, indent=2, sort_keys=True) + "\n"
            write_text_atomic(index, self.folder / SAFETENSORS_INDEX)

    def abort(self) -> None:
        """Delete every shard's temporary."""
        for w in self._writers:
            w.abort()
