"""The shared expert on disk: an ordinary Hugging Face backbone folder (config.json + model.safetensors, or
shards + index, + tokenizer files) that loads with `AutoModel.from_pretrained`.

Its tensor names are the canonical (expert) names minus the experts' `base_model_prefix`; `twinmerge.json`
records that prefix and the merge report, so `load_shared` gives the canonical state dict back and
`SharedModel` reads it one tensor at a time.

`write_shared_expert` merges and writes theta_s as a stream (the `modularize` step): memory holds one block
of one tensor for every expert, never a model, whatever the number of experts (see its docstring).
"""
import fnmatch
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from twinmerge.errors import CheckpointError, MergeError
from twinmerge.io import (DEFAULT_MAX_SHARD_BYTES, Checkpoint, ExpertSet, is_causal_lm, save_hf_model,
                          stream_hf_model, weight_files)
from twinmerge.merge import _uses_global_trim, global_thresholds, merge_tensor, resolve_options
from twinmerge.progress import progress_bar

SHARED_META = "twinmerge.json"
# Bytes of float32 per block when a tensor is merged block by block: the n task vectors' rows and the base's.
DEFAULT_BLOCK_BYTES = 32 << 20


def save_shared(state: dict[str, torch.Tensor], pool: ExpertSet, out_dir: str | Path, report: dict) -> Path:
    """Write theta_s (canonical names) as an HF backbone folder with the base's config and tokenizer."""
    prefix, config, tokenizer_src = _backbone_folder(pool, state)
    return save_hf_model({k[len(prefix):]: v for k, v in state.items()}, config, out_dir, tokenizer_src,
                         extra_files={SHARED_META: _meta(prefix, report)})


