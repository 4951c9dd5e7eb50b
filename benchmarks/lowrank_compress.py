"""Compressing a LoRA expert's exclusive knowledge: the dense SVD of v_t [m, n] against the low-rank path
(`twinmerge.lora.lowrank_svd` of v_t = L @ R), the work `FactorStream` does for one matrix (not a test).

Six random LoRA experts of rank r on an [m, n] weight, a Task Arithmetic merge (lambda 0.3), the compressed
expert among them, so K = 6 r columns: v_t = (1 - 0.3) B_t A_t - 0.3 sum_{s != t} B_s A_s. Dense path (what a
full-weight expert costs): form v_t, its singular values (energy / budget plans), its thin SVD, the error of the
stored float16 factors. Low-rank path: the same from (L, R) without forming v_t (`_lowrank_squared_error` for the
error). One thread. Prints per size the seconds of each path and `dense / low-rank = X`, and checks that the
singular values and rel_error agree.

    python benchmarks/lowrank_compress.py [--sizes 1024,4096] [--lora-rank 8] [--keep 16]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from twinmerge.exclusive import _lowrank_squared_error, _squared_error, singular_values, thin_svd  # noqa: E402
from twinmerge.lora import lowrank_svd  # noqa: E402


def lora_pair(m, n, r, experts=6, lam=0.3, seed=0):
    """(base [m, n], L [m, K], R [K, n], [(B, A)]) of `experts` random rank-r LoRA updates, expert 0 compressed."""
    g = torch.Generator().manual_seed(seed)
    pairs = [(0.1 * torch.randn(m, r, generator=g), 0.1 * torch.randn(r, n, generator=g)) for _ in range(experts)]
    coefs = [1 - lam] + [-lam] * (experts - 1)
    L = torch.cat([c * B for c, (B, _) in zip(coefs, pairs)], 1)
    R = torch.cat([A for _, A in pairs], 0)
    return 0.02 * torch.randn(m, n, generator=g), L, R, pairs


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def stored(U, S, V, keep):
    """The float16 factors a reader gets back, rank `keep`."""
    return [U[:, :keep].half().float(), S[:keep], V[:, :keep].half().float()]


def run(size, r, keep, lam=0.3):
    base, L, R, pairs = lora_pair(size, size, r, lam=lam)

    def dense():
        v = (base + pairs[0][0] @ pairs[0][1]) - (base + lam * sum(B @ A for B, A in pairs))
        s = singular_values(v)
        U, S, V = thin_svd(v)
        return s, _squared_error("lowrank", stored(U, S, V, keep), v) / float(torch.linalg.norm(v)) ** 2

    def lowrank():
        s = lowrank_svd(L, R)[1]
        U, S, V = lowrank_svd(L, R)
        return s, _lowrank_squared_error(L, R, stored(U, S, V, keep)) / _lowrank_squared_error(L, R, [])

    (s_d, e_d), t_d = timed(dense)
    (s_l, e_l), t_l = timed(lowrank)
    k = s_l.numel()
    agree = float((s_l - s_d[:k]).abs().max() / s_d[0])
    print(f"{size}x{size}, K={L.shape[1]}: dense {t_d:.3f} s, low-rank {t_l:.4f} s, dense / low-rank = {t_d / t_l:.0f}; "
          f"singular values max rel diff {agree:.1e}, rel_error {e_d ** .5:.6f} vs {e_l ** .5:.6f}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1024,4096")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--keep", type=int, default=16, help="rank of the stored factors")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for size in map(int, args.sizes.split(",")):
        run(size, args.lora_rank, args.keep)


if __name__ == "__main__":
    main()
