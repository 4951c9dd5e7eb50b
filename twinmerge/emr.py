"""EMR-Merging (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024,
arXiv 2405.17461): one unified task vector plus, per task, a binary mask and a scalar rescaler.

With tau_t = theta_t - theta_0 (float32) for every merged tensor:
  - Elect: gamma = sign of sum_t tau_t per entry; tau_uni = gamma * max_t {|tau_t| : tau_t * gamma > 0}
    (0 where no task agrees strictly);
  - Mask: M_t = (tau_t * gamma > 0), the entries where task t agrees with the elected sign (the same as
    tau_t * tau_uni > 0: an agreeing task makes tau_uni nonzero). An entry with tau_t = 0 is never in M_t;
  - Rescale: one scalar per task over ALL merged tensors together (not per tensor), see `VARIANTS`;
  - Task t's model: theta_0 + lambda_t * M_t * tau_uni (heads are never merged: each task keeps its own).

What the reference implementations do (read for this module, none of their code is used here):
  - official code, harveyhuang18/EMR_Merging: `merge_vit/src/main_emr_merging.py` (`emr_merge`), the same
    in `merge_lm/model_merging_methods/merging_methods.py` (`MergingMethod.emr_merging`);
  - FusionBench, tanganke/fusion_bench: `fusion_bench/method/emr_merging/utils.py` (`emr_merge`, `_sign`,
    `EMRTaskModulator.apply`: theta_0 + tau_uni * mask * rescaler) and `.../emr_merging/emr_merging.py`.
  Both compute, per tensor, `flag = (s > 0) * 2 - 1` with s the mean (official) or sum (FusionBench) of the
  task vectors: a sum of exactly 0 elects gamma = -1, not 0 (so an exact cancellation such as [+1, -1] elects
  -1 and keeps the negative task's value; where every tau_t is 0 nothing agrees and tau_uni = 0 either way).
  Masks are `(tau_t * flag) > 0` (strict: tau_t = 0 is masked out). The rescaler is one scalar per task over
  the whole model, but as a sum of per-tensor MEANS: lambda_t = sum_k mean|tau_t[k]| / sum_k mean|M_t[k] *
  tau_uni[k]|, which weights each tensor by 1/numel, unlike the paper's sum |tau_t| / sum |M_t * tau_uni|
  over all entries. Which parameters: the official LM code takes the models' `named_parameters()` minus an
  exclude regex (the classification heads); the ViT code and FusionBench every tensor of the state dict. Here
  the caller's `keys` (default: the ExpertSet's mergeable keys; heads and non-float buffers never merged).
  Neither guards a zero denominator (0/0 = NaN); here lambda_t = 0 then (M_t * tau_uni = 0, so delta is 0).

`VARIANTS` (the `variant` argument, recorded in emr.json):
  - "official" (default, as the official code and FusionBench, so published EMR numbers are reproduced):
    gamma = +1 where sum_t tau_t > 0 else -1; lambda_t = sum_k mean|tau_t[k]| / sum_k mean|M_t tau_uni[k]|;
  - "paper": gamma = sign(sum_t tau_t) (0 on an exact tie, so tau_uni = 0 and every mask is off there);
    lambda_t = sum |tau_t| / sum |M_t * tau_uni| over every entry of every merged tensor.
  The two agree on tau_uni and masks except where the sum is exactly 0, and on lambda_t when one tensor is
  merged. "official" was checked numerically against FusionBench's `emr_merge` (fusion-bench 0.2.33 in a
  scratch environment, never a dependency) on 4 tasks x 4 tensors with exact ties, zeros and a [+1, -1, 0, 0]
  cancellation: tau_uni and masks equal, rescalers within 1.1e-7 relative; tests/test_emr.py keeps an
  independent re-derivation of that algorithm (`test_official_variant_matches_reference_rederivation`).

Rescalers are rounded to float32 at build (what is stored is exactly what `stored_bytes` counts); running sums
are float64. Masks are kept bit-packed (`pack_mask`: 8 entries a byte, little bit order, as numpy's
`packbits(bitorder="little")`), so memory while building is the n task vectors of one tensor plus the outputs.

Folder format "twinmerge-emr/1" (`save_emr`, written atomically): `unified.safetensors` (tau_uni, float32,
canonical names), `masks.safetensors` (uint8 packed mask of shape [ceil(numel / 8)] under "<task>/<name>";
the tensor's shape is the unified tensor's), `emr.json` (format, variant, names, keys in order, rescalers,
stored_bytes).
"""
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from twinmerge.progress import progress_bar

