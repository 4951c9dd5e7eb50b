"""Merge methods for the shared expert: theta_s = theta_0 + merge(tau_1..tau_n), tau_t = theta_t - theta_0.

Every method maps stacked task vectors `taus: [n, *shape]` (float32) to one merged task vector `[*shape]`.
They are registered in `MERGE_METHODS`; `build_shared_expert` streams a checkpoint tensor by tensor through one.
Methods work per tensor (like mergekit), so TIES trims the top-k% of each tensor, not of the whole model.
"""
import fnmatch
import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from twinmerge.progress import progress_bar

from .errors import MergeError
from .io import ExpertSet


def weight_average(taus: torch.Tensor) -> torch.Tensor:
    """mean_t tau_t, i.e. theta_s = mean_t theta_t (plain weight averaging)."""
    return taus.mean(dim=0)


def task_arithmetic(taus: torch.Tensor, scaling: float = 0.3) -> torch.Tensor:
    """scaling * sum_t tau_t (Ilharco et al. 2023; the paper uses lambda = 0.29-0.3)."""
    return scaling * taus.sum(dim=0)


def ties(taus: torch.Tensor, density: float = 0.2, scaling: float = 1.0) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean, times `scaling`.

    1. Trim: in each tau_t keep the k = ceil(density * numel) entries of largest |value| (entries tied with the
       k-th largest magnitude are kept too, as in the reference code), zero the rest.
    2. Elect: gamma = sign(sum_t trimmed_t) per entry (the sign of larger total mass).
    3. Disjoint mean: average the nonzero trimmed values whose sign equals gamma; entries with no agreeing
       expert (gamma = 0 included) become 0.
    """
    n = taus.shape[0]
    flat = taus.reshape(n, -1)
    d = flat.shape[1]
    k = min(d, max(1, math.ceil(density * d - 1e-9)))
    mags = flat.abs()
    kth = mags.kthvalue(d - k + 1, dim=1, keepdim=True).values
    trimmed = flat * (mags >= kth)
    gamma = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == gamma) & (trimmed != 0)
    total = (trimmed * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    return (scaling * total / count).reshape(taus.shape[1:])


def dare(taus: torch.Tensor, drop_rate: float = 0.9, base_method: str = "task_arithmetic",
         generator: torch.Generator | None = None, **base_options: Any) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop each entry of each tau_t with prob `drop_rate`, rescale survivors by
    1/(1 - drop_rate) (so E[dropped tau] = tau), then merge with `base_method` and its options."""
    keep = torch.rand(taus.shape, generator=generator, dtype=torch.float32) >= drop_rate
    dropped = taus * keep / (1.0 - drop_rate)
    return MERGE_METHODS[base_method].fn(dropped, **base_options)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: `fn(taus [n, *shape], **options) -> [*shape]`.

    `checks` maps each option name to (predicate, description of valid values). Random methods take a
    `generator` argument and a `seed` option; `merge_tensor` derives a per-tensor generator from them.
    """
    fn: Callable[..., torch.Tensor]
    defaults: dict[str, Any]
    checks: dict[str, tuple[Callable[[Any], bool], str]] = field(default_factory=dict)
    random: bool = False


def _number(lo: float, hi: float, lo_open: bool, hi_open: bool) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return ok


_REAL = (_number(-math.inf, math.inf, True, True), "a finite number")
_BASES = ("task_arithmetic", "ties", "weight_average")

MERGE_METHODS: dict[str, MergeMethod] = {
    "weight_average": MergeMethod(weight_average, {}),
    "task_arithmetic": MergeMethod(task_arithmetic, {"scaling": 0.3}, {"scaling": _REAL}),
    "ties": MergeMethod(ties, {"density": 0.2, "scaling": 1.0},
                        {"density": (_number(0, 1, True, False), "in (0, 1]"), "scaling": _REAL}),
    "dare": MergeMethod(dare, {"drop_rate": 0.9, "base_method": "task_arithmetic", "seed": 0},
                        {"drop_rate": (_number(0, 1, False, True), "in [0, 1)"),
                         "base_method": (lambda v: v in _BASES, f"one of {', '.join(_BASES)}"),
                         "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                                  "a non-negative integer")},
                        random=True),
}


def resolve_options(method: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate `options` for `method` and return them completed with defaults (MergeError if invalid).

    For `dare`, options other than its own are passed to (and validated against) its `base_method`.
    """
    if method not in MERGE_METHODS:
        raise MergeError(f"unknown merge method {method!r}; known: {', '.join(MERGE_METHODS)}")
    spec = MERGE_METHODS[method]
    options = dict(options or {})
    out = {**spec.defaults, **{k: v for k, v in options.items() if k in spec.defaults}}
    for name, (ok, valid) in spec.checks.items():
        if not ok(out[name]):
            raise MergeError(f"merge method {method!r}: option {name}={out[name]!r} must be {valid}")
    rest = {k: v for k, v in options.items() if k not in spec.defaults}
    if method == "dare":
        try:
            out.update(resolve_options(out["base_method"], rest))
        except MergeError as exc:
            raise MergeError(f"merge method 'dare' (base {out['base_method']!r}): {exc}") from None
    elif rest:
        known = ", ".join(spec.defaults) or "none"
        raise MergeError(f"merge method {method!r}: unknown option(s) {', '.join(rest)}; known: {known}")
    return out


