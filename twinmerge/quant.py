"""Symmetric absmax group-wise quantisation of 2-D factors (the SVD factors U [m, r], V [n, r] of a factor file).

For x [m, k] with bits b in 2..8 and group size g, each column j is cut into G = ceil(m / g) groups of g
consecutive rows (the last group may be shorter); group (i, j) covers rows i*g .. min((i+1)*g, m) - 1. With
qmax = 2^(b-1) - 1:
    s[i, j] = absmax_{rows of group (i, j)} |x[., j]| / qmax, rounded UP to the next float16 (stored float16)
    q[r, j] = clamp(round(x[r, j] / s[i, j]), -qmax, qmax)            (round half to even; s = 0 gives q = 0)
    dq[r, j] = q[r, j] * s[i, j]                                         (computed exactly in float32)
Rounding the scale up (never down) means |x / s| <= qmax, so nothing is clipped and every element obeys
|x - dq| <= s / 2 (up to one float32 rounding of the division). The range is symmetric: -2^(b-1) is never used.

Storage (`packed`):
- b in 5..8: int8 [m, k], q itself.
- b in 2..4: uint8 [m, ceil(k / p)] with p = 8 // b codes per byte, packed along each row (row-major, so the
  column count k need not be stored: a factor's k is its rank, which S records). Code c = q + 2^(b-1) (in
  1 .. 2^b - 1); element (r, j) sits in byte (r, j // p) at bits (j % p) * b .. (j % p) * b + b - 1, LOW BITS
  FIRST: for b = 4, byte = c[r, 2t] | c[r, 2t+1] << 4 (low nibble = even column). Unused high slots are 0.
- scales: float16 [ceil(m / g), k].
So b = 4 stores m * ceil(k / 2) + 2 * ceil(m / g) * k bytes for m * k values; b = 8 stores m * k + the same
scales. Everything is elementwise or a max over a group, on CPU: the same input gives the same bytes every run.

Mixed precision (Delta-CoMe style): a `Schedule` ((share_1, bits_1), ..., (share_K, bits_K)) cuts the k columns of a
factor (ordered by singular value, largest first) into K consecutive segments, segment i quantised alone at bits_i.
Shares are > 0 and sum to 1 (within 1e-9). With cumulative shares P_i = share_1 + ... + share_i, segment i holds
columns b_{i-1} .. b_i - 1 where b_0 = 0, b_K = k and b_i = min(k, ceil(P_i * k - 1e-6)) (`segments`): every
column is in exactly one segment, the first segment gets ceil(share_1 * k) columns, and rounding goes to the
earlier segments (the one column of a rank-1 factor is in the first; later segments may be empty). The 1e-6
absorbs float rounding of the cumulative sums (0.1 + 0.2 = 0.30000000000000004), exact for k < 10^6.
"""
import math

import torch

from .errors import FactorError

SCALE_DTYPE = torch.float16
Schedule = tuple[tuple[float, int], ...]  # ((share, bits), ...): module docstring


def check_bits(bits: int, group_size: int) -> None:
    """FactorError unless bits is an integer in 2..8 and group_size an integer >= 1."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise FactorError(f"quantisation bits {bits!r} not an integer in 2..8")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise FactorError(f"quantisation group size {group_size!r} not an integer >= 1")


def qmax(bits: int) -> int:
    """Largest |q|: 2^(bits-1) - 1 (127 for 8 bits, 7 for 4)."""
    return 2 ** (bits - 1) - 1


def per_byte(bits: int) -> int:
    """Codes packed into one byte: 8 // bits for bits <= 4, else 1 (int8, not packed)."""
    return 8 // bits if bits <= 4 else 1


