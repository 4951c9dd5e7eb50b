"""Spectral (SVD-based) merge methods: TSV-Merge, Iso-C and Iso-CTS, per tensor, in pure torch.

Same interface as `twinmerge.merge`: each function maps the stacked task vectors of ONE tensor,
`taus: [n, *shape]` (tau_t = theta_t - theta_0), to a merged task vector `[*shape]` that the caller adds to
theta_0. Every output is `scaling * f(taus)` (computed unscaled, multiplied at the end), so it is linear in
`scaling`.

Which tensors are decomposed follows the reference code: only 2-D tensors (`len(shape) == 2`) go through the
SVD; every other tensor (0-D, 1-D biases and LayerNorm, >2-D) is AVERAGED over the tasks (mean_t tau_t, then
times `scaling`), not summed as in Task Arithmetic. All three references do this:
  - TSV-M: `compute_and_sum_svd_mem_reduction` in the official TSV code, AntoAndGar/task_singular_vectors
    `src/utils/TSVM_utils.py` (same function copied in danielm1405/iso-merging `src/utils/TSVM_utils.py`), and
    FusionBench tanganke/fusion_bench `fusion_bench/method/task_singular_vector/utils/TSVM_utils.py`;
  - Iso-C / Iso-CTS: `iso_c` / `iso_cts` in danielm1405/iso-merging `src/utils/iso.py` and FusionBench
    `fusion_bench/method/isotropic_merging/iso_utils.py` (scaled by `scaling_factor` in `iso.py` there).
In all of them the scaling coefficient multiplies the whole merged task vector, 1-D entries included.
The references also skip the SVD for CLIP's `text_projection` (by key name); a per-tensor function sees no key
names, so that exclusion, if wanted, belongs to the caller.

The SVDs run in float32 with `torch.linalg.svd(full_matrices=False)`; the result is cast back to the input dtype.
Singular vectors have sign (and, for repeated or zero singular values, rotation) ambiguity; the outputs are
invariant to it whenever the decomposed matrices have full rank and distinct singular values, which is the
case for real fine-tuning task vectors. For rank-deficient inputs the references keep singular vectors of
zero singular values too (they still take part in the orthogonalisation, and in Iso-C/Iso-CTS they receive
the mean singular value); this module does the same, so such outputs are defined only up to that ambiguity,
exactly as in the references.
"""
import torch

__all__ = ["tsv_m", "iso_c", "iso_cts", "polar_factor"]


