"""twinmerge.spectral: TSV-M, Iso-C, Iso-CTS on hand-built tensors with closed-form answers, plus an
independent float64 numpy re-computation on random tensors."""
import numpy as np
import pytest
import torch

from twinmerge.spectral import iso_c, iso_cts, iso_cts_dims, polar_factor, tsv_m

METHODS = [tsv_m, iso_c, iso_cts]
ATOL = 1e-4


def _bases(m: int, d: int, seed: int = 0):
    """Random orthonormal bases E (m x m) and F (d x d) as float32 tensors (columns e_i, f_i)."""
    g = torch.Generator().manual_seed(seed)
    e, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    f, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return e.float(), f.float()


def _outer(e, f, pairs):
    """sum over (value, i) of value * e_i f_i^T."""
    return sum(v * torch.outer(e[:, i], f[:, i]) for v, i in pairs)


def _close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


# ---------------------------------------------------------------- closed forms

def test_orthogonal_rank1_tasks():
    """tau_1 = 3 e1 f1^T, tau_2 = 2 e2 f2^T in a 2 x 4 matrix (r = 2, so k = 1 per task)."""
    e, f = _bases(2, 4)
    t1, t2 = _outer(e, f, [(3, 0)]), _outer(e, f, [(2, 1)])
    taus = torch.stack([t1, t2])
    _close(tsv_m(taus), t1 + t2)
    _close(iso_c(taus), 2.5 * _outer(e, f, [(1, 0), (1, 1)]))
    _close(iso_cts(taus), iso_c(taus))  # r = 2, n = 2: k0 = 1, round(0.5) = 0 -> s = 0, k = 2: Iso-C


def test_iso_c_mean_includes_zero_singular_values():
    """As the reference (S.mean() of the thin SVD): rank-2 M in 3 x 3 -> mean over 3 values = 5/3, and the
    zero direction e3 f3^T also gets 5/3 (its sign is arbitrary, so only its magnitude is checked)."""
    e, f = _bases(3, 3, seed=1)
    taus = torch.stack([_outer(e, f, [(3, 0)]), _outer(e, f, [(2, 1)])])
    out = iso_c(taus)
    coords = e.T @ out @ f  # out in the (e, f) bases
    expect = torch.diag(torch.tensor([5 / 3, 5 / 3, 0.0]))
    _close(coords[:2, :], expect[:2, :])
    _close(coords[:, :2], expect[:, :2])
    assert abs(abs(coords[2, 2].item()) - 5 / 3) < ATOL


def test_tsv_m_orthogonal_full_rank_tasks_is_sum():
    """Tasks with mutually orthogonal singular subspaces, each of rank k = r / n: TSV-M is their sum."""
    e, f = _bases(4, 5, seed=2)
    t1 = _outer(e, f, [(3, 0), (1, 2)])
    t2 = _outer(e, f, [(2, 1), (0.5, 3)])
    _close(tsv_m(torch.stack([t1, t2])), t1 + t2)


def test_tsv_m_truncates_each_task_to_top_k():
    """n = 3, r = 6 -> k = 2: each task's small third triplet is dropped; the kept ones are orthogonal."""
    e, f = _bases(6, 8, seed=3)
    t1 = _outer(e, f, [(5, 0), (4, 1), (0.5, 2)])
    t2 = _outer(e, f, [(3, 2), (2.5, 3), (0.1, 0)])
    t3 = _outer(e, f, [(2, 4), (1.5, 5), (0.2, 1)])
    expect = _outer(e, f, [(5, 0), (4, 1), (3, 2), (2.5, 3), (2, 4), (1.5, 5)])
    _close(tsv_m(torch.stack([t1, t2, t3])), expect)


def test_tsv_m_overlapping_tasks_are_orthogonalised():
    """Two rank-1 tasks whose left vectors overlap (u1.u2 = 0.5), right vectors orthogonal: U = [u1 u2] is
    replaced by its polar factor U (U^T U)^{-1/2}, V = [f1 f2] stays; merged = sum_t s_t (U_perp)_t f_t^T."""
    e, f = _bases(2, 3, seed=4)
    c = 0.5
    u1, u2 = e[:, 0], c * e[:, 0] + (1 - c * c) ** 0.5 * e[:, 1]
    taus = torch.stack([3 * torch.outer(u1, f[:, 0]), 2 * torch.outer(u2, f[:, 1])])
    a = torch.stack([u1, u2], dim=1).double()
    w, q = torch.linalg.eigh(a.T @ a)
    pu = (a @ q @ torch.diag(w ** -0.5) @ q.T).float()
    expect = 3 * torch.outer(pu[:, 0], f[:, 0]) + 2 * torch.outer(pu[:, 1], f[:, 1])
    _close(tsv_m(taus), expect)
    assert not torch.allclose(expect, taus.sum(0), atol=1e-2)  # the orthogonalisation did change the sum


