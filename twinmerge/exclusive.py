"""Exclusive knowledge v_t = theta_t - theta_s, compressed to truncated-SVD factors (docs/DESIGN.md format).

For a 2-D v_t [m, n] with thin SVD U S V^T, the rank-r truncation U_r S_r V_r^T is the best rank-r
approximation in Frobenius norm (Eckart-Young): ||v_t - U_r S_r V_r^T||_F^2 = sum_{i > r} s_i^2.
Factors cost r * ((m + n) * itemsize + 4) bytes (U, V in the factor dtype, S in float32); a 2-D tensor is
stored dense (in the factor dtype) when r * (m + n + 1) >= m * n, i.e. when factors would not be smaller.
Non-2-D tensors (LayerNorm, biases) are stored dense in float32; heads are stored as values, float32.

`FactorStream` produces a file's tensors one at a time (plan pass, then SVD pass) and `write_factors` writes
them as they come, so compressing an expert holds one tensor, never a model; `compress_expert` collects them.

Quantised factors (`factor_bits` 8 or 4; 16, the default, = unquantised, the file exactly as before): U and V of
every low-rank tensor are stored as `twinmerge.quant` codes + float16 scales (groups of `group_size` rows of each
column), under `lowrank.<name>.U` / `.V` with `lowrank.<name>.U_scales` / `.V_scales`; S stays float32 [r]
(r * 4 bytes; kept separate rather than folded into U: per-column scales absorb it either way, so folding would
change no code, and S stays the true singular values). Dense, head and S tensors are stored as unquantised.
The metadata then also holds `factor_bits` and `group_size`. Rank and fraction modes keep their ranks at any
bits (smaller files); byte budgets count the bits' bytes (`factor_bytes`), so a budget buys more rank at fewer bits.
`load_factors` dequantises on load (float32 U, V): the saving is on disk and in transfer, not in RAM.
"""
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from twinmerge.progress import progress_bar

from . import quant
from .errors import FactorError
from .io import SAFETENSORS_DTYPES, ExpertSet, SafetensorsWriter, TensorSpec, save_safetensors_atomic

FORMAT = "twinmerge-exclusive/1"
FACTOR_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
RANK_MODES = ("rank", "fraction", "energy", "budget_bytes", "budget_fraction")
UNQUANTISED = 16  # factor_bits of plain factors in the factor dtype
SCALES = ("U_scales", "V_scales")


