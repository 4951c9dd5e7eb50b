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

Mixed precision (Delta-CoMe style): `factor_bits` may be a schedule [(share, bits), ...] of >= 2 segments
(`twinmerge.quant.check_schedule`: shares > 0 summing to 1, bits 2..8), e.g. [(0.25, 8), (0.75, 4)]: the columns
of U and V with the largest singular values get more bits. The r columns are split by `quant.segments` (first
segment ceil(0.25 r) columns; cumulative rounding, every column in exactly one segment; a rank-1 factor is all
first segment) and segment i is quantised alone, stored as `lowrank.<name>.U.q<i>` / `.U_scales.q<i>` (and V)
for each non-empty segment i (its index in the schedule); S as above. The metadata `factor_bits` holds the
schedule as JSON ("[[0.25, 8], [0.75, 4]]"). A one-segment schedule [(1, b)] is plain b bits (the same file,
byte for byte). `load_factors` dequantises the segments and concatenates them: U [m, r], V [n, r] float32 as
for plain bits. Bytes (`factor_bytes`) sum the segments' codes and scales exactly; budgets rank by gain per
average byte (`bytes_per_rank`) and charge exact marginal bytes, which may re-split columns (`allocate_budget`).

Low-rank source (`lowrank`, e.g. `linear_merge_source` for PEFT LoRA experts under a linear merge): a callable
giving (L [m, K], R [K, n]) with v_t = L @ R exactly for a 2-D key, or None. Where it gives a pair and
K < min(m, n), that tensor's spectrum, ranks and factors come from `lowrank_svd(L, R)` (two thin QRs and a K x K
core SVD) and its error from K x K / K x r / r x r Gram products: no m x n matrix is formed (a tensor whose plan
says "dense" is the exception: its m x n values are what is stored, read as without a source). Ranks are then
capped at K (v_t has rank <= K; the dense SVD would spend the extra triplets on rounding noise), K = 0 or an
all-zero core spectrum is "zero". Everything else takes the dense path, unchanged: without a source the file is
byte-identical to before.
"""
import json
import math
import re
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
from .gram_svd import GRAM_SVD_MIB, gram_spectrum, gram_svd, lowrank_error2, use_gram
from .io import SAFETENSORS_DTYPES, ExpertSet, SafetensorsWriter, TensorSpec, save_safetensors_atomic
from .lora import LoraExpert, lowrank_svd

FORMAT = "twinmerge-exclusive/1"
FACTOR_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
RANK_MODES = ("rank", "fraction", "energy", "budget_bytes", "budget_fraction")
UNQUANTISED = 16  # factor_bits of plain factors in the factor dtype
FactorBits = int | quant.Schedule  # 16, 2..8, or a schedule of >= 2 segments (module docstring)
SCALES = ("U_scales", "V_scales")
# lowrank.<name>.<part>: U, S, V, U_scales, V_scales, each with a segment tag .q<i> under a bits schedule
LOWRANK_PART = re.compile(r"(?P<name>.+)\.(?P<part>(?:[USV]|[UV]_scales)(?:\.q\d+)?)")
ROW_BLOCK_BYTES = 4 * 2**20  # float32 bytes of the blocks of rows v_t is built from (`FactorStream._delta`)
EXACT_BASE_DTYPES = (torch.float32, torch.float64)  # theta_t, theta_s stored in these: v_t = L @ R to ~1e-7
# (key) -> (L [m, K], R [K, n]) with v_t = L @ R, or None (dense path); see the module docstring.
LowRankSource = Callable[[str], tuple[torch.Tensor, torch.Tensor] | None]


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


def bytes_per_rank(m: int, n: int, itemsize: int, factor_bits: FactorBits = UNQUANTISED,
                   group_size: int = 64) -> float:
    """Bytes one singular triplet costs: a column of U [m] and of V [n] in the factor dtype, one float32 s.
    Quantised (factor_bits 2..8): per column k * bits / 8 bytes of codes + ceil(k / group_size) float16 scales
    (the average: packed codes of an odd rank round up, see `factor_bytes`); a schedule: the share-weighted
    average sum_i share_i * (column_i(m) + column_i(n)) + 4 (the segments' split rounds, see `factor_bytes`)."""
    bits = check_factor_bits(factor_bits, group_size)
    if bits == UNQUANTISED:
        return (m + n) * itemsize + 4
    column = lambda k, b: k * b / 8 + math.ceil(k / group_size) * quant.SCALE_DTYPE.itemsize  # noqa: E731
    schedule = ((1.0, bits),) if isinstance(bits, int) else bits
    return sum(share * (column(m, b) + column(n, b)) for share, b in schedule) + 4


def factor_bytes(m: int, n: int, r: int, itemsize: int, factor_bits: FactorBits = UNQUANTISED,
                 group_size: int = 64) -> int:
    """Exact stored bytes of rank-r factors of an [m, n] matrix: U and V (factor dtype, or codes + scales,
    `twinmerge.quant.stored_bytes`; a schedule: each segment's, `quant.mixed_stored_bytes`) and S (float32)."""
    bits = check_factor_bits(factor_bits, group_size)
    if bits == UNQUANTISED or r == 0:
        return r * ((m + n) * itemsize + 4)
    if isinstance(bits, int):
        return quant.stored_bytes((m, r), bits, group_size) + quant.stored_bytes((n, r), bits, group_size) + 4 * r
    return (quant.mixed_stored_bytes((m, r), bits, group_size) + quant.mixed_stored_bytes((n, r), bits, group_size)
            + 4 * r)


def allocate_budget(spectra: Mapping[str, tuple[torch.Tensor, int, int]], budget: int, itemsize: int,
                    factor_bits: FactorBits = UNQUANTISED, group_size: int = 64) -> dict[str, int]:
    """Ranks {name: r} for matrices {name: (s, m, n)} maximising the kept energy sum_i sum_{j<=r_i} s_ij^2
    subject to sum_i factor_bytes(m_i, n_i, r_i) <= budget (quantised factors: the bits' bytes, so a budget buys
    more rank at fewer bits).

    Greedy by gain per byte s_ij^2 / bytes_per_rank_i. Within a matrix the ratios are non-increasing, so the
    greedy order always extends a prefix (a valid rank). Each step is charged its exact marginal bytes (packed
    int4 codes cost a byte column every second rank), so the budget holds exactly. Unquantised, this is the
    exact optimum of the fractional relaxation; the integer solution loses at most the gain of one triplet per
    matrix that hit the budget edge (equal to the optimum when all matrices have the same bytes per rank).
    A mixed-bits schedule: the ratio uses the average bytes per rank, and the exact marginal step
    factor_bytes(r + 1) - factor_bytes(r) (the new column, plus any column that moves to an earlier, wider
    segment as the split re-rounds) is charged, so the budget still holds exactly; the order is then a heuristic
    (a column's true cost depends on its segment), not the relaxation's optimum.
    Quantised factors of full rank r = min(m, n) are stored dense (`FactorStream._storage`), so that rank is
    charged max(factor_bytes, m n itemsize) (`_charged`): the stored bytes never exceed the budget.
    """
    factor_bits = check_factor_bits(factor_bits, group_size)
    ranks = {name: 0 for name in spectra}
    items = []
    for name, (s, m, n) in spectra.items():
        cost = bytes_per_rank(m, n, itemsize, factor_bits, group_size)
        items += [(float(sj) ** 2 / cost, name, j) for j, sj in enumerate(s.tolist()) if sj > 0]
    items.sort(key=lambda it: -it[0])
    used = 0
    for _, name, j in items:
        _, m, n = spectra[name]
        step = _charged(m, n, j + 1, itemsize, factor_bits, group_size) - _charged(
            m, n, j, itemsize, factor_bits, group_size)
        if ranks[name] == j and used + step <= budget:
            ranks[name] += 1
            used += step
    return ranks


def _charged(m: int, n: int, r: int, itemsize: int, factor_bits: FactorBits, group_size: int) -> int:
    """Bytes `allocate_budget` charges for rank r of an [m, n] matrix: `factor_bytes`, but at least the dense
    m n itemsize for quantised factors of full rank r = min(m, n) (stored dense). Non-decreasing in r; >= the bytes
    stored (elsewhere dense is stored only where it is at most `factor_bytes`)."""
    stored = factor_bytes(m, n, r, itemsize, factor_bits, group_size)
    full = factor_bits != UNQUANTISED and r == min(m, n)
    return max(stored, m * n * itemsize) if full else stored


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
                    factor_bits: FactorBits = UNQUANTISED, group_size: int = 64) -> dict[str, str]:
    """safetensors metadata of a factor file (all values strings, as safetensors requires). Quantised factors
    (factor_bits != 16) add `factor_bits` (`bits_text`) and `group_size`; unquantised files have neither (as
    before)."""
    meta = {"format": FORMAT, "expert": expert_name, "factor_dtype": factor_dtype,
            "rank_spec": json.dumps(rank_spec.to_dict()), "config": json.dumps(dict(config))}
    bits = check_factor_bits(factor_bits, group_size)
    if bits != UNQUANTISED:
        meta.update(factor_bits=bits_text(bits), group_size=str(group_size))
    return meta