def test_iso_cts_common_and_task_specific_closed_form():
    """r = 10, n = 2, fraction 0.8 -> k = 8, s = 1. Both tasks share e1..e8 (so they form the top-8 common
    subspace of M) and each owns one more direction (e9: 1.0, e10: 0.5). Then U = all ten e_i, S = the
    ten values {a_i + b_i, 1, 0.5}, and Iso-CTS = mean(S) * sum_i e_i f_i^T."""
    assert iso_cts_dims(10, 2, 0.8) == (8, 1)
    e, f = _bases(10, 12, seed=5)
    a = [6.0, 5.5, 5.0, 4.5, 4.0, 3.5, 3.0, 2.5]
    b = [1.0, 1.5, 0.5, 1.0, 0.5, 1.0, 0.5, 1.0]
    t1 = _outer(e, f, [(v, i) for i, v in enumerate(a)] + [(1.0, 8)])
    t2 = _outer(e, f, [(v, i) for i, v in enumerate(b)] + [(0.5, 9)])
    spectrum = [x + y for x, y in zip(a, b)] + [1.0, 0.5]
    expect = float(np.mean(spectrum)) * _outer(e, f, [(1.0, i) for i in range(10)])
    out = iso_cts(torch.stack([t1, t2]))
    _close(out, expect)
    # Iso-C on the same tasks flattens M's spectrum instead, where e9, e10 carry 1.0 and 0.5 too: same here
    _close(iso_c(torch.stack([t1, t2])), expect)


def test_iso_cts_task_directions_come_from_task_residuals():
    """Task-specific directions come from each task's residual, not from M: if task 2's private direction
    is cancelled in M by task 1 (tau_1 has -x, tau_2 has +x on e10), M has rank 9 but Iso-CTS still keeps
    e10 through task 2's residual."""
    e, f = _bases(10, 10, seed=6)
    common = [(5.0 - 0.3 * i, i) for i in range(8)]
    t1 = _outer(e, f, common + [(1.0, 8), (-0.7, 9)])
    t2 = _outer(e, f, common + [(0.7, 9)])
    out = iso_cts(torch.stack([t1, t2]))
    # task 1's residual: e9 (1.0) > e10 (0.7) -> keeps e9; task 2's residual: e10 (0.7)
    spectrum = [2 * v for v, _ in common] + [1.0, 0.7]
    coords = e.T @ out @ f
    _close(coords, float(np.mean(spectrum)) * torch.eye(10))
    iso_c_coords = e.T @ iso_c(torch.stack([t1, t2])) @ f  # M's spectrum: the 8 common values, 1.0 and 0
    _close(iso_c_coords[:9, :9], float(np.mean(spectrum[:9] + [0.0])) * torch.eye(9))


@pytest.mark.parametrize("r,n,fraction,expect", [
    (10, 2, 0.8, (8, 1)), (10, 3, 0.8, (7, 1)), (5, 2, 0.8, (5, 0)), (768, 8, 0.8, (616, 19)),
    (2, 3, 0.8, (2, 0)), (1, 1, 0.8, (0, 1)), (7, 1, 0.8, (5, 2)), (6, 4, 1.0, (6, 0)), (5, 3, 0.0, (2, 1)),
])
def test_iso_cts_dims(r, n, fraction, expect):
    """k + n s = r; Python rounding as in the reference; the degenerate total > r case is clamped."""
    k, s = iso_cts_dims(r, n, fraction)
    assert (k, s) == expect and k + n * s == r and k >= 0


# ---------------------------------------------------------------- reductions and edge cases

def _random_taus(n, m, d, seed=0):
    return torch.randn(n, m, d, generator=torch.Generator().manual_seed(seed))


def test_single_task():
    """n = 1: TSV-M keeps every triplet (k = r) -> tau itself; Iso-CTS keeps all directions -> Iso-C;
    Iso-C is mean(S) U V^T of tau."""
    tau = _random_taus(1, 6, 4, seed=7)
    _close(tsv_m(tau), tau[0])
    u, s, vh = torch.linalg.svd(tau[0].double(), full_matrices=False)
    _close(iso_c(tau), (s.mean() * u @ vh).float())
    _close(iso_cts(tau), iso_c(tau))


def test_iso_cts_full_common_fraction_is_iso_c():
    taus = _random_taus(3, 7, 9, seed=8)
    _close(iso_cts(taus, common_fraction=1.0), iso_c(taus))


@pytest.mark.parametrize("fn", METHODS)
def test_non_matrix_tensors_are_averaged(fn):
    """As all three references: 1-D (and 0-D, >2-D) tensors get scaling * mean_t tau_t."""
    g = torch.Generator().manual_seed(9)
    for shape in [(5,), (), (2, 3, 4)]:
        taus = torch.randn(3, *shape, generator=g)
        _close(fn(taus, scaling=0.7), 0.7 * taus.mean(0), atol=1e-6)
    taus = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    _close(fn(taus), torch.tensor([2.0, -1.0]), atol=0)


@pytest.mark.parametrize("fn", METHODS)
@pytest.mark.parametrize("shape", [(3, 6, 4), (4, 5, 9), (2, 1, 7), (5, 3, 2)])
def test_shape_dtype_and_scaling_linearity(fn, shape):
    taus = _random_taus(*shape, seed=10)
    out = fn(taus, 1.0)
    assert out.shape == shape[1:] and out.dtype == torch.float32 and torch.isfinite(out).all()
    for s in (0.3, -1.5, 0.0):
        _close(fn(taus, s), s * out, atol=1e-5)