from .errors import FactorError, MergeError
from .io import ExpertSet, atomic_dir, save_safetensors_atomic, write_json_atomic

FORMAT = "twinmerge-emr/1"
VARIANTS = ("official", "paper")
UNIFIED_FILE = "unified.safetensors"
MASKS_FILE = "masks.safetensors"
JSON_FILE = "emr.json"

_BITS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 [ceil(numel / 8)]: entry i (row-major) is bit i % 8 (least significant first) of
    byte i // 8; the padding bits of the last byte are 0. Same bytes as numpy.packbits(bitorder="little")."""
    flat = mask.detach().to("cpu", torch.bool).reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.reshape(-1, 8).to(torch.uint8) * _BITS).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `pack_mask`: the bool tensor of `shape` (ValueError if `packed` has the wrong size)."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.ndim != 1 or packed.numel() != (numel + 7) // 8:
        raise ValueError(f"packed mask {packed.dtype} {list(packed.shape)} does not fit shape {list(shape)} "
                         f"(want uint8 [{(numel + 7) // 8}])")
    bits = (packed.reshape(-1, 1) & _BITS) != 0
    return bits.reshape(-1)[:numel].reshape(tuple(shape))


@dataclass
class EMRMerge:
    """A built EMR merge: `unified` {name: tau_uni float32}, `masks` {task: {name: packed uint8 mask}},
    `rescalers` {task: lambda_t}; `names` the tasks in order, `keys` the merged tensor names in order."""
    names: list[str]
    unified: dict[str, torch.Tensor]
    masks: dict[str, dict[str, torch.Tensor]]
    rescalers: dict[str, float]
    variant: str = "official"

    @property
    def keys(self) -> list[str]:
        return list(self.unified)

    def mask(self, task: str, name: str) -> torch.Tensor:
        """M_t for tensor `name` as a bool tensor of the unified tensor's shape."""
        return unpack_mask(self.masks[task][name], self.unified[name].shape)

    def delta(self, task: str, name: str) -> torch.Tensor:
        """lambda_t * M_t * tau_uni for tensor `name` (float32): theta_0 + delta is task t's tensor."""
        uni = self.unified[name]
        return torch.where(self.mask(task, name), uni * self.rescalers[task], torch.zeros((), dtype=uni.dtype))

    def stored_bytes(self) -> int:
        """tau_uni in float32 + one packed mask (ceil(numel / 8) bytes) per task and tensor + 4 per rescaler."""
        numels = [t.numel() for t in self.unified.values()]
        return 4 * sum(numels) + len(self.names) * sum((n + 7) // 8 for n in numels) + 4 * len(self.names)


def _elect(taus: torch.Tensor, variant: str) -> torch.Tensor:
    """gamma per entry for stacked taus [n, *shape] (float32, values +1 / -1, or 0 on a tie for "paper")."""
    total = taus.sum(dim=0)
    if variant == "paper":
        return torch.sign(total)
    return torch.where(total > 0, 1.0, -1.0)


def build_emr(experts: ExpertSet, keys: list[str] | None = None, progress: bool = True,
              variant: str = "official") -> EMRMerge:
    """EMR-merge `keys` (default: every mergeable key) of `experts`, streamed one tensor at a time.

    Per tensor: the n task vectors (float32), gamma, tau_uni, the masks (packed at once) and the rescalers'
    running sums; memory is one tensor's task vectors plus the outputs. Heads are never merged.
    """
    if variant not in VARIANTS:
        raise MergeError(f"EMR variant {variant!r} not one of {', '.join(VARIANTS)}")
    mergeable = experts.mergeable_keys()
    keys = list(mergeable if keys is None else keys)
    allowed = set(mergeable)
    for key in keys:
        if key not in allowed:
            raise MergeError(f"EMR: tensor {key} is not a mergeable tensor of the expert set")
    if len(set(keys)) != len(keys):
        raise MergeError("EMR: duplicate tensor names in keys")
    if not keys:
        raise MergeError("EMR: no tensors to merge")
    names = list(experts.names)

    def task_vectors():
        for key in progress_bar(keys, desc="merge (emr)", unit="tensor", disable=not progress):
            base32 = experts.base_tensor(key).to(torch.float32)
            yield key, torch.stack([experts.expert_tensor(t, key).to(torch.float32) - base32 for t in names])
    return emr_from_task_vectors(names, task_vectors(), variant)


def emr_from_task_vectors(names: Sequence[str], task_vectors: Iterable[tuple[str, torch.Tensor]],
                          variant: str = "official") -> EMRMerge:
    """EMR-merge (name, taus [n, *shape]) pairs, consumed one at a time (taus row t is task names[t])."""
    if variant not in VARIANTS:
        raise MergeError(f"EMR variant {variant!r} not one of {', '.join(VARIANTS)}")
    names = list(names)
    n = len(names)
    num = torch.zeros(n, dtype=torch.float64)
    den = torch.zeros(n, dtype=torch.float64)
    unified: dict[str, torch.Tensor] = {}
    masks: dict[str, dict[str, torch.Tensor]] = {t: {} for t in names}
    for key, taus in task_vectors:
        taus = taus.to(torch.float32)
        if taus.shape[0] != n:
            raise MergeError(f"EMR: tensor {key} has {taus.shape[0]} task vectors for {n} tasks")
        if key in unified:
            raise MergeError(f"EMR: tensor {key} given twice")
        gamma = _elect(taus, variant)
        agree = taus * gamma > 0
        uni = (taus.abs() * agree).amax(dim=0) * gamma + 0.0  # + 0.0 turns -0.0 into 0.0
        unified[key] = uni.contiguous()
        div = 1 if variant == "paper" else max(uni.numel(), 1)
        num += taus.abs().reshape(n, -1).sum(dim=1, dtype=torch.float64) / div
        den += (uni.abs() * agree).reshape(n, -1).sum(dim=1, dtype=torch.float64) / div
        for t, name in enumerate(names):
            masks[name][key] = pack_mask(agree[t])
    if not unified:
        raise MergeError("EMR: no tensors to merge")
    rescalers = {}
    for t, name in enumerate(names):
        lam = float(num[t] / den[t]) if float(den[t]) > 0 else 0.0
        rescalers[name] = float(torch.tensor(lam, dtype=torch.float32))
    return EMRMerge(names, unified, masks, rescalers, variant)


def emr_report(emr: EMRMerge) -> dict[str, Any]:
    """The emr.json record of `emr`."""
    return {"format": FORMAT, "variant": emr.variant, "names": list(emr.names), "keys": emr.keys,
            "rescalers": {t: emr.rescalers[t] for t in emr.names}, "stored_bytes": emr.stored_bytes()}


def save_emr(emr: EMRMerge, folder: str | Path) -> Path:
    """Write `emr` to `folder` atomically (unified.safetensors, masks.safetensors, emr.json; see the module
    docstring). The same merge gives the same bytes."""
    _check(emr, str(folder))
    meta = {"format": FORMAT}
    with atomic_dir(folder) as tmp:
        save_safetensors_atomic({k: v.to(torch.float32) for k, v in emr.unified.items()}, tmp / UNIFIED_FILE, meta)
        save_safetensors_atomic({f"{t}/{k}": emr.masks[t][k] for t in emr.names for k in emr.keys},
                                tmp / MASKS_FILE, meta)
        write_json_atomic(emr_report(emr), tmp / JSON_FILE)
    return Path(folder)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FactorError(f"{path}: EMR file not found")
    try:
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("format") != FORMAT:
                raise FactorError(f"{path}: format {(f.metadata() or {}).get('format')!r}, expected {FORMAT!r}")
            return {k: f.get_tensor(k) for k in f.keys()}
    except FactorError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types on corrupt files
        raise FactorError(f"{path}: cannot read safetensors file ({exc})") from None


def load_emr(folder: str | Path) -> EMRMerge:
    """Read and validate a folder written by `save_emr` (FactorError naming the file and the problem)."""
    folder = Path(folder)
    jpath = folder / JSON_FILE
    if not jpath.is_file():
        raise FactorError(f"{jpath}: EMR file not found")
    try:
        info = json.loads(jpath.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FactorError(f"{jpath}: invalid JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        got = info.get("format") if isinstance(info, dict) else None
        raise FactorError(f"{jpath}: format {got!r}, expected {FORMAT!r}")
    names, keys, rescalers = info.get("names"), info.get("keys"), info.get("rescalers")
    if not (isinstance(names, list) and names and all(isinstance(x, str) for x in names)
            and len(set(names)) == len(names)):
        raise FactorError(f"{jpath}: 'names' must be a non-empty list of distinct task names")
    if not (isinstance(keys, list) and keys and all(isinstance(x, str) for x in keys)):
        raise FactorError(f"{jpath}: 'keys' must be a non-empty list of tensor names")
    if not isinstance(rescalers, dict) or set(rescalers) != set(names) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in rescalers.values()):
        raise FactorError(f"{jpath}: 'rescalers' must map every task to a finite number")
    if info.get("variant") not in VARIANTS:
        raise FactorError(f"{jpath}: variant {info.get('variant')!r} not one of {', '.join(VARIANTS)}")
    unified_all = _read_safetensors(folder / UNIFIED_FILE)
    masks_all = _read_safetensors(folder / MASKS_FILE)
    if set(unified_all) != set(keys):
        raise FactorError(f"{folder / UNIFIED_FILE}: tensors do not match the keys of {JSON_FILE}")
    want = {f"{t}/{k}" for t in names for k in keys}
    if set(masks_all) != want:
        extra = sorted(set(masks_all) - want)[:1] or sorted(want - set(masks_all))[:1]
        raise FactorError(f"{folder / MASKS_FILE}: masks do not match {JSON_FILE} (e.g. {extra[0]})")
    unified = {k: unified_all[k] for k in keys}
    masks = {t: {k: masks_all[f"{t}/{k}"] for k in keys} for t in names}
    emr = EMRMerge(list(names), unified, masks, {t: float(rescalers[t]) for t in names}, info["variant"])
    _check(emr, str(folder))
    return emr


def _check(emr: EMRMerge, where: str) -> None:
    """FactorError unless tau_uni is float32 and every packed mask is uint8 [ceil(numel / 8)]."""
    for k, uni in emr.unified.items():
        if uni.dtype != torch.float32:
            raise FactorError(f"{where}: unified tensor {k} has dtype {uni.dtype}, expected float32")
        size = (uni.numel() + 7) // 8
        for t in emr.names:
            m = emr.masks.get(t, {}).get(k)
            if m is None:
                raise FactorError(f"{where}: no mask for task {t!r}, tensor {k}")
            if m.dtype != torch.uint8 or m.ndim != 1 or m.numel() != size:
                raise FactorError(f"{where}: mask {t}/{k} is {m.dtype} {list(m.shape)}, expected uint8 [{size}]")