@dataclass(frozen=True)
class RankSpec:
    """How many singular triplets to keep.

    - "rank": r = min(value, min(m, n)) (value an integer >= 1);
    - "fraction": r = max(1, floor(value * min(m, n))), value in (0, 1] (the paper: 0.1 -> 76 of 768);
    - "energy": smallest r with sum_{i<=r} s_i^2 >= value * sum_i s_i^2, value in (0, 1];
    - "budget_bytes": ranks of all 2-D tensors of one expert chosen jointly so that their stored bytes
      (factors, or dense where smaller) total at most `value` bytes (see `allocate_budget`);
    - "budget_fraction": as "budget_bytes" with budget = value * dense bytes of the expert's nonzero 2-D
      exclusive tensors in the factor dtype, value in (0, 1].
    """
    mode: str
    value: float

    def __post_init__(self) -> None:
        v = self.value
        if self.mode not in RANK_MODES:
            raise FactorError(f"rank spec: unknown mode {self.mode!r}; known: {', '.join(RANK_MODES)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise FactorError(f"rank spec {self.mode}: value {v!r} is not a finite number")
        if self.mode in ("rank", "budget_bytes") and (not float(v).is_integer() or v < 1):
            raise FactorError(f"rank spec {self.mode}: value {v!r} must be an integer >= 1")
        if self.mode in ("fraction", "energy", "budget_fraction") and not 0 < v <= 1:
            raise FactorError(f"rank spec {self.mode}: value {v!r} must be in (0, 1]")

    @property
    def is_budget(self) -> bool:
        return self.mode.startswith("budget_")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "value": self.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RankSpec":
        return cls(d["mode"], d["value"])

    @property
    def needs_spectrum(self) -> bool:
        """Whether ranks depend on singular values (energy, budgets) rather than on shapes alone."""
        return self.mode not in ("rank", "fraction")

    def rank_for(self, s: torch.Tensor) -> int:
        """Rank for one matrix with singular values `s` (descending, length min(m, n)); not for budgets."""
        if self.mode == "energy":
            e = s.to(torch.float64) ** 2
            total = float(e.sum())
            if total == 0.0:
                return 0
            reached = torch.nonzero(torch.cumsum(e, 0) >= self.value * total * (1 - 1e-12))
            return int(reached[0]) + 1 if reached.numel() else s.numel()
        return self.rank_for_size(s.numel())

    def rank_for_size(self, k: int) -> int:
        """Rank for one matrix with min(m, n) = k, in the modes that need no singular values (rank, fraction)."""
        if self.mode == "rank":
            return min(int(self.value), k)
        if self.mode == "fraction":
            return max(1, min(k, math.floor(self.value * k + 1e-9)))
        source = "allocate_budget" if self.is_budget else "rank_for"
        raise FactorError(f"rank spec {self.mode}: ranks come from {source}, not rank_for_size")


def bytes_per_rank(m: int, n: int, itemsize: int, factor_bits: int = UNQUANTISED, group_size: int = 64) -> float:
    """Bytes one singular triplet costs: a column of U [m] and of V [n] in the factor dtype, one float32 s.
    Quantised (factor_bits 2..8): per column k * bits / 8 bytes of codes + ceil(k / group_size) float16 scales
    (the average: packed codes of an odd rank round up, see `factor_bytes`)."""
    if factor_bits == UNQUANTISED:
        return (m + n) * itemsize + 4
    column = lambda k: k * factor_bits / 8 + math.ceil(k / group_size) * quant.SCALE_DTYPE.itemsize  # noqa: E731
    return column(m) + column(n) + 4


def factor_bytes(m: int, n: int, r: int, itemsize: int, factor_bits: int = UNQUANTISED,
                 group_size: int = 64) -> int:
    """Exact stored bytes of rank-r factors of an [m, n] matrix: U and V (factor dtype, or codes + scales,
    `twinmerge.quant.stored_bytes`) and S (float32)."""
    if factor_bits == UNQUANTISED or r == 0:
        return r * ((m + n) * itemsize + 4)
    return (quant.stored_bytes((m, r), factor_bits, group_size) + quant.stored_bytes((n, r), factor_bits, group_size)
            + 4 * r)


def allocate_budget(spectra: Mapping[str, tuple[torch.Tensor, int, int]], budget: int, itemsize: int,
                    factor_bits: int = UNQUANTISED, group_size: int = 64) -> dict[str, int]:
    """Ranks {name: r} for matrices {name: (s, m, n)} maximising the kept energy sum_i sum_{j<=r_i} s_ij^2
    subject to sum_i factor_bytes(m_i, n_i, r_i) <= budget (quantised factors: the bits' bytes, so a budget buys
    more rank at fewer bits).

    Greedy by gain per byte s_ij^2 / bytes_per_rank_i. Within a matrix the ratios are non-increasing, so the
    greedy order always extends a prefix (a valid rank). Each step is charged its exact marginal bytes (packed
    int4 codes cost a byte column every second rank), so the budget holds exactly. Unquantised, this is the
    exact optimum of the fractional relaxation; the integer solution loses at most the gain of one triplet per
    matrix that hit the budget edge (equal to the optimum when all matrices have the same bytes per rank).
    """
    ranks = {name: 0 for name in spectra}
    items = []
    for name, (s, m, n) in spectra.items():
        cost = bytes_per_rank(m, n, itemsize, factor_bits, group_size)
        items += [(float(sj) ** 2 / cost, name, j) for j, sj in enumerate(s.tolist()) if sj > 0]
    items.sort(key=lambda it: -it[0])
    used = 0
    for _, name, j in items:
        _, m, n = spectra[name]
        step = factor_bytes(m, n, j + 1, itemsize, factor_bits, group_size) - factor_bytes(
            m, n, j, itemsize, factor_bits, group_size)
        if ranks[name] == j and used + step <= budget:
            ranks[name] += 1
            used += step
    return ranks


@contextmanager
def one_thread() -> Iterator[None]:
    """Run LAPACK single-threaded: MKL's SVD gives bit-different singular vectors for different thread counts
    (and under load, when MKL adapts its threads), which would make factor files differ run to run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _svd_with_fallback(fn: Callable[[torch.Tensor], Any], matrix: torch.Tensor) -> Any:
    with one_thread():
        return _svd_float32_then_64(fn, matrix)


def _svd_float32_then_64(fn: Callable[[torch.Tensor], Any], matrix: torch.Tensor) -> Any:
    a = matrix.detach().to(torch.float32)
    try:
        out = fn(a)
        parts = out if isinstance(out, tuple) else (out,)
        if all(bool(torch.isfinite(p.sum())) for p in parts):  # a finite sum proves every entry finite
            return out
    except torch.linalg.LinAlgError:
        pass
    return fn(a.cpu().to(torch.float64))


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of `matrix [m, n]`: U [m, k], S [k] (descending), V [n, k], k = min(m, n), all float32,
    with matrix = U diag(S) V^T.

    `torch.linalg.svd(full_matrices=False)` in float32, retried in float64 on CPU when it fails to converge
    or returns non-finite values; single-threaded, so the same input gives the same bytes on every run. Never full_matrices=True (a 50265 x 50265 U for RoBERTa's embedding). The
    randomized `torch.svd_lowrank` is not used: it is approximate, which would break the exact
    energy/budget accounting, and thin SVD of the models here (min(m, n) <= 1024) takes seconds.
    """
    U, S, Vh = _svd_with_fallback(lambda a: tuple(torch.linalg.svd(a, full_matrices=False)), matrix)
    return U.to(torch.float32), S.to(torch.float32), Vh.mT.to(torch.float32)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values [min(m, n)] of `matrix` (float32, descending), with thin_svd's float64 fallback."""
    return _svd_with_fallback(torch.linalg.svdvals, matrix).to(torch.float32)


def factor_metadata(expert_name: str, config: Mapping, rank_spec: RankSpec, factor_dtype: str,
                    factor_bits: int = UNQUANTISED, group_size: int = 64) -> dict[str, str]:
    """safetensors metadata of a factor file (all values strings, as safetensors requires). Quantised factors
    (factor_bits != 16) add `factor_bits` and `group_size`; unquantised files have neither (as before)."""
    meta = {"format": FORMAT, "expert": expert_name, "factor_dtype": factor_dtype,
            "rank_spec": json.dumps(rank_spec.to_dict()), "config": json.dumps(dict(config))}
    if factor_bits != UNQUANTISED:
        _check_quant(factor_bits, group_size)
        meta.update(factor_bits=str(factor_bits), group_size=str(group_size))
    return meta


def _check_quant(factor_bits: int, group_size: int) -> None:
    """FactorError unless factor_bits is 16 (unquantised) or an integer in 2..8 (`twinmerge.quant`) and
    group_size an integer >= 1."""
    if isinstance(factor_bits, bool) or not isinstance(factor_bits, int) or not (
            factor_bits == UNQUANTISED or 2 <= factor_bits <= 8):
        raise FactorError(f"factor bits {factor_bits!r} not 16 (unquantised) or an integer in 2..8")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise FactorError(f"factor group size {group_size!r} not an integer >= 1")


def compress_expert(experts: ExpertSet, shared: Mapping[str, torch.Tensor], expert_name: str,
                    rank_spec: RankSpec, factor_dtype: str = "float16", progress: bool = True,
                    factor_bits: int = UNQUANTISED, group_size: int = 64
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Factor-file tensors and stats for expert `expert_name`, given theta_s as `shared` (canonical names), in
    memory: `FactorStream` collected into a dict (to write a file without holding it, see `write_factors`).

    v_t = theta_t - theta_s (float32) for every mergeable key; exactly-zero v_t are skipped (absent = 0).
    stats = {expert, factor_dtype, rank_spec, tensors: {name: {shape, kind, rank, energy_kept, bytes,
    dense_bytes, rel_error}}, totals}: kind is lowrank | dense | dropped (rank 0) | zero, `bytes` the bytes
    stored, `dense_bytes` the float32 size of v_t, rel_error = ||v_t - stored||_F / ||v_t||_F (measured on the
    stored, dtype-rounded factors). totals (over nonzero v_t): exclusive_bytes (stored, heads excluded),
    lowrank_bytes (2-D tensors only: what budgets bound), head_bytes, dense_bytes_float32,
    dense_bytes_factor_dtype, dense_2d_bytes_factor_dtype, ratio = exclusive_bytes / dense_bytes_float32,
    rel_error_2d (over all 2-D tensors together).
    Quantised (factor_bits 2..8): `bytes` counts codes + scales + S, rel_error is measured on the dequantised
    factors, and stats also hold factor_bits and group_size.
    """
    stream = FactorStream(experts, shared, expert_name, rank_spec, factor_dtype, progress, factor_bits, group_size)
    tensors = dict(stream)
    return tensors, stream.stats


class FactorStream:
    """The factor-file tensors of one expert (format and stats: `compress_expert`), produced one at a time.

    Two passes over the mergeable tensors, each holding one tensor's v_t = theta_t - theta_s at a time (`shared`
    may be a lazy `twinmerge.shared.SharedModel`):
      1. plan, at construction: which v_t are zero, and each 2-D v_t's rank and storage (factors, dense in the
         factor dtype, or dropped), from its shape (modes rank, fraction) or its singular values (energy; the
         budget modes, which allocate over every matrix's spectrum: min(m, n) floats per matrix are kept).
         `specs` [(name, shape, dtype)] then lists the file's tensors, as a streaming writer needs up front.
      2. iteration: yields (file tensor name, tensor) in plan order, a matrix's thin SVD computed in its turn;
         `stats` is set when the iteration ends.
    Peak memory: about 3x the largest tensor (v_t, LAPACK's copy of it and U during its SVD), in every mode.
    Energy ranks come from the singular values of pass 1 (`singular_values`, as the budget modes' spectra).
    """

    def __init__(self, experts: ExpertSet, shared: Mapping[str, torch.Tensor], expert_name: str,
                 rank_spec: RankSpec, factor_dtype: str = "float16", progress: bool = True,
                 factor_bits: int = UNQUANTISED, group_size: int = 64):
        if expert_name not in experts.experts:
            raise FactorError(f"unknown expert {expert_name!r}; known: {', '.join(experts.names)}")
        if factor_dtype not in FACTOR_DTYPES:
            raise FactorError(f"factor dtype {factor_dtype!r} not one of {', '.join(FACTOR_DTYPES)}")
        _check_quant(factor_bits, group_size)
        self.factor_bits, self.group_size = factor_bits, group_size
        self.quantised = factor_bits != UNQUANTISED
        self.experts, self.shared, self.name, self.rank_spec = experts, shared, expert_name, rank_spec
        self.factor_dtype, self.fdt = factor_dtype, FACTOR_DTYPES[factor_dtype]
        self.itemsize = self.fdt.itemsize
        self.progress = progress
        self.plan = self._plan()
        self.specs = self._specs()
        self.stats: dict[str, Any] | None = None

    def _delta(self, key: str) -> torch.Tensor:
        """v_t (float32) of `key`, subtracted in place: at most two tensors of its size in memory, not three."""
        if key not in self.shared:
            raise FactorError(f"shared state dict has no tensor {key}")
        v = self.experts.expert_tensor(self.name, key).to(torch.float32, copy=True)
        shared = self.shared[key]
        if shared.shape != v.shape:
            raise FactorError(f"shared tensor {key} has shape {list(shared.shape)}, expert {self.name!r} has "
                              f"{list(v.shape)}")
        return v.sub_(shared.to(torch.float32))

    def _plan(self) -> dict[str, tuple[str, int | None]]:
        """{key: (kind, rank)} in key order: kind zero | dense | lowrank | dropped; rank None for non-2-D."""
        keys = self.experts.mergeable_keys()
        plan, spectra = {}, {}
        for key in progress_bar(keys, desc=f"plan ({self.name})", unit="tensor", disable=not self.progress):
            v = self._delta(key)
            if not bool(v.any()):
                plan[key] = ("zero", 0)
            elif v.ndim != 2:
                plan[key] = ("dense", None)
            elif not self.rank_spec.needs_spectrum:
                plan[key] = self._storage(*v.shape, self.rank_spec.rank_for_size(min(v.shape)))
            elif self.rank_spec.is_budget:
                spectra[key] = (singular_values(v), *v.shape)
            else:
                plan[key] = self._storage(*v.shape, self.rank_spec.rank_for(singular_values(v)))
        if self.rank_spec.is_budget:
            budget = int(self.rank_spec.value) if self.rank_spec.mode == "budget_bytes" else math.floor(
                self.rank_spec.value * sum(m * n * self.itemsize for _, m, n in spectra.values()))
            for key, r in allocate_budget(spectra, budget, self.itemsize, self.factor_bits,
                                          self.group_size).items():
                plan[key] = self._storage(*spectra[key][1:], r)
        return {key: plan[key] for key in keys}

    def _storage(self, m: int, n: int, r: int) -> tuple[str, int]:
        """How a nonzero [m, n] v_t of rank budget r is stored: dense (in the factor dtype) when factors would not
        be smaller, r (m + n + 1) >= m n elements; quantised, when `factor_bytes` >= m n * itemsize or r is full
        (r = min(m, n): not low rank, and dense is exact where codes are not)."""
        dense = r * (m + n + 1) >= m * n if not self.quantised else (
            r >= min(m, n) or factor_bytes(m, n, r, self.itemsize, self.factor_bits, self.group_size)
            >= m * n * self.itemsize)
        if dense:
            return "dense", min(m, n)
        return ("dropped", 0) if r == 0 else ("lowrank", r)

    def _specs(self) -> list[TensorSpec]:
        """The factor file's tensors, from the plan: dense, lowrank U/S/V, then the heads."""
        out = []
        ckpt = self.experts.experts[self.name]
        for key, (kind, r) in self.plan.items():
            shape = ckpt.shape(key)
            if kind == "dense":
                out.append((f"dense.{key}", shape, torch.float32 if r is None else self.fdt))
            elif kind == "lowrank" and self.quantised:
                out += [spec for name, rows in (("U", shape[0]), ("S", None), ("V", shape[1]))
                        for spec in self._quant_specs(f"lowrank.{key}.{name}", rows, r)]
            elif kind == "lowrank":
                out += [(f"lowrank.{key}.U", (shape[0], r), self.fdt), (f"lowrank.{key}.S", (r,), torch.float32),
                        (f"lowrank.{key}.V", (shape[1], r), self.fdt)]
        return out + [(f"head.{key}", ckpt.shape(key), torch.float32) for key in self.experts.head_keys()]

    def _quant_specs(self, name: str, rows: int | None, r: int) -> list[TensorSpec]:
        """Specs of a quantised factor `name` [rows, r] (codes, then `<name>_scales`), or of S [r] (rows None)."""
        if rows is None:
            return [(name, (r,), torch.float32)]
        shape, dtype = quant.packed_spec((rows, r), self.factor_bits)
        return [(name, shape, dtype), (f"{name}_scales", quant.scales_shape((rows, r), self.group_size),
                                        quant.SCALE_DTYPE)]

    def _names(self, key: str, kind: str) -> list[str]:
        """File names of what `_stored` returns for a nonzero 2-D v_t of this kind."""
        if kind == "dense":
            return [f"dense.{key}"]
        if kind != "lowrank":
            return []
        parts = ["U", "U_scales", "S", "V", "V_scales"] if self.quantised else ["U", "S", "V"]
        return [f"lowrank.{key}.{p}" for p in parts]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        per: dict[str, dict[str, Any]] = {}
        err2 = norm2 = 0.0
        for key in progress_bar(self.plan, desc=f"compress ({self.name})", unit="tensor", disable=not self.progress):
            kind, r = self.plan[key]
            v = self._delta(key)
            row = per[key] = {"shape": list(v.shape), "dense_bytes": v.numel() * 4}
            if kind == "zero":
                row.update(kind="zero", rank=0, energy_kept=1.0, bytes=0, rel_error=0.0)
                continue
            if r is None:
                yield f"dense.{key}", v
                row.update(kind="dense", rank=None, energy_kept=1.0, bytes=v.numel() * 4, rel_error=0.0)
                continue
            stored, kept, approx = self._stored(v, kind, r)
            yield from zip(self._names(key, kind), stored)
            e2, n2 = _squared_error(kind, approx, v), float(torch.linalg.norm(v)) ** 2
            err2, norm2 = err2 + e2, norm2 + n2
            row.update(kind=kind, rank=r, energy_kept=kept, bytes=sum(t.numel() * t.element_size() for t in stored),
                       rel_error=math.sqrt(e2 / n2))
        for key in self.experts.head_keys():
            yield f"head.{key}", self.experts.expert_tensor(self.name, key).to(torch.float32)
        self.stats = self._stats(per, err2, norm2)

    def _stored(self, v: torch.Tensor, kind: str, r: int) -> tuple[list[torch.Tensor], float, list[torch.Tensor]]:
        """What is stored of a nonzero 2-D v_t ([v] dense, [U_r, S_r, V_r], quantised [U codes, U scales, S_r,
        V codes, V scales], or [] dropped), the energy it keeps and what a reader gets back ([v'] or [U', S, V']);
        the SVD's full U is freed on return, before the caller measures the error."""
        if kind == "dense":
            stored = [v.to(self.fdt)]
            return stored, 1.0, stored
        if kind == "dropped":
            return [], 0.0, []
        U, S, V = thin_svd(v)
        energy = S.to(torch.float64) ** 2
        kept = float(energy[:r].sum() / energy.sum())
        if not self.quantised:
            stored = [U[:, :r].to(self.fdt).contiguous(), S[:r].contiguous(), V[:, :r].to(self.fdt).contiguous()]
            return stored, kept, stored
        bits, g = self.factor_bits, self.group_size
        (uq, us), (vq, vs) = quant.quantize(U[:, :r], bits, g), quant.quantize(V[:, :r], bits, g)
        S = S[:r].contiguous()
        approx = [quant.dequantize(uq, us, (U.shape[0], r), bits, g), S,
                  quant.dequantize(vq, vs, (V.shape[0], r), bits, g)]
        return [uq, us, S, vq, vs], kept, approx

    def _stats(self, per: dict[str, dict[str, Any]], err2: float, norm2: float) -> dict[str, Any]:
        live = [r for r in per.values() if r["kind"] != "zero"]
        two_d = [r for r in live if len(r["shape"]) == 2]
        stored_bytes = sum(r["bytes"] for r in live)
        dense32 = sum(r["dense_bytes"] for r in live)
        totals = {"tensors": len(live), "exclusive_bytes": stored_bytes,
                  "lowrank_bytes": sum(r["bytes"] for r in two_d),
                  "head_bytes": sum(math.prod(shape) * 4 for name, shape, _ in self.specs if name.startswith("head.")),
                  "dense_bytes_float32": dense32, "dense_bytes_factor_dtype": dense32 // 4 * self.itemsize,
                  "dense_2d_bytes_factor_dtype": sum(r["dense_bytes"] for r in two_d) // 4 * self.itemsize,
                  "ratio": stored_bytes / dense32 if dense32 else 0.0,
                  "rel_error_2d": math.sqrt(err2 / norm2) if norm2 else 0.0}
        out = {"expert": self.name, "factor_dtype": self.factor_dtype, "rank_spec": self.rank_spec.to_dict(),
               "tensors": per, "totals": totals}
        if self.quantised:
            out.update(factor_bits=self.factor_bits, group_size=self.group_size)
        return out


def _squared_error(kind: str, stored: list[torch.Tensor], v: torch.Tensor) -> float:
    """||v_t - what `stored` gives back||_F^2 for a 2-D v_t of this `kind` (the stored tensors dtype-rounded,
    or dequantised: `stored` is what a reader gets, [U, S, V] or [dense]).
    The low-rank product becomes the difference in place (approx - v_t = -(v_t - approx) exactly, same norm), so
    one more matrix of v_t's size is in memory, not two."""
    if kind == "lowrank":
        U, S, V = stored
        diff = ((U.to(torch.float32) * S) @ V.to(torch.float32).T).sub_(v)
    else:
        diff = v - stored[0].to(torch.float32) if kind == "dense" else v
    return float(torch.linalg.norm(diff)) ** 2


@dataclass
class ExclusiveFactors:
    """A parsed factor file: v_t = U diag(S) V^T for `lowrank` names, the stored tensor for `dense` names."""
    expert: str
    config: dict
    lowrank: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    dense: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def names(self) -> list[str]:
        """Canonical names with nonzero exclusive knowledge."""
        return list(self.lowrank) + list(self.dense)

    def delta(self, name: str) -> torch.Tensor | None:
        """v_t for `name` as float32 ([m, n] from factors), or None when the file has none (v_t = 0)."""
        if name in self.lowrank:
            U, S, V = self.lowrank[name]
            return (U.to(torch.float32) * S.to(torch.float32)) @ V.to(torch.float32).T
        if name in self.dense:
            return self.dense[name].to(torch.float32)
        return None

    def check_shapes(self, shapes: Mapping[str, Sequence[int]], source: str = "shared model") -> None:
        """FactorError unless every exclusive name exists in `shapes` (e.g. the shared model) with its shape."""
        for name in self.names():
            shape = (self.lowrank[name][0].shape[0], self.lowrank[name][2].shape[0]) if name in self.lowrank \
                else tuple(self.dense[name].shape)
            if name not in shapes:
                raise FactorError(f"expert {self.expert!r}: tensor {name} not in {source}")
            if tuple(shapes[name]) != tuple(shape):
                raise FactorError(f"expert {self.expert!r}: tensor {name} has shape {list(shape)}, "
                                  f"{source} has {list(shapes[name])}")


def _quant_metadata(metadata: Mapping[str, str], where: str) -> tuple[int, int] | None:
    """(factor_bits, group_size) of a quantised file's metadata, None for an unquantised one."""
    if "factor_bits" not in metadata:
        if "group_size" in metadata:
            raise FactorError(f"{where}: metadata has group_size but no factor_bits")
        return None
    if "group_size" not in metadata:
        raise FactorError(f"{where}: metadata has factor_bits but no group_size")
    bits, size = metadata["factor_bits"], metadata["group_size"]
    if not bits.isdigit() or not 2 <= int(bits) <= 8:
        raise FactorError(f"{where}: metadata factor_bits {bits!r} is not an integer in 2..8")
    if not size.isdigit() or int(size) < 1:
        raise FactorError(f"{where}: metadata group_size {size!r} is not an integer >= 1")
    return int(bits), int(size)


def _dequantized(name: str, p: dict[str, torch.Tensor], q: tuple[int, int], where: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, V) float32 of a quantised low-rank tensor's parts {U, U_scales, S, V, V_scales}."""
    S = p["S"]
    if S.ndim != 1:
        raise FactorError(f"{where}: tensor {name} has S of shape {list(S.shape)} (want [r])")
    out = []
    for part in "UV":
        codes = p[part]
        if codes.ndim != 2:
            raise FactorError(f"{where}: tensor {name}.{part} has shape {list(codes.shape)}, expected 2-D codes")
        try:
            out.append(quant.dequantize(codes, p[f"{part}_scales"], (codes.shape[0], S.shape[0]), *q))
        except FactorError as exc:
            raise FactorError(f"{where}: tensor {name}.{part}: {exc}") from None
    return out[0], S, out[1]


def parse_factors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
                  where: str) -> ExclusiveFactors:
    """Check a factor file's tensors and metadata (FactorError naming `where` and the tensor).

    A quantised file (metadata `factor_bits`, `group_size`) is dequantised here: U and V come back float32
    (meta tensors stay meta), so an ExclusiveFactors looks the same whatever the file's bits. That is a
    dequantised cache: in RAM the factors take 4 bytes an element, what float32 factors take (twice a float16
    file's); quantisation saves disk and transfer only."""
    metadata = dict(metadata or {})
    if metadata.get("format") != FORMAT:
        raise FactorError(f"{where}: format {metadata.get('format')!r}, expected {FORMAT!r}")
    for field in ("expert", "config", "factor_dtype", "rank_spec"):
        if field not in metadata:
            raise FactorError(f"{where}: metadata lacks {field!r}")
    try:
        config = json.loads(metadata["config"])
        json.loads(metadata["rank_spec"])
    except ValueError as exc:
        raise FactorError(f"{where}: metadata is not valid JSON ({exc})") from None
    q = _quant_metadata(metadata, where)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    dense, head = {}, {}
    for key, t in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "lowrank" and rest[-2:] in (".U", ".S", ".V"):
            parts.setdefault(rest[:-2], {})[rest[-1]] = t
        elif kind == "lowrank" and rest[-9:] in (".U_scales", ".V_scales") and len(rest) > 9:
            parts.setdefault(rest[:-9], {})[rest[-8:]] = t
        elif kind == "dense" and rest:
            dense[rest] = t
        elif kind == "head" and rest:
            head[rest] = t
        else:
            raise FactorError(f"{where}: unexpected tensor {key}")
    lowrank = {}
    for name, p in parts.items():
        if q is None and set(p) != {"U", "S", "V"}:
            extra = " (scales, but the metadata has no factor_bits)" if set(p) & set(SCALES) else ""
            raise FactorError(f"{where}: tensor {name} has {'/'.join(sorted(p))} but needs U, S and V{extra}")
        if q is not None and set(p) != {"U", "S", "V", *SCALES}:
            raise FactorError(f"{where}: tensor {name} has {'/'.join(sorted(p))} but {q[0]}-bit factors need "
                              "U, U_scales, S, V and V_scales")
        U, S, V = _dequantized(name, p, q, where) if q is not None else (p["U"], p["S"], p["V"])
        if U.ndim != 2 or S.ndim != 1 or V.ndim != 2 or not U.shape[1] == S.shape[0] == V.shape[1]:
            raise FactorError(f"{where}: tensor {name} has inconsistent factor shapes U {list(U.shape)}, "
                              f"S {list(S.shape)}, V {list(V.shape)} (want [m, r], [r], [n, r])")
        if name in dense:
            raise FactorError(f"{where}: tensor {name} is stored both low-rank and dense")
        lowrank[name] = (U, S, V)
    return ExclusiveFactors(metadata["expert"], config, lowrank, dense, head, metadata)


def save_factors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Validate (as `load_factors` would) and write a factor file atomically."""
    parse_factors(tensors, metadata, str(path))
    return save_safetensors_atomic(tensors, path, metadata)


def write_factors(path: str | Path, stream: FactorStream, metadata: Mapping[str, str]) -> Path:
    """Write a factor file as `stream` produces it, one tensor in memory at a time (`SafetensorsWriter`:
    atomic, the same bytes as `save_factors` of the collected tensors), after validating its planned tensors
    as `load_factors` would."""
    if (metadata.get("factor_bits"), metadata.get("group_size")) != (
            (None, None) if not stream.quantised else (str(stream.factor_bits), str(stream.group_size))):
        raise FactorError(f"{path}: metadata factor_bits/group_size {metadata.get('factor_bits')}/"
                          f"{metadata.get('group_size')} differ from the stream's {stream.factor_bits}/"
                          f"{stream.group_size}")
    parse_factors({name: torch.empty(shape, dtype=dtype, device="meta") for name, shape, dtype in stream.specs},
                  metadata, str(path))
    with SafetensorsWriter(path, stream.specs, metadata) as out:
        for name, tensor in stream:
            out.write(name, tensor)
    return Path(path)


def load_factors(path: str | Path, data: bool = True) -> ExclusiveFactors:
    """Read and validate a factor file (FactorError if missing, unreadable or malformed). `data=False` reads
    the header alone: tensors are meta tensors (shapes and dtypes, no values), for checks and metadata."""
    path = Path(path)
    if not path.is_file():
        raise FactorError(f"{path}: factor file not found")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) if data else _meta_tensor(f.get_slice(k)) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types on corrupt files
        raise FactorError(f"{path}: cannot read safetensors file ({exc})") from None
    return parse_factors(tensors, metadata, str(path))


def _meta_tensor(sl) -> torch.Tensor:
    """A meta tensor with the shape and dtype of a safetensors slice (nothing read)."""
    if sl.get_dtype() not in SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported dtype {sl.get_dtype()}")
    return torch.empty(sl.get_shape(), dtype=SAFETENSORS_DTYPES[sl.get_dtype()], device="meta")
