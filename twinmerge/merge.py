"""Merge methods for the shared expert: theta_s = theta_0 + merge(tau_1..tau_n), tau_t = theta_t - theta_0.

Every method maps stacked task vectors `taus: [n, *shape]` (float32) to one merged task vector `[*shape]`.
They are registered in `MERGE_METHODS`; `build_shared_expert` streams a checkpoint tensor by tensor through one.
Methods work per tensor (like mergekit), except TIES' trim: by default (`trim: global`, as the official TIES
code, FusionBench and the official Twin-Merging code) each task vector keeps its top-k% magnitudes over the
WHOLE model, so `build_shared_expert` first finds each task's global magnitude threshold (one pass over the
tensors per task, memory of one task vector) and then merges tensor by tensor; `trim: per_tensor` keeps the
top-k% of each tensor (mergekit's choice). The two give different merges.
"""
import fnmatch
import inspect
import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from twinmerge.progress import progress_bar

from .errors import MergeError
from .exclusive import one_thread
from .io import ExpertSet
from .spectral import iso_c, iso_cts, tsv_m


def weight_average(taus: torch.Tensor) -> torch.Tensor:
    """mean_t tau_t, i.e. theta_s = mean_t theta_t (plain weight averaging)."""
    return taus.mean(dim=0)


def task_arithmetic(taus: torch.Tensor, scaling: float = 0.3) -> torch.Tensor:
    """scaling * sum_t tau_t (Ilharco et al. 2023; the paper uses lambda = 0.29-0.3)."""
    return scaling * taus.sum(dim=0)


def magnitude_thresholds(flat: torch.Tensor, density: float) -> torch.Tensor:
    """Per row of flat [n, d]: the k-th largest |value|, k = ceil(density * d) (at least 1). Returns [n]."""
    d = flat.shape[1]
    k = min(d, max(1, math.ceil(density * d - 1e-9)))
    return flat.abs().kthvalue(d - k + 1, dim=1).values