@pytest.mark.parametrize("fn", METHODS)
def test_zero_tensors(fn):
    for shape in [(3, 4, 5), (2, 6), (1, 3, 3)]:
        out = fn(torch.zeros(shape), 0.5)
        assert out.shape == shape[1:] and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("fn", METHODS)
def test_other_dtypes_round_trip(fn):
    taus = _random_taus(2, 4, 6, seed=11)
    out = fn(taus.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    _close(out.float(), fn(taus.to(torch.bfloat16).float()).to(torch.bfloat16).float(), atol=0)


def test_tsv_m_fewer_directions_than_tasks():
    """r = 2 < n = 3: k = max(1, 0) = 1 (the issue's rule; the reference's int(r / n) = 0 would give 0).
    Three rank-1 tasks in a 2 x 3 matrix with orthogonal right vectors: V = [f1 f2 f3] is orthonormal, U =
    [u1 u2 u3] (2 x 3) gets the polar factor (U U^T)^{-1/2} U."""
    e, f = _bases(2, 3, seed=12)
    us = torch.stack([e[:, 0], e[:, 1], (e[:, 0] + e[:, 1]) / 2 ** 0.5], dim=1)
    sv = torch.tensor([3.0, 2.0, 1.0])
    taus = torch.stack([sv[t] * torch.outer(us[:, t], f[:, t]) for t in range(3)])
    a = us.double()
    w, q = torch.linalg.eigh(a @ a.T)
    pu = (q @ torch.diag(w ** -0.5) @ q.T @ a).float()
    _close(tsv_m(taus), (pu * sv) @ f.T)


def test_polar_factor():
    a = torch.tensor([[2.0, 0.0], [0.0, 0.5], [0.0, 0.0]])
    _close(polar_factor(a), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), atol=1e-6)
    b = _random_taus(1, 7, 3, seed=13)[0]
    p = polar_factor(b)
    _close(p.T @ p, torch.eye(3), atol=1e-5)
    _close(p.T @ b, (p.T @ b).T, atol=1e-4)  # b = p h with h symmetric positive definite


def test_bad_common_fraction():
    with pytest.raises(ValueError):
        iso_cts(_random_taus(2, 3, 3), common_fraction=1.5)


# ---------------------------------------------------------------- independent numpy re-computation

def _np_polar_cols(a):
    """a (a^T a)^{-1/2} by eigendecomposition (a has full column rank)."""
    w, q = np.linalg.eigh(a.T @ a)
    return a @ (q * w ** -0.5) @ q.T


def _np_tsv_m(taus):
    n, m, d = taus.shape
    k = max(1, min(m, d) // n)
    cols_u, vals, cols_v = [], [], []
    for t in range(n):
        u, s, vt = np.linalg.svd(taus[t], full_matrices=False)
        for j in range(k):
            cols_u.append(u[:, j])
            vals.append(s[j])
            cols_v.append(vt[j])
    pu = _np_polar_cols(np.array(cols_u).T)
    pv = _np_polar_cols(np.array(cols_v).T)
    return sum(vals[j] * np.outer(pu[:, j], pv[:, j]) for j in range(len(vals)))


def _np_iso_c(taus):
    u, s, vt = np.linalg.svd(taus.sum(0), full_matrices=False)
    return np.mean(s) * u @ vt


def _np_iso_cts(taus, fraction):
    n, m, d = taus.shape
    r = min(m, d)
    common = int(r * fraction)
    common = r - round((r - common) / n) * n
    per_task = (r - common) // n
    u, s, vt = np.linalg.svd(taus.sum(0), full_matrices=False)
    uc = u[:, :common]
    cols_u, vals, cols_v = list(uc.T), list(s[:common]), list(vt[:common])
    for t in range(n):
        rest = taus[t] - uc @ (uc.T @ taus[t])
        ut, st, vtt = np.linalg.svd(rest, full_matrices=False)
        cols_u += list(ut[:, :per_task].T)
        vals += list(st[:per_task])
        cols_v += list(vtt[:per_task])
    pu = _np_polar_cols(np.array(cols_u).T)
    pv = _np_polar_cols(np.array(cols_v).T)
    return np.mean(vals) * pu @ pv.T


@pytest.mark.parametrize("n,m,d", [(3, 12, 9), (4, 10, 16), (2, 7, 7)])
def test_random_against_numpy(n, m, d):
    taus = _random_taus(n, m, d, seed=20 + n)
    x = taus.double().numpy()
    _close(tsv_m(taus, 0.4), torch.from_numpy(0.4 * _np_tsv_m(x)).float())
    _close(iso_c(taus, 0.4), torch.from_numpy(0.4 * _np_iso_c(x)).float())
    for fraction in (0.8, 0.5):
        _close(iso_cts(taus, 0.4, fraction), torch.from_numpy(0.4 * _np_iso_cts(x, fraction)).float())