def polar_factor(a: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor of `a` [p, q]: with a = P Sigma Q^T (thin SVD), returns P Q^T.

    It is the closest matrix with orthonormal columns (p >= q) or rows (p < q) to `a` in Frobenius norm
    (orthogonal Procrustes); the references orthogonalise the concatenated singular vectors this way.
    """
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def _prepare(taus: torch.Tensor) -> torch.Tensor:
    if taus.ndim < 1 or taus.shape[0] < 1:
        raise ValueError(f"taus must be [n, *shape] with n >= 1 tasks, got shape {tuple(taus.shape)}")
    return taus if taus.dtype in (torch.float32, torch.float64) else taus.float()


def _finish(merged: torch.Tensor, scaling: float, like: torch.Tensor) -> torch.Tensor:
    return (scaling * merged).to(like.dtype)


def _is_matrix(taus: torch.Tensor) -> bool:
    """A tensor the references decompose: 2-D, non-empty."""
    return taus.ndim == 3 and min(taus.shape[1:]) > 0


def tsv_m(taus: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """TSV-Merge (Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging,
    CVPR 2025, arXiv 2412.00081), times `scaling`.

    For a 2-D tensor [m, d], r = min(m, d), n tasks:
      1. per task tau_t = U_t S_t V_t^T; keep the top k = max(1, r // n) triplets;
      2. concatenate U = [U_1k ... U_nk] (m x nk), S = diag(S_1k ... S_nk), V = [V_1k ... V_nk] (d x nk);
      3. replace U and V by their polar factors (P Sigma Q^T -> P Q^T) and return U_perp S V_perp^T.
    As in `compute_and_sum_svd_mem_reduction` (AntoAndGar/task_singular_vectors `src/utils/TSVM_utils.py`,
    FusionBench `fusion_bench/method/task_singular_vector/utils/TSVM_utils.py`). The reference places the nk
    columns in an m x r zero matrix; zero columns carry zero singular values and do not change the polar
    factor of the nonzero block (when it has full column rank), so concatenating only the nk columns is the
    same merge.

    Deviations, both only where r is small relative to n: the reference computes k = int(r * (1 / n)), which
    is 0 when r < n (the tensor's merged task vector is then 0, theta_0 is kept) and can also lose one to
    float rounding (49 * (1 / 49) < 1); here k = max(1, r // n), as the issue specifies, so every task keeps
    at least its top triplet (the concatenation then has nk > r columns and its polar factor has
    orthonormal rows instead of columns).

    Non-matrix tensors: scaling * mean_t tau_t (the references average them; see the module docstring).
    """
    x = _prepare(taus)
    if not _is_matrix(x):
        return _finish(x.mean(dim=0), scaling, taus)
    n, m, d = x.shape
    k = max(1, min(m, d) // n)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)  # batched: [n, m, r], [n, r], [n, r, d]
    u_cat = u[:, :, :k].permute(1, 0, 2).reshape(m, n * k)    # [U_1k ... U_nk]
    s_cat = s[:, :k].reshape(n * k)
    vh_cat = vh[:, :k, :].reshape(n * k, d)                    # [V_1k ... V_nk]^T
    merged = (polar_factor(u_cat) * s_cat) @ polar_factor(vh_cat)
    return _finish(merged, scaling, taus)


def iso_c(taus: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Iso-C (Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
    Subspaces, ICML 2025, arXiv 2502.04959), times `scaling`.

    For a 2-D tensor: M = sum_t tau_t = U S V^T (thin SVD, r = min(m, d) singular values) and the merge is
    mean(S) * U V^T, the mean taken over ALL r singular values, zeros included (as `iso_c` in
    danielm1405/iso-merging `src/utils/iso.py` and FusionBench `fusion_bench/method/isotropic_merging/
    iso_utils.py`: `S.mean()` of `torch.linalg.svd(..., full_matrices=False)`). So a rank-deficient M has its
    spectrum flattened over r directions, the ones of zero singular value included.

    Non-matrix tensors: scaling * mean_t tau_t (the reference computes `sum(tvs) / len(tvs)` and only
    multiplies back by n for 2-D tensors).
    """
    x = _prepare(taus)
    if not _is_matrix(x):
        return _finish(x.mean(dim=0), scaling, taus)
    u, s, vh = torch.linalg.svd(x.sum(dim=0), full_matrices=False)
    return _finish(s.mean() * (u @ vh), scaling, taus)


def iso_cts_dims(r: int, n: int, common_fraction: float) -> tuple[int, int]:
    """(k, s): common-subspace size and per-task size for a rank budget r = min(m, d) and n tasks.

    As in iso-merging's `iso_cts` (`src/utils/iso.py`): k0 = int(r * common_fraction); the task-specific
    total is round((r - k0) / n) * n (Python's round, halves to even), so it splits evenly; k = r minus that
    total; s = total / n. Hence k + n s = r and k may differ from k0 (e.g. r = 10, n = 3: k0 = 8, s = 1, k = 7;
    r = 5, n = 2: k0 = 4, round(0.5) = 0, s = 0, k = 5). Deviation only for a degenerate case the reference
    does not handle: if that total exceeds r (possible for small common_fraction, e.g. r = 5, n = 3,
    fraction 0), the reference would get k < 0; here s = r // n and k = r - n s instead.
    """
    k0 = int(r * common_fraction)
    total = round((r - k0) / n) * n
    if total > r:
        total = (r // n) * n
    return r - total, total // n


def iso_cts(taus: torch.Tensor, scaling: float = 1.0, common_fraction: float = 0.8) -> torch.Tensor:
    """Iso-CTS (Marczak et al., ICML 2025, arXiv 2502.04959), times `scaling`; follows `iso_cts` in
    danielm1405/iso-merging `src/utils/iso.py` (identical in FusionBench `fusion_bench/method/
    isotropic_merging/iso_utils.py`).

    For a 2-D tensor [m, d], r = min(m, d), (k, s) = `iso_cts_dims(r, n, common_fraction)` (k + n s = r):
      1. common subspace: M = sum_t tau_t = U S V^T, keep U_k, S_k, V_k (top k);
      2. task t: the top-s singular triplets of tau_t - U_k U_k^T tau_t (its part outside the common
         left subspace);
      3. concatenate [task 1 | ... | task n | common] into U (m x r), S (r values), V (d x r);
      4. U, V -> their polar factors; every singular value -> mean of those r values (common S_k and the
         task-specific ones; with k + n s = r there are no padding zeros);
      5. merged = mean(S) * U_perp V_perp^T.
    With n = 1 or common_fraction = 1 (s = 0) this reduces to Iso-C for full-rank inputs; when r is small
    relative to n the rounding can give s = 0 as well (then also Iso-C).

    Non-matrix tensors: scaling * mean_t tau_t (the reference's running average).
    """
    if not 0.0 <= common_fraction <= 1.0:
        raise ValueError(f"common_fraction must be in [0, 1], got {common_fraction}")
    x = _prepare(taus)
    if not _is_matrix(x):
        return _finish(x.mean(dim=0), scaling, taus)
    n, m, d = x.shape
    k, s = iso_cts_dims(min(m, d), n, common_fraction)
    u, sv, vh = torch.linalg.svd(x.sum(dim=0), full_matrices=False)
    u_k = u[:, :k]
    us, ss, vhs = [], [], []
    if s > 0:
        specific = x - u_k @ (u_k.T @ x)                              # [n, m, d], broadcast over tasks
        ut, st, vht = torch.linalg.svd(specific, full_matrices=False)
        us.append(ut[:, :, :s].permute(1, 0, 2).reshape(m, n * s))
        ss.append(st[:, :s].reshape(n * s))
        vhs.append(vht[:, :s, :].reshape(n * s, d))
    us.append(u_k)
    ss.append(sv[:k])
    vhs.append(vh[:k, :])
    u_all, s_all, vh_all = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)
    merged = s_all.mean() * (polar_factor(u_all) @ polar_factor(vh_all))
    return _finish(merged, scaling, taus)