def stream_shared(state: Mapping[str, torch.Tensor], pool: ExpertSet, out_dir: str | Path, report: dict,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """`save_shared` for a lazy state (`SharedModel`, or a mapping that computes each tensor when looked up):
    every tensor is looked up, written and dropped in turn, so memory holds one tensor, not the model. Shapes
    and dtypes are the base's (a merged backbone has them); the same bytes as `save_shared` (one shard)."""
    keys = list(state)
    prefix, config, tokenizer_src = _backbone_folder(pool, keys)
    specs = [(k[len(prefix):], pool.base.shape(pool.base_key(k)), pool.base.dtype(pool.base_key(k))) for k in keys]
    return stream_hf_model(specs, ((k[len(prefix):], state[k]) for k in keys), config, out_dir, tokenizer_src,
                           {SHARED_META: _meta(prefix, report)}, max_shard_bytes)


def write_shared_expert(pool: ExpertSet, method: str, options: Mapping[str, Any] | None = None,
                        include: Iterable[str] = ("*",), exclude: Iterable[str] = (),
                        out_dir: str | Path = "artifacts/shared", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                        block_bytes: int = DEFAULT_BLOCK_BYTES, progress: bool = True) -> Path:
    """`save_shared(*build_shared_expert(...))` as a stream: the same tensors, report and bytes (one shard), but
    each merged tensor goes to disk as it is produced, so no model is ever held in memory.

    Tensors of a method that merges each entry on its own (`_blockwise`), and the tensors kept from the base,
    are read, merged and written in blocks of rows of about `block_bytes` for the n task vectors together: memory
    stays about `block_bytes` (times the method's temporaries), whatever n and the tensor sizes. Other methods
    merge whole tensors: memory about (n + 2) times the largest tensor. TIES' global trim first finds its
    thresholds (`global_thresholds`: one task vector of the whole model, float32, in memory).
    The folder is sharded above `max_shard_bytes` (see `HFWeightsWriter`).
    It repeats `build_shared_expert`'s selection and report rather than changing twinmerge/merge.py (a DVC
    dependency of most stages); tests/test_streaming.py checks both give the same bytes for every merge method.
    """
    opts = resolve_options(method, options)
    selected = _selected(pool, include, exclude)
    keys = pool.mergeable_keys()
    thresholds = global_thresholds(pool, [k for k in keys if k in selected], method, opts, progress) \
        if _uses_global_trim(method, opts) else None
    report = {"method": method, "options": opts, "experts": list(pool.names),
              "merged": [k for k in keys if k in selected], "kept": [k for k in keys if k not in selected],
              "heads": pool.head_keys()}
    prefix, config, tokenizer_src = _backbone_folder(pool, keys)
    specs = [(k[len(prefix):], pool.base.shape(pool.base_key(k)), pool.base.dtype(pool.base_key(k))) for k in keys]
    blocks = ((k[len(prefix):], block) for k, block in
              _merged_blocks(pool, keys, selected, method, opts, thresholds, block_bytes, progress))
    return stream_hf_model(specs, blocks, config, out_dir, tokenizer_src, {SHARED_META: _meta(prefix, report)},
                           max_shard_bytes)


def _selected(pool: ExpertSet, include: Iterable[str], exclude: Iterable[str]) -> set[str]:
    """Mergeable keys matching an `include` and no `exclude` pattern (MergeError for a pattern matching none)."""
    include, exclude, keys = list(include), list(exclude), pool.mergeable_keys()
    for pattern in include + exclude:
        if not any(fnmatch.fnmatchcase(k, pattern) for k in keys):
            raise MergeError(f"pattern {pattern!r} matches no mergeable tensor")
    return set(pool.select(include, exclude))


def _blockwise(method: str, opts: Mapping[str, Any]) -> bool:
    """Whether `method` merges every entry on its own (TIES given its global thresholds), so that merging a
    block of rows gives that block of the whole tensor's merge, bit for bit (tests/test_streaming.py). Not so:
    TIES' per-tensor trim, DARE (per-tensor random draws), the SVD-based methods."""
    return method in ("weight_average", "task_arithmetic") or (method == "ties" and opts["trim"] == "global")


def _merged_blocks(pool: ExpertSet, keys: list[str], selected: set[str], method: str, opts: Mapping[str, Any],
                   thresholds: torch.Tensor | None, block_bytes: int, progress: bool
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, theta_s block) for every key in order: whole tensors, or blocks of rows where that is exact."""
    n = len(pool.names)
    for key in progress_bar(keys, desc=f"merge ({method})", unit="tensor", disable=not progress):
        shape = pool.base.shape(pool.base_key(key))
        if not shape or (key in selected and not _blockwise(method, opts)):
            yield key, _merge_rows(pool, key, None, key in selected, method, opts, thresholds)
            continue
        step = max(1, block_bytes // ((n + 1) * 4 * math.prod(shape[1:])))
        for start in range(0, shape[0], step):
            rows = slice(start, min(start + step, shape[0]))
            yield key, _merge_rows(pool, key, rows, key in selected, method, opts, thresholds)


def _merge_rows(pool: ExpertSet, key: str, rows: slice | None, merge: bool, method: str, opts: Mapping[str, Any],
                thresholds: torch.Tensor | None) -> torch.Tensor:
    """theta_0 + merge(theta_t - theta_0) for `rows` of tensor `key` (all rows: None), as `build_shared_expert`
    computes it (float32, cast back to the base dtype); theta_0 itself when the key is not merged."""
    base = pool.base_tensor(key, rows)
    if not merge:
        return base
    base32 = base.to(torch.float32)
    taus = torch.empty((len(pool.names), *base.shape), dtype=torch.float32)
    for i, name in enumerate(pool.names):
        torch.sub(pool.expert_tensor(name, key, rows).to(torch.float32), base32, out=taus[i])
    return (base32 + merge_tensor(method, opts, taus, key, thresholds)).to(base.dtype)


def _backbone_folder(pool: ExpertSet, keys: Iterable[str]) -> tuple[str, dict, Path]:
    """(backbone prefix, config, tokenizer folder) of the shared expert's HF folder. The prefix is the experts'
    backbone prefix ("bert."), or for causal LMs "" (whole-model names) when a merged tensor lies outside it: the
    untied output head (Llama's `lm_head.weight`), which `AutoModel` skips and `AutoModelForCausalLM` reads.
    CheckpointError if a merged tensor lies outside the prefix of any other model (e.g. a classifier's head that
    the base also has: heads are not merged)."""
    first = pool.experts[pool.names[0]]
    prefix = pool.backbone_prefix
    if any(not k.startswith(prefix) for k in keys):
        if not is_causal_lm(first.config):
            raise CheckpointError(f"shared state has tensors outside the backbone prefix {prefix!r}")
        prefix = ""
    config = {k: v for k, v in first.config.items() if k not in ("id2label", "label2id", "num_labels",
                                                                 "problem_type", "architectures")}
    tokenizer_src = first.folder if (first.folder / "tokenizer_config.json").is_file() else pool.base.folder
    return prefix, config, tokenizer_src


def _meta(prefix: str, report: dict) -> str:
    """twinmerge.json: the canonical prefix and the merge report."""
    return json.dumps({"canonical_prefix": prefix, "merge": report}, indent=2)


def load_shared(folder: str | Path) -> dict[str, torch.Tensor]:
    """theta_s with canonical names, from a folder written by `save_shared` / `write_shared_expert` (one file or
    shards)."""
    prefix = _canonical_prefix(folder)
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            state.update(load_file(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types on missing/corrupt files
            raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from None
    return {prefix + k: v for k, v in state.items()}


class SharedModel(Mapping[str, torch.Tensor]):
    """theta_s with canonical names, read lazily: a tensor is read from disk when it is looked up, so a
    consumer that needs one tensor at a time (`compress`) never holds the model. Keys and shapes come from the
    safetensors headers (one file or shards)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.prefix = _canonical_prefix(folder)
        self._ckpt = Checkpoint(folder, "shared")

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.read(key)

    def read(self, key: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor `key`, or only `rows` of its first dimension (read from the file alone, `Checkpoint.get`)."""
        if key not in self:
            raise KeyError(key)
        return self._ckpt.get(key[len(self.prefix):], rows)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor `key` from the file header, without reading it."""
        if key not in self:
            raise KeyError(key)
        return tuple(self._ckpt.shape(key[len(self.prefix):]))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.startswith(self.prefix) and key[len(self.prefix):] in self._ckpt

    def __iter__(self) -> Iterator[str]:
        return (self.prefix + k for k in self._ckpt.keys())

    def __len__(self) -> int:
        return len(self._ckpt.keys())


def _canonical_prefix(folder: str | Path) -> str:
    """The canonical prefix recorded in a shared folder's twinmerge.json (CheckpointError naming the file)."""
    meta_path = Path(folder) / SHARED_META
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: not found (is {folder} a shared expert written by `modularize`?)")
    try:
        return json.loads(meta_path.read_text())["canonical_prefix"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta_path}: no canonical_prefix in valid JSON ({exc})") from None