def packed_spec(shape: tuple[int, int], bits: int) -> tuple[tuple[int, int], torch.dtype]:
    """(shape, dtype) of the stored codes of a [m, k] factor: int8 [m, k] (bits > 4), uint8 [m, ceil(k / p)]."""
    m, k = shape
    if bits > 4:
        return (m, k), torch.int8
    return (m, -(-k // per_byte(bits))), torch.uint8


def scales_shape(shape: tuple[int, int], group_size: int) -> tuple[int, int]:
    """Shape of the scales of a [m, k] factor: [ceil(m / group_size), k]."""
    m, k = shape
    return -(-m // group_size), k


def stored_bytes(shape: tuple[int, int], bits: int, group_size: int) -> int:
    """Bytes of codes + float16 scales for one [m, k] factor."""
    (pm, pk), _ = packed_spec(shape, bits)
    return pm * pk + math.prod(scales_shape(shape, group_size)) * SCALE_DTYPE.itemsize


def _up_to_float16(s: torch.Tensor) -> torch.Tensor:
    """The smallest float16 >= each (finite, >= 0) float32 entry of `s`."""
    h = s.to(SCALE_DTYPE)
    low = h.to(torch.float32) < s
    if bool(low.any()):
        bits = h.view(torch.int16)
        h = torch.where(low, (bits + 1).view(SCALE_DTYPE), h)  # next float16 up: positive values order as ints
    return h


def quantize(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, scales) of x [m, k] (any float dtype, used as float32): packed as `packed_spec`, scales float16
    [ceil(m / group_size), k] (module docstring for the formulas). FactorError if a scale exceeds float16."""
    check_bits(bits, group_size)
    if x.ndim != 2:
        raise FactorError(f"quantize: expected a 2-D factor, got shape {list(x.shape)}")
    x = x.detach().to("cpu", torch.float32)
    m, k = x.shape
    groups = -(-m // group_size)
    padded = torch.zeros(groups * group_size, k, dtype=torch.float32)
    padded[:m] = x
    absmax = padded.view(groups, group_size, k).abs().amax(dim=1)  # [G, k]
    if not bool(torch.isfinite(absmax).all()):
        raise FactorError("quantize: factor has non-finite values")
    s32 = absmax / qmax(bits)
    scales = _up_to_float16(s32)
    if not bool(torch.isfinite(scales).all()):
        raise FactorError(f"quantize: factor values up to {float(absmax.max()):.3g} overflow float16 scales")
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=0)[:m]  # [m, k]
    q = torch.round(x / torch.where(s > 0, s, torch.ones_like(s))).clamp_(-qmax(bits), qmax(bits))
    if bits > 4:
        return q.to(torch.int8), scales
    p = per_byte(bits)
    codes = torch.zeros(m, -(-k // p) * p, dtype=torch.int32)
    codes[:, :k] = q.to(torch.int32) + 2 ** (bits - 1)
    codes = codes.view(m, -1, p) << (torch.arange(p, dtype=torch.int32) * bits)
    return codes.sum(dim=2).to(torch.uint8), scales


def check_packed(packed: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int], bits: int,
                 group_size: int) -> None:
    """FactorError (no file name: the caller adds it) unless packed and scales have the dtypes and shapes that
    `quantize` gives for a [m, k] factor."""
    check_bits(bits, group_size)
    want_shape, want_dtype = packed_spec(shape, bits)
    if packed.dtype != want_dtype or tuple(packed.shape) != want_shape:
        raise FactorError(f"codes are {packed.dtype} {list(packed.shape)}, expected {want_dtype} {list(want_shape)} "
                          f"for {bits}-bit factor of shape {list(shape)}")
    want = scales_shape(shape, group_size)
    if scales.dtype != SCALE_DTYPE or tuple(scales.shape) != want:
        raise FactorError(f"scales are {scales.dtype} {list(scales.shape)}, expected {SCALE_DTYPE} {list(want)} "
                          f"(group size {group_size})")


def dequantize(packed: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int], bits: int,
               group_size: int) -> torch.Tensor:
    """The float32 factor [m, k] = q * s back from `quantize`'s (packed, scales) (checked with `check_packed`).
    Meta tensors in give a meta tensor out (shape and dtype only)."""
    check_packed(packed, scales, shape, bits, group_size)
    m, k = shape
    if packed.device.type == "meta" or scales.device.type == "meta":
        return torch.empty(shape, dtype=torch.float32, device="meta")
    if bits > 4:
        q = packed.to(torch.float32)
    else:
        p = per_byte(bits)
        shifts = torch.arange(p, dtype=torch.int32) * bits
        codes = (packed.to(torch.int32).unsqueeze(2) >> shifts) & (2 ** bits - 1)  # [m, ceil(k/p), p]
        q = (codes.reshape(m, -1)[:, :k] - 2 ** (bits - 1)).to(torch.float32)
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=0)[:m]
    return q * s


def check_schedule(schedule: object) -> Schedule:
    """`schedule` (a sequence of (share, bits) pairs) as a `Schedule` of (float, int), or FactorError unless it is
    non-empty, every share a finite number > 0, the shares summing to 1 within 1e-9 and every bits an int in 2..8."""
    pairs = list(schedule) if isinstance(schedule, (list, tuple)) else None
    ok = bool(pairs) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs)
    ok = ok and all(not isinstance(s, bool) and isinstance(s, (int, float)) and math.isfinite(s) and s > 0
                    and not isinstance(b, bool) and isinstance(b, int) and 2 <= b <= 8 for s, b in pairs)
    if not ok or abs(math.fsum(s for s, _ in pairs) - 1) > 1e-9:
        raise FactorError(f"bits schedule {schedule!r} is not a non-empty list of [share, bits] pairs with shares > 0 "
                          "summing to 1 and bits integers in 2..8")
    return tuple((float(s), b) for s, b in pairs)


def segments(k: int, schedule: Schedule) -> list[tuple[int, int, int, int]]:
    """The non-empty segments (i, start, stop, bits_i) of the k columns of a factor under `schedule` (checked):
    columns start .. stop - 1, b_i = min(k, ceil(P_i * k - 1e-6)), the last stop k (module docstring)."""
    out, start, cumulative = [], 0, 0.0
    for i, (share, bits) in enumerate(schedule):
        cumulative += share
        stop = k if i == len(schedule) - 1 else min(k, math.ceil(cumulative * k - 1e-6))
        if stop > start:
            out.append((i, start, stop, bits))
        start = stop
    return out


def mixed_stored_bytes(shape: tuple[int, int], schedule: Schedule, group_size: int) -> int:
    """Bytes of codes + float16 scales for one [m, k] factor stored as `schedule`'s segments, each [m, stop - start]
    at its bits: sum over segments of `stored_bytes`."""
    m, k = shape
    return sum(stored_bytes((m, stop - start), bits, group_size) for _, start, stop, bits in segments(k, schedule))