def ties(taus: torch.Tensor, density: float = 0.2, scaling: float = 1.0, trim: str = "global",
         thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean, times `scaling`.

    1. Trim: in each tau_t keep the entries whose |value| is at least tau_t's threshold, the k-th largest
       magnitude with k = ceil(density * numel) (entries tied with it are kept too, as in the reference code),
       zero the rest. `trim="global"`: numel and the k-th largest are over the whole model: `thresholds` [n]
       (from `global_thresholds`), or computed from `taus` when they are the whole model (thresholds None).
       `trim="per_tensor"`: over this tensor alone.
    2. Elect: gamma = sign(sum_t trimmed_t) per entry (the sign of larger total mass).
    3. Disjoint mean: average the nonzero trimmed values whose sign equals gamma. A vote that sums to exactly
       0 (gamma = 0) gives 0: this happens where every trimmed value is 0 (then the official code's
       replacement of zero signs by the majority sign changes nothing either) or on exact cancellation.
    """
    n = taus.shape[0]
    flat = taus.reshape(n, -1)
    if trim == "per_tensor" or thresholds is None:
        thresholds = magnitude_thresholds(flat, density)
    trimmed = flat * (flat.abs() >= thresholds.reshape(n, 1).to(flat.dtype))
    gamma = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == gamma) & (trimmed != 0)
    total = (trimmed * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    return (scaling * total / count).reshape(taus.shape[1:])


def dare(taus: torch.Tensor, drop_rate: float = 0.9, base_method: str = "task_arithmetic",
         generator: torch.Generator | None = None, **base_options: Any) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop each entry of each tau_t with prob `drop_rate`, rescale survivors by
    1/(1 - drop_rate) (so E[dropped tau] = tau), then merge with `base_method` and its options."""
    return MERGE_METHODS[base_method].fn(dare_drop(taus, drop_rate, generator), **base_options)


def dare_drop(taus: torch.Tensor, drop_rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE's random drop and rescale of the stacked taus [n, *shape] (one uniform draw per entry)."""
    keep = torch.rand(taus.shape, generator=generator, dtype=torch.float32) >= drop_rate
    return taus * keep / (1.0 - drop_rate)


# Arguments of a method function that are not user options.
_NOT_OPTIONS = {"taus", "generator", "thresholds"}


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: `fn(taus [n, *shape], **options) -> [*shape]`, its label and paper.

    Its options and their defaults are read from `fn`'s signature (every keyword argument except `taus`,
    `generator`, `thresholds` and `**base_options`); random methods also take a `seed` option (default 0):
    `merge_tensor` derives a per-tensor generator from it. `checks` maps option names to (predicate, description
    of valid values). `linear_in_scaling`: fn(taus, scaling=s) == s * fn(taus, scaling=1), so a grid over
    `scaling` may merge once and rescale (tested for every registered method).
    """
    fn: Callable[..., torch.Tensor]
    label: str
    reference: str
    checks: dict[str, tuple[Callable[[Any], bool], str]] = field(default_factory=dict)
    random: bool = False
    linear_in_scaling: bool = False
    uses_svd: bool = False  # merge_tensor runs it with one LAPACK thread (bit-identical across thread counts)

    @property
    def defaults(self) -> dict[str, Any]:
        params = inspect.signature(self.fn).parameters.values()
        out = {p.name: p.default for p in params
               if p.name not in _NOT_OPTIONS and p.kind is p.POSITIONAL_OR_KEYWORD}
        return {**out, "seed": 0} if self.random else out


def _number(lo: float, hi: float, lo_open: bool, hi_open: bool) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return ok


_REAL = (_number(-math.inf, math.inf, True, True), "a finite number")
_BASES = ("task_arithmetic", "ties", "weight_average")
TRIMS = ("global", "per_tensor")

MERGE_METHODS: dict[str, MergeMethod] = {
    "weight_average": MergeMethod(weight_average, "Weight averaging",
                                  "Wortsman et al., Model soups, ICML 2022 (arXiv 2203.05482)"),
    "task_arithmetic": MergeMethod(task_arithmetic, "Task Arithmetic",
                                   "Ilharco et al., Editing models with task arithmetic, ICLR 2023 (arXiv 2212.04089)",
                                   {"scaling": _REAL}, linear_in_scaling=True),
    "ties": MergeMethod(ties, "TIES-Merging",
                        "Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv 2306.01708)",
                        {"density": (_number(0, 1, True, False), "in (0, 1]"), "scaling": _REAL,
                         "trim": (lambda v: v in TRIMS, f"one of {', '.join(TRIMS)}")}, linear_in_scaling=True),
    "dare": MergeMethod(dare, "DARE", "Yu et al., Language models are Super Mario, ICML 2024 (arXiv 2311.03099)",
                        {"drop_rate": (_number(0, 1, False, True), "in [0, 1)"),
                         "base_method": (lambda v: v in _BASES, f"one of {', '.join(_BASES)}"),
                         "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                                  "a non-negative integer")},
                        random=True, linear_in_scaling=True),
    "tsv_m": MergeMethod(tsv_m, "TSV-Merge",
                         "Gargiulo et al., Task Singular Vectors, CVPR 2025 (arXiv 2412.00081)",
                         {"scaling": _REAL}, linear_in_scaling=True, uses_svd=True),
    "iso_c": MergeMethod(iso_c, "Iso-C",
                         "Marczak et al., No Task Left Behind: Isotropic Model Merging, ICML 2025 (arXiv 2502.04959)",
                         {"scaling": _REAL}, linear_in_scaling=True, uses_svd=True),
    "iso_cts": MergeMethod(iso_cts, "Iso-CTS",
                           "Marczak et al., No Task Left Behind: Isotropic Model Merging, ICML 2025 (arXiv 2502.04959)",
                           {"scaling": _REAL, "common_fraction": (_number(0, 1, False, False), "in [0, 1]")},
                           linear_in_scaling=True, uses_svd=True),
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


def _tensor_generator(opts: Mapping[str, Any], name: str) -> torch.Generator:
    """Generator of a random method for tensor `name`: seed (seed + crc32(name)) mod 2**63."""
    return torch.Generator().manual_seed((opts["seed"] + zlib.crc32(name.encode())) % 2**63)


def merge_tensor(method: str, options: Mapping[str, Any] | None, taus: torch.Tensor, name: str,
                 thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """Merge the task vectors `taus [n, *shape]` of tensor `name` into one `[*shape]` float32 tensor.

    Random methods get a generator seeded with (seed + crc32(name)) mod 2**63: deterministic per tensor,
    independent of the order tensors are processed in. `thresholds` [n]: TIES' global trim thresholds
    (`global_thresholds`); without them a global trim treats `taus` as the whole model.
    """
    opts = resolve_options(method, options)
    spec = MERGE_METHODS[method]
    taus = taus.to(torch.float32)
    extra = {} if thresholds is None else {"thresholds": thresholds}
    if spec.uses_svd:
        with one_thread():
            return spec.fn(taus, **opts, **extra)
    if spec.random:
        generator = _tensor_generator(opts, name)
        opts.pop("seed")
        return spec.fn(taus, generator=generator, **opts, **extra)
    return spec.fn(taus, **opts, **extra)


def _uses_global_trim(method: str, opts: Mapping[str, Any]) -> bool:
    base = opts.get("base_method") if method == "dare" else method
    return base == "ties" and opts["trim"] == "global"


def global_thresholds(experts: ExpertSet, keys: list[str], method: str, opts: Mapping[str, Any],
                      progress: bool = True) -> torch.Tensor:
    """TIES' global trim thresholds [n]: per task t, the k-th largest |tau_t| over all `keys` together,
    k = ceil(density * total entries), where tau_t is the task vector as the trim sees it (after DARE's drop
    when TIES is DARE's base method: the same per-tensor draws are replayed). One pass per task: memory of one
    task vector (float32), not n."""
    out = []
    for t, name in enumerate(progress_bar(experts.names, desc="TIES global trim", disable=not progress)):
        parts = []
        for key in keys:
            base32 = experts.base_tensor(key).to(torch.float32)
            tau = experts.expert_tensor(name, key).to(torch.float32) - base32
            if method == "dare":  # the same draw as merging the stacked taus: row t of it
                stacked = torch.zeros(len(experts.names), *tau.shape)
                stacked[t] = tau
                tau = dare_drop(stacked, opts["drop_rate"], _tensor_generator(opts, key))[t]
            parts.append(tau.abs().flatten())
        out.append(magnitude_thresholds(torch.cat(parts)[None], opts["density"])[0])
    return torch.stack(out)


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
    merged = [k for k in keys if k in selected]
    thresholds = global_thresholds(experts, merged, method, opts, progress) if _uses_global_trim(method, opts) \
        else None
    state: dict[str, torch.Tensor] = {}
    for key in progress_bar(keys, desc=f"merge ({method})", unit="tensor", disable=not progress):
        base = experts.base_tensor(key)
        if key not in selected:
            state[key] = base
            continue
        base32 = base.to(torch.float32)
        taus = torch.stack([experts.expert_tensor(n, key).to(torch.float32) - base32 for n in experts.names])
        state[key] = (base32 + merge_tensor(method, opts, taus, key, thresholds)).to(base.dtype)
    report = {"method": method, "options": opts, "experts": list(experts.names),
              "merged": merged, "kept": [k for k in keys if k not in selected],
              "heads": experts.head_keys()}
    return state, report