def merge_tensor(method: str, options: Mapping[str, Any] | None, taus: torch.Tensor, name: str) -> torch.Tensor:
    """Merge the task vectors `taus [n, *shape]` of tensor `name` into one `[*shape]` float32 tensor.

    Random methods get a generator seeded with (seed + crc32(name)) mod 2**63: deterministic per tensor,
    independent of the order tensors are processed in.
    """
    opts = resolve_options(method, options)
    spec = MERGE_METHODS[method]
    taus = taus.to(torch.float32)
    if spec.random:
        seed = (opts.pop("seed") + zlib.crc32(name.encode())) % 2**63
        return spec.fn(taus, generator=torch.Generator().manual_seed(seed), **opts)
    return spec.fn(taus, **opts)


def build_shared_expert(experts: ExpertSet, method: str, options: Mapping[str, Any] | None = None,
                        include: Iterable[str] = ("*",), exclude: Iterable[str] = (),
                        progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """theta_s for every mergeable tensor, streamed one tensor at a time (base + n expert values in memory).

    Selected keys (fnmatch on canonical names: matching an `include` and no `exclude` pattern) get
    theta_0 + merge(theta_t - theta_0) computed in float32 and cast back to the base dtype; the others keep
    theta_0. Head tensors are not part of the shared state dict (each expert keeps its own).
    Returns (state dict with canonical names, report {method, options, merged, kept, heads}).
    """
    opts = resolve_options(method, options)
    include, exclude = list(include), list(exclude)
    selected = set(experts.select(include, exclude))
    keys = experts.mergeable_keys()
    for pattern in include + exclude:
        if not any(fnmatch.fnmatchcase(k, pattern) for k in keys):
            raise MergeError(f"pattern {pattern!r} matches no mergeable tensor")
    state: dict[str, torch.Tensor] = {}
    for key in progress_bar(keys, desc=f"merge ({method})", unit="tensor", disable=not progress):
        base = experts.base_tensor(key)
        if key not in selected:
            state[key] = base
            continue
        base32 = base.to(torch.float32)
        taus = torch.stack([experts.expert_tensor(n, key).to(torch.float32) - base32 for n in experts.names])
        state[key] = (base32 + merge_tensor(method, opts, taus, key)).to(base.dtype)
    report = {"method": method, "options": opts, "experts": list(experts.names),
              "merged": [k for k in keys if k in selected], "kept": [k for k in keys if k not in selected],
              "heads": experts.head_keys()}
    return state, report
