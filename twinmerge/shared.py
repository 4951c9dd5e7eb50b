"""The shared expert on disk: an ordinary Hugging Face backbone folder (config.json + model.safetensors +
tokenizer files) that loads with `AutoModel.from_pretrained`.

Its tensor names are the canonical (expert) names minus the experts' `base_model_prefix`; `twinmerge.json`
records that prefix and the merge report, so `load_shared` gives the canonical state dict back.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from twinmerge.errors import CheckpointError
from twinmerge.io import ExpertSet, save_hf_model

SHARED_META = "twinmerge.json"


def save_shared(state: dict[str, torch.Tensor], pool: ExpertSet, out_dir: str | Path, report: dict) -> Path:
    """Write theta_s (canonical names) as an HF backbone folder with the base's config and tokenizer."""
    first = pool.experts[pool.names[0]]
    prefix = pool.backbone_prefix
    if any(not k.startswith(prefix) for k in state):
        raise CheckpointError(f"shared state has tensors outside the backbone prefix {prefix!r}")
    config = {k: v for k, v in first.config.items() if k not in ("id2label", "label2id", "num_labels",
                                                                 "problem_type", "architectures")}
    tokenizer_src = first.folder if (first.folder / "tokenizer_config.json").is_file() else pool.base.folder
    meta = json.dumps({"canonical_prefix": prefix, "merge": report}, indent=2)
    return save_hf_model({k[len(prefix):]: v for k, v in state.items()}, config, out_dir, tokenizer_src,
                         extra_files={SHARED_META: meta})


def load_shared(folder: str | Path) -> dict[str, torch.Tensor]:
    """theta_s with canonical names, from a folder written by `save_shared`."""
    folder = Path(folder)
    meta_path = folder / SHARED_META
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: not found (is {folder} a shared expert written by `modularize`?)")
    try:
        prefix = json.loads(meta_path.read_text())["canonical_prefix"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta_path}: no canonical_prefix in valid JSON ({exc})") from None
    try:
        state = load_file(folder / "model.safetensors")
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types on missing/corrupt files
        raise CheckpointError(f"{folder / 'model.safetensors'}: cannot read safetensors file ({exc})") from None
    return {prefix + k: v for k, v in state.items()}
