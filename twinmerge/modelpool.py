"""Classifier models from tensors, and batched prediction over texts (the "model pool" used by evaluation).

`assemble_classifier(config, state)` builds an HF *ForSequenceClassification from a canonical-name state dict
(backbone + one expert's head) without random initialisation (meta device, then `assign=True`).
`predict_logits(model, tokenizer, texts)` runs it batched, sorted by length to minimise padding.
"""
from collections.abc import Callable, Sequence

import torch
from twinmerge.progress import progress_bar
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig

from twinmerge.errors import CheckpointError


def config_from_dict(config: dict) -> PretrainedConfig:
    cfg = dict(config)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def check_state_names(model: torch.nn.Module, state, optional=()) -> None:
    """CheckpointError (listing up to 5 names of each) unless `state` holds exactly `model`'s persistent tensors;
    names in `optional` may be absent (a tied output head, which takes the input embedding)."""
    persistent = set(model.state_dict())
    missing = sorted(persistent - set(state) - set(optional))
    unexpected = sorted(set(state) - persistent)
    if missing or unexpected:
        raise CheckpointError(f"cannot assemble a {type(model).__name__}: missing tensors {missing[:5]}, "
                              f"unexpected tensors {unexpected[:5]}")


def assemble_classifier(config: dict | PretrainedConfig, state: dict[str, torch.Tensor]):
    """HF sequence classifier with exactly the given tensors (canonical names), in eval mode, float32.

    Raises CheckpointError listing missing/unexpected tensor names (non-persistent buffers excepted).
    """
    cfg = config if isinstance(config, PretrainedConfig) else config_from_dict(config)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(cfg)
    check_state_names(model, state)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                          strict=True, assign=True)
    _materialize_buffers(model)
    return model.eval()


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Recreate non-persistent buffers left on the meta device (e.g. position_ids) on the CPU."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                if name == "position_ids":
                    new = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
                else:
                    new = torch.zeros(buf.shape, dtype=buf.dtype)
                module.register_buffer(name, new, persistent=False)


def batches_by_length(tokenizer, texts: Sequence[str], batch_size: int, max_length: int):
    """Yield (indices, encoded batch) with texts sorted by token length (less padding, same results)."""
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        yield idx, enc


@torch.inference_mode()
def map_batches(fn: Callable[[list[int], dict], torch.Tensor], tokenizer, texts: Sequence[str], batch_size: int = 64,
                max_length: int = 128, desc: str | None = None) -> torch.Tensor:
    """Apply fn(indices, encoded_batch) -> Tensor[b, ...] over texts; rows returned in the input order."""
    out = None
    with progress_bar(total=len(texts), desc=desc, disable=desc is None) as bar:
        for idx, enc in batches_by_length(tokenizer, texts, batch_size, max_length):
            rows = fn(idx, dict(enc))
            if out is None:
                out = rows.new_zeros((len(texts), *rows.shape[1:]))
            out[torch.tensor(idx)] = rows
            bar.update(len(idx))
    return out if out is not None else torch.empty(0)


def predict_logits(model, tokenizer, texts: Sequence[str], batch_size: int = 64, max_length: int = 128,
                   desc: str | None = None) -> torch.Tensor:
    """Logits [N, num_labels] of an HF sequence classifier over texts."""
    return map_batches(lambda idx, enc: model(**enc).logits.float(), tokenizer, texts, batch_size, max_length, desc)