def check_factor_bits(factor_bits: object, group_size: int = 64) -> FactorBits:
    """factor_bits checked and normalised: 16 (unquantised), an int in 2..8, or a schedule of (share, bits) pairs
    (`quant.check_schedule`) as a `quant.Schedule`, a one-segment schedule [(1, b)] becoming b. FactorError
    otherwise, or unless group_size is an integer >= 1."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise FactorError(f"factor group size {group_size!r} not an integer >= 1")
    if isinstance(factor_bits, (list, tuple)):
        schedule = quant.check_schedule(factor_bits)
        return schedule[0][1] if len(schedule) == 1 else schedule
    if isinstance(factor_bits, bool) or not isinstance(factor_bits, int) or not (
            factor_bits == UNQUANTISED or 2 <= factor_bits <= 8):
        raise FactorError(f"factor bits {factor_bits!r} not 16 (unquantised), an integer in 2..8 or a schedule "
                          "[[share, bits], ...]")
    return factor_bits


def _segments(bits: FactorBits, r: int) -> list[tuple[int, int, int, int]]:
    """(i, start, stop, bits_i) of the quantised columns 0 .. r - 1 at checked bits (not 16): plain bits one segment
    (0, 0, r, bits), a schedule its non-empty `quant.segments`."""
    return [(0, 0, r, bits)] if isinstance(bits, int) else quant.segments(r, bits)


def bits_text(bits: FactorBits) -> str:
    """The metadata text of checked factor_bits: "8", or a schedule as JSON "[[0.25, 8], [0.75, 4]]"."""
    return str(bits) if isinstance(bits, int) else json.dumps([list(p) for p in bits])


def linear_merge_source(experts: ExpertSet, expert_name: str, lambdas: Mapping[str, float]) -> LowRankSource:
    """The low-rank source of PEFT LoRA experts under a linear shared merge theta_s = theta_0 + sum_s lambdas[s]
    Delta W_s (Task Arithmetic: lambda = scaling; weight averaging: 1 / n): for a 2-D key,
    v_t = Delta W_t - sum_s lambdas[s] Delta W_s = L @ R, L = [c_e B_e]_e [m, K], R = [A_e]_e [K, n] over the
    experts e with c_e != 0 and a LoRA delta on the key, c_t = 1 - lambdas.get(t, 0), c_s = -lambdas[s] (the
    compressed expert counted once: K = the sum of their ranks). K = 0 where none of them changes the key
    (v_t = 0). None (dense path) where one holds a dense delta (a saved module, a trained bias) or the base
    stores the key below float32 (theta_t, theta_s rounded there: v_t = L @ R only up to that rounding).
    `experts` must hold `expert_name` and every expert of `lambdas`, all LoRA adapters (FactorError otherwise)."""
    coefs = {expert_name: 1.0}
    for name, lam in lambdas.items():
        coefs[name] = coefs.get(name, 0.0) - float(lam)
    for name in coefs:
        ckpt = experts.experts.get(name)
        if not isinstance(ckpt, LoraExpert):
            raise FactorError(f"low-rank source: expert {name!r} is "
                              f"{'not in the expert set' if ckpt is None else f'not a LoRA adapter ({ckpt.folder})'}")
    loras = [(experts.experts[name], c) for name, c in coefs.items() if c != 0.0]

    def source(key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        kinds = [ckpt.delta_kind(key) for ckpt, _ in loras]
        base_key = experts.base_key(key)
        if ("full" in kinds or base_key is None or len(experts.base.shape(base_key)) != 2
                or experts.base.dtype(base_key) not in EXACT_BASE_DTYPES):
            return None
        m, n = experts.base.shape(base_key)
        terms = [(c, *ckpt.factors(key)) for (ckpt, c), kind in zip(loras, kinds) if kind == "lowrank"]
        return (torch.cat([torch.empty(m, 0), *(c * B for c, B, _ in terms)], 1),
                torch.cat([torch.empty(0, n), *(A for _, _, A in terms)], 0))
    return source


def compress_expert(experts: ExpertSet, shared: Mapping[str, torch.Tensor], expert_name: str,
                    rank_spec: RankSpec, factor_dtype: str = "float16", progress: bool = True,
                    factor_bits: FactorBits = UNQUANTISED, group_size: int = 64,
                    lowrank: LowRankSource | None = None, gram_svd_mib: float | None = GRAM_SVD_MIB
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
    factors, and stats also hold factor_bits (a schedule as [[share, bits], ...]) and group_size.
    `lowrank`: a low-rank source (module docstring); its tensors' rel_error is measured against L @ R.
    `gram_svd_mib`: matrices from this size (MiB, float32) that are at least 4x as tall as wide take the Gram
    path (`twinmerge.gram_svd`, row `svd: "gram"` in stats); None: LAPACK's SVD for all.
    """
    stream = FactorStream(experts, shared, expert_name, rank_spec, factor_dtype, progress, factor_bits, group_size,
                          lowrank, gram_svd_mib)
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
    Peak memory: about 3x the largest tensor (v_t, LAPACK's copy of it and U during its SVD), in every mode;
    1x for the matrices that take the Gram path (`gram_svd_mib`, `gram_svd.use_gram`: large and at least 4x as
    tall as wide, like embeddings and LM heads), whose v_t is also read, and its error measured, in blocks of rows.
    Energy ranks come from the singular values of pass 1 (`singular_values`, as the budget modes' spectra).
    With a `lowrank` source, the keys it covers (`lowrank_keys`) take both passes from (L, R) instead: memory
    O((m + n) K), time O((m + n) K^2 + K^3) per tensor (module docstring).
    """

    def __init__(self, experts: ExpertSet, shared: Mapping[str, torch.Tensor], expert_name: str,
                 rank_spec: RankSpec, factor_dtype: str = "float16", progress: bool = True,
                 factor_bits: FactorBits = UNQUANTISED, group_size: int = 64, lowrank: LowRankSource | None = None,
                 gram_svd_mib: float | None = GRAM_SVD_MIB):
        if expert_name not in experts.experts:
            raise FactorError(f"unknown expert {expert_name!r}; known: {', '.join(experts.names)}")
        if factor_dtype not in FACTOR_DTYPES:
            raise FactorError(f"factor dtype {factor_dtype!r} not one of {', '.join(FACTOR_DTYPES)}")
        self.factor_bits, self.group_size = check_factor_bits(factor_bits, group_size), group_size
        self.quantised = self.factor_bits != UNQUANTISED
        self.experts, self.shared, self.name, self.rank_spec = experts, shared, expert_name, rank_spec
        self.factor_dtype, self.fdt = factor_dtype, FACTOR_DTYPES[factor_dtype]
        self.itemsize = self.fdt.itemsize
        self.progress = progress
        self.lowrank = lowrank
        self.gram_svd_mib = gram_svd_mib
        self.lowrank_keys: list[str] = []
        self.plan = self._plan()
        self.specs = self._specs()
        self.stats: dict[str, Any] | None = None

    def _delta(self, key: str) -> torch.Tensor:
        """v_t (float32) of `key`, built in blocks of rows of ~4 MiB read from the two files: one tensor of its
        size in memory, plus a block (elementwise, so the same bytes as subtracting whole tensors)."""
        if key not in self.shared:
            raise FactorError(f"shared state dict has no tensor {key}")
        shape = tuple(self.experts.experts[self.name].shape(key))
        read = getattr(self.shared, "read", None)  # a lazy SharedModel reads blocks; a dict of tensors slices
        shared_shape = tuple(self.shared.shape(key) if read else self.shared[key].shape)
        if shared_shape != shape:
            raise FactorError(f"shared tensor {key} has shape {list(shared_shape)}, expert {self.name!r} has "
                              f"{list(shape)}")
        if len(shape) == 0:
            return self.experts.expert_tensor(self.name, key).to(torch.float32, copy=True).sub_(
                self._shared_rows(key, None).to(torch.float32))
        v = torch.empty(shape, dtype=torch.float32)
        step = max(1, ROW_BLOCK_BYTES // max(4 * math.prod(shape[1:]), 1))
        for i in range(0, shape[0], step):
            rows = slice(i, min(i + step, shape[0]))
            torch.sub(self.experts.expert_tensor(self.name, key, rows).to(torch.float32),
                      self._shared_rows(key, rows).to(torch.float32), out=v[rows])
        return v

    def _shared_rows(self, key: str, rows: slice | None) -> torch.Tensor:
        if hasattr(self.shared, "read"):
            return self.shared.read(key, rows)
        return self.shared[key] if rows is None else self.shared[key][rows]

    def _plan(self) -> dict[str, tuple[str, int | None]]:
        """{key: (kind, rank)} in key order: kind zero | dense | lowrank | dropped; rank None for non-2-D."""
        keys = self.experts.mergeable_keys()
        plan, spectra = {}, {}
        for key in progress_bar(keys, desc=f"plan ({self.name})", unit="tensor", disable=not self.progress):
            shape, cap, nonzero, spectrum = self._probe(key)
            if not nonzero:
                plan[key] = ("zero", 0)
            elif len(shape) != 2:
                plan[key] = ("dense", None)
            elif not self.rank_spec.needs_spectrum:
                plan[key] = self._storage(*shape, min(self.rank_spec.rank_for_size(min(shape)), cap))
            elif self.rank_spec.is_budget:
                spectra[key] = (spectrum(), *shape)
            else:
                plan[key] = self._storage(*shape, self.rank_spec.rank_for(spectrum()))
            spectrum = None  # drops this v_t before the next one is read
        if self.rank_spec.is_budget:
            budget = int(self.rank_spec.value) if self.rank_spec.mode == "budget_bytes" else math.floor(
                self.rank_spec.value * sum(m * n * self.itemsize for _, m, n in spectra.values()))
            for key, r in allocate_budget(spectra, budget, self.itemsize, self.factor_bits,
                                          self.group_size).items():
                plan[key] = self._storage(*spectra[key][1:], r)
        return {key: plan[key] for key in keys}

    def _pair(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(L [m, K], R [K, n]) from the low-rank source for a 2-D `key` when K < min(m, n), else None (dense
        path: no source, not 2-D, not covered, or K too large to pay)."""
        if self.lowrank is None:
            return None
        shape = self.experts.experts[self.name].shape(key)
        if len(shape) != 2:
            return None
        pair = self.lowrank(key)
        if pair is None or pair[0].shape[1] >= min(shape):
            return None
        L, R = pair
        if L.ndim != 2 or R.ndim != 2 or (L.shape[0], R.shape[1]) != tuple(shape) or L.shape[1] != R.shape[0]:
            raise FactorError(f"low-rank source: {key} gives L {list(L.shape)}, R {list(R.shape)}; "
                              f"the tensor has shape {list(shape)}")
        if key not in self.shared:
            raise FactorError(f"shared state dict has no tensor {key}")
        return pair

    def _probe(self, key: str) -> tuple[tuple[int, ...], int, bool, Callable[[], torch.Tensor]]:
        """(shape, rank cap, nonzero, spectrum()) of v_t for the plan: from the source's (L, R) where `_pair`
        gives one (cap = the core's rank min(K, m, n), spectrum its singular values, zero when they all are),
        else from v_t itself (cap min(m, n), `singular_values(v_t)`)."""
        pair = self._pair(key)
        if pair is not None:
            self.lowrank_keys.append(key)
            S = lowrank_svd(*pair)[1]
            return (pair[0].shape[0], pair[1].shape[1]), S.numel(), bool(S.any()), lambda: S
        v = self._delta(key)
        spectrum = gram_spectrum if self._gram(v.shape) else singular_values
        nonzero = v.numel() > 0 and (bool(v.amax() != 0) or bool(v.amin() != 0))  # no [m, n] bool temporary
        return tuple(v.shape), min(v.shape, default=0), nonzero, lambda: spectrum(v)

    def _gram(self, shape: tuple[int, ...]) -> bool:
        """Whether a v_t of this shape takes its spectrum and SVD from the Gram matrix (`gram_svd.use_gram`)."""
        return use_gram(tuple(shape), self.gram_svd_mib)

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
                        for spec in self._quant_specs(key, name, rows, r)]
            elif kind == "lowrank":
                out += [(f"lowrank.{key}.U", (shape[0], r), self.fdt), (f"lowrank.{key}.S", (r,), torch.float32),
                        (f"lowrank.{key}.V", (shape[1], r), self.fdt)]
        return out + [(f"head.{key}", ckpt.shape(key), torch.float32) for key in self.experts.head_keys()]

    def _quant_specs(self, key: str, part: str, rows: int | None, r: int) -> list[TensorSpec]:
        """Specs of quantised factor `part` (U or V) [rows, r] of `key`: codes, then scales, per segment (names
        `_part_name`); or of S [r] (rows None)."""
        if rows is None:
            return [(f"lowrank.{key}.S", (r,), torch.float32)]
        out, bits = [], self.factor_bits
        for i, start, stop, b in _segments(bits, r):
            shape, dtype = quant.packed_spec((rows, stop - start), b)
            out += [(f"lowrank.{key}.{_part_name(part, i, bits)}", shape, dtype),
                    (f"lowrank.{key}.{_part_name(f'{part}_scales', i, bits)}",
                     quant.scales_shape((rows, stop - start), self.group_size), quant.SCALE_DTYPE)]
        return out

    def _names(self, key: str, kind: str, r: int) -> list[str]:
        """File names of what `_stored` returns for a nonzero 2-D v_t of this kind and rank."""
        if kind == "dense":
            return [f"dense.{key}"]
        if kind != "lowrank":
            return []
        if not self.quantised:
            return [f"lowrank.{key}.{p}" for p in "USV"]
        return [f"lowrank.{key}.{p}" for p in _quant_parts(self.factor_bits, r)]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        per: dict[str, dict[str, Any]] = {}
        err2 = norm2 = 0.0
        lowrank = set(self.lowrank_keys)
        for key in progress_bar(self.plan, desc=f"compress ({self.name})", unit="tensor", disable=not self.progress):
            kind, r = self.plan[key]
            row = per[key] = {}
            pair = self._pair(key) if key in lowrank and kind != "dense" else None
            e2, n2 = yield from (self._dense_tensors(key, kind, r, row) if pair is None
                                 else self._lowrank_tensors(key, pair, kind, r, row))
            err2, norm2 = err2 + e2, norm2 + n2
        for key in self.experts.head_keys():
            yield f"head.{key}", self.experts.expert_tensor(self.name, key).to(torch.float32)
        self.stats = self._stats(per, err2, norm2)

    def _dense_tensors(self, key: str, kind: str, r: int | None, row: dict[str, Any]
                       ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the file tensors of `key` from v_t [*shape] itself, fill its stats `row`; returns (||v_t -
        stored||_F^2, ||v_t||_F^2) for rel_error_2d, (0, 0) for zero and non-2-D tensors."""
        v = self._delta(key)
        row.update(shape=list(v.shape), dense_bytes=v.numel() * 4)
        if kind == "zero":
            row.update(kind="zero", rank=0, energy_kept=1.0, bytes=0, rel_error=0.0)
            return 0.0, 0.0
        if r is None:
            yield f"dense.{key}", v
            row.update(kind="dense", rank=None, energy_kept=1.0, bytes=v.numel() * 4, rel_error=0.0)
            return 0.0, 0.0
        gram = kind == "lowrank" and self._gram(v.shape)
        stored, kept, approx = self._stored(v, kind, r)
        yield from zip(self._names(key, kind, r), stored)
        e2 = lowrank_error2(*approx, v) if gram else _squared_error(kind, approx, v)
        n2 = float(torch.linalg.norm(v)) ** 2
        row.update(kind=kind, rank=r, energy_kept=kept, bytes=sum(t.numel() * t.element_size() for t in stored),
                   rel_error=math.sqrt(e2 / n2))
        if gram:
            row["svd"] = "gram"  # only then: the stats of LAPACK-path tensors keep their former bytes
        return e2, n2

    def _lowrank_tensors(self, key: str, pair: tuple[torch.Tensor, torch.Tensor], kind: str, r: int,
                         row: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
        """As `_dense_tensors` for v_t = L @ R (L [m, K], R [K, n]) of kind zero | lowrank | dropped, never
        forming it: factors from `lowrank_svd`, errors from `_lowrank_squared_error` (Gram products)."""
        L, R = pair
        row.update(shape=[L.shape[0], R.shape[1]], dense_bytes=L.shape[0] * R.shape[1] * 4)
        if kind == "zero":
            row.update(kind="zero", rank=0, energy_kept=1.0, bytes=0, rel_error=0.0)
            return 0.0, 0.0
        stored, kept, approx = ([], 0.0, []) if kind == "dropped" else self._factors(*lowrank_svd(L, R), r)
        yield from zip(self._names(key, kind, r), stored)
        e2, n2 = _lowrank_squared_error(L, R, approx), _lowrank_squared_error(L, R, [])
        row.update(kind=kind, rank=r, energy_kept=kept, bytes=sum(t.numel() * t.element_size() for t in stored),
                   rel_error=math.sqrt(e2 / n2))
        return e2, n2

    def _stored(self, v: torch.Tensor, kind: str, r: int) -> tuple[list[torch.Tensor], float, list[torch.Tensor]]:
        """What is stored of a nonzero 2-D v_t ([v] dense, [U_r, S_r, V_r], quantised [U codes, U scales, S_r,
        V codes, V scales], or [] dropped), the energy it keeps and what a reader gets back ([v'] or [U', S, V']);
        the SVD's full U is freed on return, before the caller measures the error."""
        if kind == "dense":
            stored = [v.to(self.fdt)]
            return stored, 1.0, stored
        if kind == "dropped":
            return [], 0.0, []
        return self._factors(*(gram_svd(v, r) if self._gram(v.shape) else thin_svd(v)), r)

    def _factors(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, r: int
                 ) -> tuple[list[torch.Tensor], float, list[torch.Tensor]]:
        """`_stored` of the rank-r truncation of an SVD U [m, k] diag(S [k]) V [n, k]^T (S descending, k >= r; U and V
        may hold only their first r columns, as `gram_svd` gives them):
        the stored factors, the energy kept sum_{i<=r} s_i^2 / sum_i s_i^2 and what a reader gets back."""
        energy = S.to(torch.float64) ** 2
        kept = float(energy[:r].sum() / energy.sum())
        if not self.quantised:
            stored = [U[:, :r].to(self.fdt).contiguous(), S[:r].contiguous(), V[:, :r].to(self.fdt).contiguous()]
            return stored, kept, stored
        (u, u_back), (v, v_back) = self._quantised(U[:, :r]), self._quantised(V[:, :r])
        S = S[:r].contiguous()
        return [*u, S, *v], kept, [u_back, S, v_back]

    def _quantised(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """([codes, scales] per segment, in `_quant_parts` order; the dequantised float32 x' [m, r]) of a factor
        x [m, r]: each segment's columns quantised alone at its bits, x' their dequantisation concatenated."""
        stored, back = [], []
        for _, start, stop, bits in _segments(self.factor_bits, x.shape[1]):
            codes, scales = quant.quantize(x[:, start:stop], bits, self.group_size)
            stored += [codes, scales]
            back.append(quant.dequantize(codes, scales, (x.shape[0], stop - start), bits, self.group_size))
        return stored, torch.cat(back, dim=1)

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
            out.update(factor_bits=json.loads(bits_text(self.factor_bits)), group_size=self.group_size)
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


def _lowrank_squared_error(L: torch.Tensor, R: torch.Tensor, approx: list[torch.Tensor]) -> float:
    """||L @ R - U diag(S) V^T||_F^2 for approx = [U [m, r], S [r], V [n, r]] (what a reader gets back; [] = 0),
    L [m, K], R [K, n], in float64 from small Gram products, never forming m x n:
    ||LR||^2 = <L^T L, R R^T>, <LR, U S V^T> = <L^T U S, R V>, ||U S V^T||^2 = <(US)^T US, V^T V>
    (<A, B> = sum A * B), ||LR - X||^2 = ||LR||^2 - 2 <LR, X> + ||X||^2, clamped at 0 (rounding)."""
    L, R = L.to(torch.float64), R.to(torch.float64)
    total = float(((L.T @ L) * (R @ R.T)).sum())
    if not approx:
        return total
    U, S, V = (t.to(torch.float64) for t in approx)
    US = U * S
    cross = float(((L.T @ US) * (R @ V)).sum())
    return max(total - 2 * cross + float(((US.T @ US) * (V.T @ V)).sum()), 0.0)


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


def _quant_metadata(metadata: Mapping[str, str], where: str) -> tuple[FactorBits, int] | None:
    """(factor_bits, group_size) of a quantised file's metadata (bits an int, or a schedule from JSON), None for
    an unquantised one."""
    if "factor_bits" not in metadata:
        if "group_size" in metadata:
            raise FactorError(f"{where}: metadata has group_size but no factor_bits")
        return None
    if "group_size" not in metadata:
        raise FactorError(f"{where}: metadata has factor_bits but no group_size")
    bits, size = metadata["factor_bits"], metadata["group_size"]
    if not size.isdigit() or int(size) < 1:
        raise FactorError(f"{where}: metadata group_size {size!r} is not an integer >= 1")
    if bits.startswith("["):
        try:
            return quant.check_schedule(json.loads(bits)), int(size)
        except (ValueError, FactorError) as exc:
            raise FactorError(f"{where}: metadata factor_bits {bits!r}: {exc}") from None
    if not bits.isdigit() or not 2 <= int(bits) <= 8:
        raise FactorError(f"{where}: metadata factor_bits {bits!r} is not an integer in 2..8 or a schedule")
    return int(bits), int(size)


def _part_name(part: str, i: int, bits: FactorBits) -> str:
    """File name suffix (after lowrank.<name>.) of segment i of quantised `part` (U, U_scales, V, V_scales): the
    part itself for plain bits, `<part>.q<i>` for a schedule."""
    return part if isinstance(bits, int) else f"{part}.q{i}"


def _quant_parts(bits: FactorBits, r: int) -> list[str]:
    """The parts of a quantised rank-r low-rank tensor, in file order: plain bits U, U_scales, S, V, V_scales; a
    schedule U.q<i>, U_scales.q<i> (each non-empty segment i), S, then V's likewise."""
    factor = lambda part: [_part_name(p, i, bits) for i, *_ in _segments(bits, r)  # noqa: E731
                           for p in (part, f"{part}_scales")]
    return [*factor("U"), "S", *factor("V")]


def _dequantized(name: str, p: dict[str, torch.Tensor], q: tuple[FactorBits, int], where: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, V) float32 of a quantised low-rank tensor's parts (`_quant_parts`): each segment dequantised at its
    bits (`quant.dequantize`, rows those of the first segment's codes), U [m, r] and V [n, r] their
    concatenation along columns."""
    S = p["S"]
    if S.ndim != 1:
        raise FactorError(f"{where}: tensor {name} has S of shape {list(S.shape)} (want [r])")
    bits, g = q
    segs = _segments(bits, S.shape[0])
    if not segs:
        raise FactorError(f"{where}: tensor {name} has rank 0")
    out = []
    for part in "UV":
        cols = []
        for i, start, stop, b in segs:
            code = _part_name(part, i, bits)
            codes = p[code]
            if codes.ndim != 2:
                raise FactorError(f"{where}: tensor {name}.{code} has shape {list(codes.shape)}, expected 2-D codes")
            rows, scales = p[_part_name(part, segs[0][0], bits)].shape[0], p[_part_name(f"{part}_scales", i, bits)]
            try:
                cols.append(quant.dequantize(codes, scales, (rows, stop - start), b, g))
            except FactorError as exc:
                raise FactorError(f"{where}: tensor {name}.{code}: {exc}") from None
        # meta tensors (a file checked from its specs, `write_factors`): no torch.cat, whose meta kernel imports
        # torch._dynamo and sympy (~90 MiB of RSS for the whole compress step)
        out.append(torch.empty(rows, sum(c.shape[1] for c in cols), device="meta") if cols[0].is_meta
                   else torch.cat(cols, dim=1))
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
        part = LOWRANK_PART.fullmatch(rest) if kind == "lowrank" else None
        if part:
            parts.setdefault(part["name"], {})[part["part"]] = t
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
        if q is not None and isinstance(q[0], int) and set(p) != {"U", "S", "V", *SCALES}:
            raise FactorError(f"{where}: tensor {name} has {'/'.join(sorted(p))} but {q[0]}-bit factors need "
                              "U, U_scales, S, V and V_scales")
        if q is not None and not isinstance(q[0], int):
            r = p["S"].shape[0] if "S" in p and p["S"].ndim == 1 else None
            need = _quant_parts(q[0], r or 0)
            if r is None or set(p) != set(need):
                raise FactorError(f"{where}: tensor {name} has {'/'.join(sorted(p))} but rank-{r} factors of bits "
                                  f"schedule {bits_text(q[0])} need {'/'.join(need)}")
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
            (None, None) if not stream.quantised else (bits_text(stream.factor_bits), str(stream.group_size))):
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
