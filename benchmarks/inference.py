"""Inference cost of Twin-Merging's dynamic merging on a MiniLM-sized random BERT (not a test).

Compares, at batch 32 x seq 64 with 2 threads: the static shared model; the batched RoutedDeltaModel over all
6 experts and with top-2 routing; and the official approach (a dense parameter set theta_s + sum_t w_t v_t
materialised per sample, then run at batch 1 with torch.func.functional_call, v_t pre-stored dense as the
official code does). Exclusive knowledge is rank 10% of min(m, n) thin-SVD factors (twinmerge format).

    python benchmarks/inference.py [--quick]
"""
import argparse
import copy
import ctypes
import gc
import threading
import time

import statistics

import psutil
import torch
from torch.func import functional_call
from transformers import BertConfig, BertForSequenceClassification

from twinmerge.routed import RoutedDeltaModel
from twinmerge.exclusive import ExclusiveFactors

LIBC = ctypes.CDLL("libc.so.6")
N_EXPERTS, BATCH, SEQ, RANK_FRACTION = 6, 32, 64, 0.1
CONFIG = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512)


def build(seed=0):
    """(shared model, factors per expert, dense v_t per expert) for 6 noise-perturbed experts."""
    torch.manual_seed(seed)
    base = BertForSequenceClassification(BertConfig(**CONFIG, num_labels=2)).eval()
    state = {n: v for n, v in base.state_dict().items() if v.is_floating_point() and "classifier" not in n}
    taus = [{n: 0.01 * torch.randn_like(v) for n, v in state.items()} for _ in range(N_EXPERTS)]
    shared = copy.deepcopy(base)
    shared.load_state_dict({n: v + 0.3 * sum(t[n] for t in taus) for n, v in state.items()}, strict=False)
    shared_state = shared.state_dict()
    factors, dense = [], []
    for t, tau in enumerate(taus):
        v_t = {n: state[n] + tau[n] - shared_state[n] for n in state}
        lowrank, rest = {}, {}
        for n, v in v_t.items():
            if v.dim() == 2:
                r = max(1, int(RANK_FRACTION * min(v.shape)))
                u, s, v_ = torch.svd_lowrank(v, q=r + 8, niter=2)  # fast approximate thin SVD: timing only
                lowrank[n] = (u[:, :r].contiguous(), s[:r].contiguous(), v_[:, :r].contiguous())
            else:
                rest[n] = v
        cfg = BertConfig(**CONFIG, num_labels=2 + t).to_dict()
        head = {"classifier.weight": torch.randn(2 + t, 384) * 0.02, "classifier.bias": torch.zeros(2 + t)}
        factors.append(ExclusiveFactors(f"expert{t}", cfg, lowrank, rest, head, {}))
        dense.append({n: f for n, f in ((n, factors[-1].delta(n)) for n in v_t)})
    return shared, factors, dense


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


