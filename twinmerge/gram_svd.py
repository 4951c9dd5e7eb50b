"""Truncated SVD of a tall (or wide) matrix from its float64 Gram matrix, read in blocks of rows.

Why: LAPACK's thin SVD (`torch.linalg.svd`) holds the matrix, its own column-major copy and U [m, k] at once,
3x the matrix. For an embedding or LM head (vocab x hidden, the largest tensor of most models) that sets the
peak memory of `compress`. Here the peak is the matrix itself plus O(k^2 + (m + n) r):

    v [m, n], m >= n (a wide v is handled as v^T):
    G = v^T v = sum over blocks b of rows: v_b^T v_b        (float64 [n, n])
    G = W diag(lambda) W^T                                   (`torch.linalg.eigh`, ascending -> flipped)
    s_i = sqrt(max(lambda_i, 0)),  V_r = W[:, :r],  U_r = v V_r diag(1 / s_r)   (columns with s_i = 0 are 0)

so v ~= U_r diag(s_r) V_r^T as with the LAPACK SVD (the same subspaces; signs of singular vector pairs may
differ, which the product does not see). Accuracy: forming G squares the condition number, so s_i carries a
relative error of about eps64 (s_1 / s_i)^2 = 1e-16 (s_1 / s_i)^2, below float32's 6e-8 while s_1 / s_i < 1e4;
the directions a truncation keeps are the large ones. Used by `exclusive.FactorStream` only for matrices large
and elongated enough to gain (`use_gram`), so small models keep LAPACK's bytes.
"""
import torch

GRAM_SVD_MIB = 64.0  # default threshold of `use_gram` (params compress.gram_svd_mib)
BLOCK_BYTES = 8 * 2**20  # float64 bytes of one block of rows
MIN_ASPECT = 4  # max(m, n) / min(m, n) from which the Gram path holds less than LAPACK's 3x (G and its copy: 2 k^2 x 8 B)


def use_gram(shape: tuple[int, ...], min_mib: float | None) -> bool:
    """Whether a v_t of this shape takes the Gram path: 2-D, at least `min_mib` MiB in float32 and at least
    MIN_ASPECT times as tall as wide (or as wide as tall); never when `min_mib` is None."""
    if min_mib is None or len(shape) != 2 or min(shape) == 0:
        return False
    m, n = shape
    return m * n * 4 >= min_mib * 2**20 and max(m, n) >= MIN_ASPECT * min(m, n)


def _tall(v: torch.Tensor) -> torch.Tensor:
    return v if v.shape[0] >= v.shape[1] else v.T


def _blocks(rows: int, cols: int) -> list[slice]:
    step = max(1, BLOCK_BYTES // (8 * max(cols, 1)))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def gram(v: torch.Tensor) -> torch.Tensor:
    """G = t^T t (float64 [k, k], k = min(m, n)) of t = v or v^T (the tall one), summed over blocks of rows."""
    t = _tall(v)
    g = torch.zeros(t.shape[1], t.shape[1], dtype=torch.float64)
    for b in _blocks(*t.shape):
        x = t[b].to(torch.float64)
        g.addmm_(x.T, x)
    return g


def gram_spectrum(v: torch.Tensor) -> torch.Tensor:
    """Singular values [min(m, n)] of v (float32, descending), from the eigenvalues of its Gram matrix."""
    return torch.linalg.eigvalsh(gram(v)).flip(0).clamp_min(0).sqrt().to(torch.float32)


def gram_svd(v: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [m, r], S [min(m, n)], V [n, r]) float32 with v ~= U diag(S[:r]) V^T: the rank-r truncation of v's
    SVD and its whole spectrum (descending), the layout `exclusive.FactorStream._factors` takes."""
    t = _tall(v)
    lam, W = torch.linalg.eigh(gram(v))
    S = lam.flip(0).clamp_min(0).sqrt()
    Wr = W.flip(1)[:, :r].contiguous()
    inv = torch.where(S[:r] > 0, 1 / S[:r], torch.zeros_like(S[:r]))
    P = torch.empty(t.shape[0], r, dtype=torch.float64)
    for b in _blocks(*t.shape):
        P[b] = t[b].to(torch.float64) @ Wr
    P.mul_(inv)
    left, right = (P, Wr) if t is v else (Wr, P)
    return left.to(torch.float32), S.to(torch.float32), right.to(torch.float32)


def lowrank_error2(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, v: torch.Tensor) -> float:
    """||v - U diag(S) V^T||_F^2 for U [m, r], S [r], V [n, r] (any float dtype), one block of v's rows at a
    time: never a second [m, n] matrix."""
    US = U.to(torch.float32) * S
    Vt = V.to(torch.float32).T
    total = 0.0
    for b in _blocks(v.shape[0], v.shape[1]):
        total += float(torch.linalg.norm((US[b] @ Vt).sub_(v[b]))) ** 2
    return total