class PeakRSS:
    """Peak resident set size above the level at entry, sampled every millisecond by a thread."""

    def __enter__(self):
        self.proc, self.stop, self.peak = psutil.Process(), False, 0
        self.start = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.start)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def measure(configs, repeats):
    """Per configuration (label, fn, samples per call, tensor bytes): peak RSS of a warm-up call above the level
    before it, then `repeats` rounds timing one call of every configuration in turn (so all see the same load
    on a shared machine). Throughput = samples / best call time (median in brackets)."""
    rows = []
    with torch.inference_mode():
        peaks = []
        for _, fn, _, _ in configs:
            gc.collect()
            LIBC.malloc_trim(0)  # hand freed heap back to the OS so the peak reflects this configuration
            with PeakRSS() as mem:
                fn()
            peaks.append(mem.peak)
        times = [[] for _ in configs]
        for _ in range(repeats):
            for i, (_, fn, _, _) in enumerate(configs):
                start = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - start)
    for (label, _, samples, nbytes), peak, ts in zip(configs, peaks, times):
        rows.append((label, samples / min(ts), samples / statistics.median(ts), peak, nbytes))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about a minute in all)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    repeats, per_sample_n = (3, 2) if args.quick else (8, 4)

    t0 = time.perf_counter()
    shared, factors, dense = build()
    print(f"built model + {N_EXPERTS} experts' factors in {time.perf_counter() - t0:.0f} s")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[BATCH // 2:, SEQ // 2:] = 0  # half the batch padded to half length
    weights = torch.softmax(torch.randn(BATCH, N_EXPERTS, generator=g), 1)

    static_bytes = tensor_bytes(shared.state_dict().values())
    dyn = RoutedDeltaModel(copy.deepcopy(shared), factors)
    dyn_bytes = static_bytes + tensor_bytes(dyn.buffers()) + tensor_bytes(
        p for m in dyn.model.modules() if hasattr(m, "heads") for p in m.parameters())
    shared_params = shared.state_dict()
    heads = [(f.head["classifier.weight"], f.head["classifier.bias"]) for f in factors]
    dense_bytes = tensor_bytes(v for d in dense for v in d.values())

    def per_sample():  # official: one dense parameter set per sample, batch size 1
        for b in range(per_sample_n):
            params = {}
            for n in dense[0]:
                params[n] = shared_params[n].clone()
                for t in range(N_EXPERTS):
                    params[n].add_(dense[t][n], alpha=float(weights[b, t]))
            t = int(weights[b].argmax())
            params["classifier.weight"], params["classifier.bias"] = heads[t]
            functional_call(shared, params, (ids[b:b + 1],), {"attention_mask": mask[b:b + 1]})

    rows = measure([
        ("static shared model", lambda: shared(input_ids=ids, attention_mask=mask), BATCH, static_bytes),
        ("dynamic, all 6 experts", lambda: dyn(ids, mask, weights=weights), BATCH, dyn_bytes),
        ("dynamic, top-2", lambda: dyn(ids, mask, weights=weights, top_k=2), BATCH, dyn_bytes),
        ("official: dense theta per sample, batch 1", per_sample, per_sample_n, static_bytes + dense_bytes),
    ], repeats)

    print(f"\nbatch {BATCH} x seq {SEQ}, {N_EXPERTS} experts, rank {RANK_FRACTION:.0%} of min(m, n), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"| {'configuration':<42} | {'samples/s best (median)':>23} | {'peak RSS +MiB':>13} | "
          f"{'model tensors MiB':>17} |")
    print(f"|{'-' * 44}|{'-' * 25}|{'-' * 15}|{'-' * 19}|")
    for label, best, median, peak, nbytes in rows:
        print(f"| {label:<42} | {f'{best:.1f} ({median:.1f})':>23} | {peak / 2**20:>13.1f} | {nbytes / 2**20:>17.1f} |")
    static, dyn_all, dyn_k2, official = (r[1] for r in rows)
    factor_elems = sum(u.numel() + s.numel() + v.numel() for f in factors for u, s, v in f.lowrank.values())
    dense_1d = sum(v.numel() for f in factors for v in f.dense.values())
    dense_elems = dense_bytes // 4
    print(f"\ndynamic (all) / static        = {dyn_all / static:.2f}   (target >= 0.5)")
    print(f"dynamic (top-2) / static      = {dyn_k2 / static:.2f}")
    print(f"dynamic (all) / per-sample    = {dyn_all / official:.1f}   (target >= 5)")
    print(f"dynamic (top-2) / per-sample  = {dyn_k2 / official:.1f}")
    print(f"exclusive bytes / dense bytes = {(factor_elems + dense_1d) / dense_elems:.1%} with float32 factors, "
          f"{(factor_elems / 2 + dense_1d) / dense_elems:.1%} with float16 U/V/S (1-D dense float32)"
          "   (target <= 15%)")


if __name__ == "__main__":
    main()
